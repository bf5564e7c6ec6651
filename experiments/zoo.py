"""The small-model zoo at each scale, and training it (resumable: finished runs are skipped).

Scales:
  * ``tiny``: synthetic repeated-token data, 2-layer width-32 models; seconds. For tests.
  * ``cpu``: the default reproduction on the embedded corpus (Python stdlib, bytes) on a 2-core CPU:
    attn-1l, attn-2l, smear-1l, smear-2l with the token budgets below (~20 minutes of training).
  * ``gpu``: the whole family (adds attn-3l, mlp-1l, mlp-2l) at 4x the tokens, on CUDA.
"""

from __future__ import annotations

from pathlib import Path

from interventions.zoo.train import TrainConfig, latest_checkpoint, read_metrics, train

from .presets import get_preset

# tokens per model at each scale (the 2L budget covers its phase change with margin: see README)
SCALES: dict[str, dict[str, int]] = {
    "tiny": {"attn-1l": 600_000, "attn-2l": 1_500_000, "smear-1l": 600_000, "smear-2l": 600_000},
    "cpu": {"attn-1l": 12_000_000, "attn-2l": 45_000_000, "smear-1l": 12_000_000, "smear-2l": 16_000_000},
    "gpu": {"attn-1l": 60_000_000, "attn-2l": 120_000_000, "attn-3l": 120_000_000, "mlp-1l": 60_000_000,
            "mlp-2l": 120_000_000, "smear-1l": 60_000_000, "smear-2l": 120_000_000},
}


def zoo_configs(scale: str, device: str = "cpu", seed: int = 0) -> dict[str, TrainConfig]:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}")
    out = {}
    for name, tokens in SCALES[scale].items():
        if scale == "tiny":
            cfg = get_preset("tiny")
            layers = int(name.split("-")[1][0])
            cfg["model"] = dict(cfg["model"], n_layers=layers, smear_keys=name.startswith("smear"))
            cfg["n_checkpoints"] = 12
        else:
            cfg = get_preset(name)
        cfg.update(tokens=tokens, device=device, seed=seed)
        out[name] = TrainConfig.from_dict(cfg)
    return out


def train_zoo(scale: str, runs_dir: str | Path, device: str = "cpu", progress: bool = True,
              only: list[str] | None = None) -> dict[str, Path]:
    """Train (or resume, or skip when finished) every model of a scale. Returns run folders."""
    runs_dir = Path(runs_dir)
    out = {}
    for name, cfg in zoo_configs(scale, device).items():
        if only is not None and name not in only:
            continue
        run = runs_dir / name
        if _finished(run, cfg):
            out[name] = run
            continue
        train(cfg, run, resume=(run / "train_config.json").is_file(), progress=progress)
        out[name] = run
    return out


def _finished(run: Path, cfg: TrainConfig) -> bool:
    ckpt = latest_checkpoint(run)
    return ckpt is not None and ckpt.name == f"step-{cfg.total_steps:08d}" and bool(read_metrics(run))
