"""The phase change read from the trainer's own log, for runs that were trained but not evaluated.

Every checkpoint the trainer logs (``metrics.jsonl``) the ICL score (the report's definition, on 256
windows) and the loss on the first and second copy of repeated random tokens. From those alone this
gives, per run, the ICL window and the window of the repeat gap (first-copy minus second-copy loss, the
calibration's "gap"; it rises when induction heads form), both by ``rise_window``, and the first
checkpoint where the gap reaches 0.3 and 1.0 nats (the calibration's columns, docs/calibration.md); then the spread
across seeds (``seed_spread``) and one figure. No model is loaded: seconds for any number of runs.

    python -m experiments.training_log RUN_FOLDER... --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .naming import folder_name

GAP_THRESHOLDS = (0.3, 1.0)  # nats: the calibration table's "gap >= 0.3" and "gap >= 1.0"
MIN_GAP_RISE = 0.3  # nats: a smaller fitted rise of the repeat gap is not called a window


def training_curves(runs: dict[str, Path]) -> pd.DataFrame:
    """Tidy: one row per logged checkpoint of each run (run, model, seed, step, tokens, val_loss,
    icl_score, repeat_gap)."""
    from interventions.zoo.train import read_metrics

    from .zoo import split_run_name

    frames = []
    for name, run in runs.items():
        df = pd.DataFrame(read_metrics(run))
        model, seed = split_run_name(name)
        if seed is None:
            seed = json.loads((Path(run) / "train_config.json").read_text())["seed"]
        frames.append(pd.DataFrame({
            "run": name, "model": model, "seed": seed,
            "step": df.step, "tokens": df.tokens, "val_loss": df.val_loss, "icl_score": df.icl_score,
            "repeat_gap": df.repeat_loss_first - df.repeat_loss_second}))
    return pd.concat(frames, ignore_index=True)


def first_reaching(tokens: np.ndarray, y: np.ndarray, level: float) -> float:
    """Tokens at the first checkpoint where ``y`` >= ``level`` (NaN if never).

    >>> first_reaching(np.array([1, 2, 3]), np.array([0.1, 0.5, 0.2]), 0.3)
    2.0
    """
    hit = np.flatnonzero(y >= level)
    return float(tokens[hit[0]]) if len(hit) else math.nan


def training_windows(curves: pd.DataFrame) -> pd.DataFrame:
    """Per run: ICL window and repeat-gap window (10%-90% of the fitted rise, ``rise_window``), the first
    checkpoint with gap >= 0.3 and >= 1.0 nats, and the final ICL score and gap."""
    from .phase_change import FIT_FROM_TOKENS, MIN_ICL_DROP, rise_window

    rows = []
    for run, d in curves.groupby("run", sort=False):
        d = d[d.tokens > 0].sort_values("tokens")
        t = d.tokens.to_numpy()
        icl = rise_window(t, -d.icl_score.to_numpy(), MIN_ICL_DROP, FIT_FROM_TOKENS)
        gap = rise_window(t, d.repeat_gap.to_numpy(), MIN_GAP_RISE, FIT_FROM_TOKENS)
        rows.append({"run": run, "model": d.model.iloc[0], "seed": int(d.seed.iloc[0]), "run_tokens": int(t[-1]),
                     **{f"icl_window_{k}": icl[k] for k in ("start_tokens", "end_tokens", "rise", "ends_inside")},
                     **{f"gap_window_{k}": gap[k] for k in ("start_tokens", "end_tokens", "rise", "ends_inside")},
                     **{f"gap_{level}_tokens": first_reaching(t, d.repeat_gap.to_numpy(), level)
                        for level in GAP_THRESHOLDS},
                     "final_icl": float(d.icl_score.iloc[-1]), "final_gap": float(d.repeat_gap.iloc[-1])})
    return pd.DataFrame(rows)


def spread(windows: pd.DataFrame) -> dict:
    """``seed_spread`` of every number of ``training_windows`` per model, over every run: by its model and
    seed columns (a run named ``<model>`` has its seed from its config), not by the run's name."""
    from .reproduce import seed_spread

    per_run = {}
    for r in windows.to_dict("records"):
        key = f"{r['model']}-s{int(r['seed'])}"
        if key in per_run:
            raise ValueError(f"two runs of {r['model']} with seed {int(r['seed'])} (one is {r['run']}): pass each "
                             "seed once")
        per_run[key] = {k: v for k, v in r.items() if k not in ("run", "model", "seed")}
    return seed_spread(per_run)


def figure(curves: pd.DataFrame, out: Path) -> list[Path]:
    """ICL score and repeat gap against tokens, one column per model, one line per seed."""
    from .figures import save_figure, style

    sns = style()
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(curves.model))
    fig, axes = plt.subplots(2, len(models), figsize=(1.25 * len(models) + 0.6, 3.2), sharex=True, sharey="row",
                             squeeze=False)
    colors = sns.color_palette("colorblind", curves.seed.nunique())
    seeds = sorted(curves.seed.unique())
    for j, model in enumerate(models):
        for seed, d in curves[(curves.model == model) & (curves.tokens > 0)].groupby("seed"):
            c = colors[seeds.index(seed)]
            axes[0, j].plot(d.tokens, d.icl_score, color=c, lw=0.8, label=f"seed {seed}")
            axes[1, j].plot(d.tokens, d.repeat_gap, color=c, lw=0.8)
        axes[0, j].set_title(model)
        axes[1, j].set_xscale("log")
        axes[1, j].set_xlabel("tokens")
    axes[0, 0].set_ylabel("ICL score (nats)")
    axes[1, 0].set_ylabel("repeat gap (nats)")
    axes[0, -1].legend(frameon=False)
    return save_figure(fig, out, "training_log")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.training_log", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (named <model> or <model>-s<seed>)")
    p.add_argument("--out", required=True, help="folder for training_curves.csv, training_windows.csv, "
                                                "seed_spread.json, provenance.json and the figure")
    args = p.parse_args(argv)
    names = [folder_name(r) for r in args.runs]
    if len(set(names)) < len(names):  # runs are told apart by folder name (tables, figure)
        dup = next(n for n in names if names.count(n) > 1)
        p.error(f"two run folders are named {dup}: pass each run once, or rename one (<model>-s<seed>)")
    runs = {n: Path(r) for n, r in zip(names, args.runs)}
    for run in runs.values():  # not "metrics.jsonl is missing: train --resume" for a folder that is no run
        if not (run / "train_config.json").is_file():
            p.error(f"{run} is not a training run folder (no train_config.json): pass folders made by "
                    "`python -m experiments train`")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file, not a folder: pass a folder")
    from interventions.zoo.train import RunFolderError

    try:  # bad input (a folder that is no run, two runs of one seed): exit 2 before anything is written
        curves = training_curves(runs)
    except RunFolderError as e:
        p.error(str(e))
    windows = training_windows(curves)
    try:
        seeds = spread(windows)
    except ValueError as e:  # two runs of one model and seed
        p.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from interventions.zoo.provenance import provenance
    from interventions.zoo.train import atomic_write_text, sha256_file

    atomic_write_text(out / "training_curves.csv", curves.to_csv(index=False))
    atomic_write_text(out / "training_windows.csv", windows.to_csv(index=False))
    atomic_write_text(out / "seed_spread.json", json.dumps(seeds, indent=1) + "\n")
    atomic_write_text(out / "provenance.json", json.dumps(provenance(  # the runs' logs these tables were read from
        config={"runs": {n: str(r) for n, r in runs.items()}},
        metrics_sha256={n: sha256_file(Path(r) / "metrics.jsonl") for n, r in runs.items()}), indent=1, default=str))
    figure(curves, out)
    print(windows.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
