"""Training presets: the paper's small-model family, scaled down for a 2-core CPU.

Shared defaults (chosen by the calibration in README "Choosing the defaults"):
  * byte-level tokens (vocab 257): with a 2048-token BPE the vanilla phase change needs hundreds
    of millions of tokens on this corpus; with bytes it comes within tens of millions.
  * d_model 128, 4 heads of 32 (~72k tokens/s on 2 CPU cores). In the calibration grid on this
    corpus, d_model 64 models showed no induction by 60M tokens; d_model 128 did from ~10-20M.
  * context 256 x batch 16: a smaller batch x context moves the onset earlier in tokens.
  * Shortformer positions (as the paper's small models), lr 1e-3 with 1M tokens of warm-up.
"""

from __future__ import annotations

import copy

BASE_MODEL = dict(n_heads=4, d_model=128, n_ctx=256, positional="shortformer")
BASE = dict(corpus="stdlib", vocab_size=257, batch_size=16, lr=1e-3, warmup_tokens=1_000_000,
            tokens=45_000_000, n_checkpoints=48, n_eval_windows=128, seed=0)

PRESETS: dict[str, dict] = {
    "attn-1l": dict(BASE, model=dict(BASE_MODEL, n_layers=1)),
    "attn-2l": dict(BASE, model=dict(BASE_MODEL, n_layers=2)),
    "attn-3l": dict(BASE, model=dict(BASE_MODEL, n_layers=3)),
    "mlp-1l": dict(BASE, model=dict(BASE_MODEL, n_layers=1, d_mlp=512)),
    "mlp-2l": dict(BASE, model=dict(BASE_MODEL, n_layers=2, d_mlp=512)),
    "smear-1l": dict(BASE, model=dict(BASE_MODEL, n_layers=1, smear_keys=True)),
    "smear-2l": dict(BASE, model=dict(BASE_MODEL, n_layers=2, smear_keys=True)),
    # Seconds-long runs on synthetic repeated tokens (tests, smoke checks).
    "tiny": dict(corpus="synthetic:repeat", batch_size=16, lr=1e-2, warmup_tokens=20_000, tokens=2_500_000,
                 n_checkpoints=8, n_eval_windows=16, seed=0,
                 model=dict(n_layers=2, n_heads=2, d_model=32, n_ctx=64, vocab_size=32)),
}


def get_preset(name: str) -> dict:
    """A deep copy of preset ``name`` (a TrainConfig dict)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
