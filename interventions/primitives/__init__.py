"""Intervention primitives built on the engine: ablations, per-token loss, patching, caching, sweeps."""
