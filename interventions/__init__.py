"""Causal interventions for studying induction heads and in-context learning.

The public API is re-exported here; see README.md for a tour. Importing registers the
``attn_only`` model type with HF's Auto classes (so saved models load with
``AutoModelForCausalLM.from_pretrained``); nothing else happens at import.
"""

from .primitives.ablation import (Ablation, MeanAblation, PatternPreserving, ResampleAblation, ZeroAblation,
                       run_with_ablations)
from .engine.adapters import ArchSpec, get_adapter, observable, register_adapter
from .engine.heads import Head, all_heads, parse_head, parse_heads
from .primitives.loss import loss_by_position, loss_from_logits, per_token_loss
from .zoo.model import AttnOnlyConfig, AttnOnlyForCausalLM
from .primitives.cache import cache_activations
from .analysis.metrics import icl_from_losses, icl_indices, icl_score, loss_by_token_index
from .primitives.patching import logit_diff, mean_loss_metric, patch_heads, patch_patterns, patch_residual
from .analysis.scores import (classify_induction_heads, copying_score, duplicate_token_score, head_scores,
                     induction_score, prefix_matching_score, previous_token_score)
from .zoo.smear import get_alphas, set_alphas, smear_keys
from .primitives.sweep import ablation_sweep, sweep_table
from .engine.tracing import InterventionError, head_outputs, run_edited, wrap

__all__ = [
    "Ablation", "ArchSpec", "AttnOnlyConfig", "AttnOnlyForCausalLM", "Head", "InterventionError",
    "MeanAblation", "PatternPreserving", "ResampleAblation", "ZeroAblation", "all_heads", "get_adapter",
    "head_outputs", "loss_by_position", "loss_from_logits", "observable", "parse_head", "parse_heads",
    "per_token_loss", "register_adapter", "run_edited", "run_with_ablations", "wrap",
    "cache_activations", "icl_from_losses", "icl_indices", "icl_score", "loss_by_token_index",
    "logit_diff", "mean_loss_metric", "patch_heads", "patch_patterns", "patch_residual",
    "classify_induction_heads", "copying_score", "duplicate_token_score", "head_scores", "induction_score",
    "prefix_matching_score", "previous_token_score", "ablation_sweep", "sweep_table",
    "get_alphas", "set_alphas", "smear_keys",
]
