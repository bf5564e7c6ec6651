"""Training presets: the paper's small-model family, scaled down for a 2-core CPU.

Shared defaults (the calibration table in docs/calibration.md, "Choosing the defaults", measured them
with this trainer on this corpus):
  * byte-level tokens (vocab 257): with a 2048-token BPE the vanilla phase change needs hundreds
    of millions of tokens on this corpus; with bytes it comes within ~10M.
  * d_model 96, 4 heads of 24: the vanilla 2-layer model forms its induction head as early (in tokens)
    as at d_model 128 for ~75% of the compute (d_model 64 formed none by 60M tokens).
  * context 256 x batch 8, lr 2e-3 *constant* after 1M warm-up tokens: the earliest and sharpest
    vanilla phase change of the calibration grid (batch 16 or lr 1e-3 or cosine came later; lr 3e-3
    never formed). Every model shares this schedule, so any prefix of any run is comparable with
    any other at equal tokens (cosine, tied to each run's own budget, is ``--set schedule=cosine``).
  * Shortformer positions (as the paper's small models).
  * Checkpoints: 24 log-spaced, one every 1M tokens, and one every 0.15M tokens from 5M to 11M
    (``dense_checkpoints``: where the calibration saw the vanilla 2-layer ICL score fall, so the
    window holds >= 12 checkpoints). The schedule of checkpoints does not change training.
"""

from __future__ import annotations

import copy

BASE_MODEL = dict(n_heads=4, d_model=96, n_ctx=256, positional="shortformer")
BASE = dict(corpus="stdlib", vocab_size=257, batch_size=8, lr=2e-3, warmup_tokens=1_000_000, schedule="constant",
            tokens=20_000_000, n_checkpoints=24, checkpoint_every_tokens=1_000_000,
            dense_checkpoints=[5_000_000, 11_000_000, 150_000], n_eval_windows=256, seed=0)

PRESETS: dict[str, dict] = {
    "attn-1l": dict(BASE, model=dict(BASE_MODEL, n_layers=1)),
    "attn-2l": dict(BASE, model=dict(BASE_MODEL, n_layers=2)),
    "attn-3l": dict(BASE, model=dict(BASE_MODEL, n_layers=3)),
    "mlp-1l": dict(BASE, model=dict(BASE_MODEL, n_layers=1, d_mlp=4 * BASE_MODEL["d_model"])),
    "mlp-2l": dict(BASE, model=dict(BASE_MODEL, n_layers=2, d_mlp=4 * BASE_MODEL["d_model"])),
    "smear-1l": dict(BASE, model=dict(BASE_MODEL, n_layers=1, smear_keys=True)),
    "smear-2l": dict(BASE, model=dict(BASE_MODEL, n_layers=2, smear_keys=True)),
    # Seconds-long runs on synthetic repeated tokens (tests, smoke checks).
    "tiny": dict(corpus="synthetic:repeat", batch_size=16, lr=1e-2, warmup_tokens=20_000, schedule="constant",
                 tokens=2_500_000, n_checkpoints=8, n_eval_windows=16, seed=0,
                 model=dict(n_layers=2, n_heads=2, d_model=32, n_ctx=64, vocab_size=32)),
}


def get_preset(name: str) -> dict:
    """A deep copy of preset ``name`` (a TrainConfig dict)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
