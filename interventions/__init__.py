"""Causal interventions for studying induction heads and in-context learning.

The public API is re-exported here; see README.md for a tour.
"""

from .model import AttnOnlyConfig, AttnOnlyForCausalLM

__all__ = ["AttnOnlyConfig", "AttnOnlyForCausalLM"]
