"""Experiment scripts and the command line (``python -m experiments --help``)."""
