"""Analysis on top of the primitives: ICL metrics and head scores."""
