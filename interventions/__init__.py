"""Causal interventions for studying induction heads and in-context learning.

The public API is re-exported here; see README.md for a tour. Layers of the package:
``interventions.engine`` (sites, adapters, heads, the one trace engine), ``interventions.primitives``
(ablation, caching, patching, sweeps, loss), ``interventions.analysis`` (ICL metrics, the share of ICL an ablation removes, head scores) and
``interventions.zoo`` (our model family, trainer, corpora, tokenizers, smeared keys). Importing
registers the ``attn_only`` model type with HF's Auto classes (so saved models load with
``AutoModelForCausalLM.from_pretrained``); nothing else happens at import.
"""

from .analysis.icl_ablation import icl_share_removed
from .analysis.metrics import icl_score
from .analysis.scores import classify_induction_heads, head_scores
from .engine.adapters import ArchSpec, observable, register_adapter
from .engine.heads import Head
from .engine.remote import NotRemotable
from .engine.tracing import InterventionError, wrap
from .primitives.ablation import (FunctionAblation, MeanAblation, PatternPreserving, ResampleAblation, ZeroAblation,
                                  run_with_ablations)
from .primitives.cache import run_with_cache
from .primitives.loss import per_token_loss
from .primitives.patching import mean_loss_metric, patch_heads, path_patch
from .primitives.sweep import ablation_sweep
from .zoo.model import AttnOnlyConfig, AttnOnlyForCausalLM

__all__ = [
    "ArchSpec", "AttnOnlyConfig", "AttnOnlyForCausalLM", "FunctionAblation", "Head", "InterventionError",
    "MeanAblation", "NotRemotable", "PatternPreserving", "ResampleAblation", "ZeroAblation", "ablation_sweep",
    "classify_induction_heads", "head_scores", "icl_score", "icl_share_removed", "mean_loss_metric", "observable", "patch_heads",
    "path_patch", "per_token_loss", "register_adapter", "run_with_ablations", "run_with_cache", "wrap",
]
