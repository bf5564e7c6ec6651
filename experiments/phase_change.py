"""Argument 1 (phase change) and the per-token-loss analysis, measured at every checkpoint.

For each model of the zoo and each of its checkpoints: validation loss, ICL score (with standard
error), loss by token index, head scores (induction, prefix matching, previous token), and the
per-token losses on a fixed set of (window, position) pairs. Then, per model: the phase-change
window (where the best head's induction score rises fastest against log tokens) and the loss-curve
bump (the stretch where the loss, against log tokens, bends downwards: the non-convex stretch).

Tables (``results/<run>/phase_change/``): ``checkpoints`` (model x step), ``loss_by_index`` (model x
step x token_index), ``head_scores`` (model x step x layer x head x score), ``windows`` (model:
phase-change window and bump), ``pca`` (model x step: PC1, PC2 of per-token losses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from interventions.primitives.loss import loss_by_position, per_token_loss
from interventions.analysis.metrics import icl_from_losses, icl_indices
from interventions.zoo.train import RunFolderError, TrainConfig, build_source, list_checkpoints, load_model, load_train_config

from .common import Results, owns_results, run_fingerprint

N_PCA_WINDOWS = 16
MIN_RISE = 0.1  # induction-score rise (attention share) below which no phase-change window is reported  # windows whose per-token losses enter the PCA (x every position)


def eval_windows(cfg: TrainConfig, n: int) -> torch.Tensor:
    source, _, _ = build_source(cfg)
    return source.eval_windows(n, cfg.n_ctx, seed=cfg.seed + 1)


def probe_kwargs(model) -> dict:
    """Probe tokens for head scores, by model: byte-level models (vocab 257, separator 256) get
    printable ASCII (32-126) with the separator as BOS; small synthetic vocabularies use every id;
    other models the scores' defaults. Sequence lengths shrink to fit short contexts."""
    c = model.config
    n_ctx = getattr(c, "n_ctx", None) or getattr(c, "max_position_embeddings", 1024)
    kw: dict = {"seq_len": min(50, (n_ctx - 1) // 2), "prefix_tokens": min(25, (n_ctx - 1) // 4)}
    if c.model_type == "attn_only" and c.vocab_size == 257:
        kw.update(bos_id=256, vocab_range=(32, 127))
    elif c.vocab_size < 1000:
        kw.update(bos_id=0, vocab_range=(1, c.vocab_size), exclude_top=0.0)
        kw["seq_len"] = min(kw["seq_len"], c.vocab_size - 2)
        kw["prefix_tokens"] = min(kw["prefix_tokens"], c.vocab_size - 2)
    return kw


def head_score_rows(model, windows: torch.Tensor, seed: int = 0) -> pd.DataFrame:
    """Induction, prefix-matching, copying and previous-token scores of every head (long format)."""
    from interventions.analysis import scores

    df = scores.head_scores(model, windows=windows[:16], seed=seed, **probe_kwargs(model))
    keep = [c for c in ("induction", "prefix_matching", "previous_token", "copying", "duplicate_token")
            if c in df.columns]
    return df.melt(id_vars=["layer", "head"], value_vars=keep, var_name="score", value_name="value")


def evaluate_checkpoint(model, windows: torch.Tensor, batch_size: int = 32, seed: int = 0):
    losses = per_token_loss(model, windows, batch_size=batch_size)  # (n, pos-1)
    icl = icl_from_losses(losses, *icl_indices(windows.shape[1]))
    row = {"val_loss": losses.mean().item(), "icl_score": icl["icl_score"], "icl_sem": icl["sem"],
           "icl_early": icl["early"], "icl_late": icl["late"]}
    by_index = loss_by_position(losses).drop(columns="n")
    return row, by_index, head_score_rows(model, windows, seed), losses[:N_PCA_WINDOWS].flatten().numpy()


@owns_results()
def run_phase_change(runs: dict[str, Path], results_root: Path, n_windows: int = 128, device: str = "cpu",
                     progress: bool = True) -> Results:
    """Evaluate every checkpoint of every run (skipping models already done) and detect windows."""
    from tqdm.auto import tqdm

    res = Results(results_root, "phase_change")
    # settings shared by every table; each run's tables are keyed on the run's content (so runs can be added)
    res.write_provenance({"n_windows": n_windows}, runs={k: str(v) for k, v in runs.items()})
    for name, run in runs.items():
        table = f"checkpoints_{name}"
        key = {"run": run_fingerprint(run), "n_windows": n_windows}  # recomputed when the run changes
        if res.has_all([table, f"loss_by_index_{name}", f"head_scores_{name}"], key) and res.has_array(
                f"per_token_losses_{name}", key):
            continue
        cfg = load_train_config(run)
        windows = eval_windows(cfg, n_windows)
        rows, by_idx, heads, vectors = [], [], [], []
        ckpts = list_checkpoints(run)
        for ckpt in tqdm(ckpts, desc=f"evaluate {name}", disable=not progress):
            step = int(ckpt.name.split("-")[1])
            tokens = step * cfg.batch_size * cfg.n_ctx
            model = load_model(ckpt, device)
            row, bi, hs, vec = evaluate_checkpoint(model, windows, seed=cfg.seed)
            rows.append({"model": name, "step": step, "tokens": tokens, **row})
            by_idx.append(bi.assign(model=name, step=step, tokens=tokens))
            heads.append(hs.assign(model=name, step=step, tokens=tokens))
            vectors.append(vec)
        if not ckpts:
            raise RunFolderError(f"{run} has no complete checkpoint (none with a verified manifest): train it "
                                 "first, or resume it with `train --resume`")
        res.write(f"loss_by_index_{name}", pd.concat(by_idx), inputs=key)
        res.write(f"head_scores_{name}", pd.concat(heads), inputs=key)
        res.write_array(f"per_token_losses_{name}", np.stack(vectors), inputs=key)
        res.write(table, pd.DataFrame(rows), inputs=key)  # written last: marks the model done
    ck = pd.concat([res.read(f"checkpoints_{n}") for n in runs])
    hs = pd.concat([res.read(f"head_scores_{n}") for n in runs])
    res.write("checkpoints", ck)
    res.write("head_scores", hs)
    res.write("loss_by_index", pd.concat([res.read(f"loss_by_index_{n}") for n in runs]))
    res.write("windows", detect_windows(ck, hs))
    res.write("training", training_table(runs))
    res.write("pca", pca_trajectories({n: res.read_array(f"per_token_losses_{n}") for n in runs}, ck))
    return res


def training_table(runs: dict[str, Path]) -> pd.DataFrame:
    """The trainer's metrics.jsonl of every run (step, tokens, losses, ICL, repeated-token check),
    with the wall-clock seconds since the run started at each checkpoint (from checkpoint times)."""
    from interventions.zoo.train import read_metrics

    frames = []
    for name, run in runs.items():
        df = pd.DataFrame(read_metrics(run)).assign(model=name)
        t0 = (run / "train_config.json").stat().st_mtime
        wall = {int(c.name.split("-")[1]): c.stat().st_mtime - t0 for c in list_checkpoints(run)}
        df["wall_s"] = df.step.map(wall)
        frames.append(df)
    return pd.concat(frames)


def _fastest_rise(x: np.ndarray, y: np.ndarray, frac: float = 0.5) -> tuple[float, float, float]:
    """(start, end, peak) in x of the contiguous stretch around the steepest rise of y(x) where the
    slope stays above ``frac`` of its maximum. x should be log10 tokens; y lightly smoothed first."""
    if len(x) < 4:
        return (float("nan"),) * 3
    ys = np.convolve(np.pad(y, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    slope = np.gradient(ys, x)
    i = int(np.argmax(slope))
    if slope[i] <= 0:
        return (float("nan"),) * 3
    lo = hi = i
    while lo > 0 and slope[lo - 1] >= frac * slope[i]:
        lo -= 1
    while hi < len(x) - 1 and slope[hi + 1] >= frac * slope[i]:
        hi += 1
    return float(x[max(lo - 1, 0)]), float(x[min(hi + 1, len(x) - 1)]), float(x[i])


def detect_windows(checkpoints: pd.DataFrame, head_scores: pd.DataFrame) -> pd.DataFrame:
    """Per model: the phase-change window (steepest rise of the best induction score; also of -ICL)
    and the loss bump (where loss against log tokens is most concave), in tokens."""
    rows = []
    for model, ck in checkpoints.groupby("model"):
        ck = ck[ck.tokens > 0].sort_values("tokens")
        x = np.log10(ck.tokens.to_numpy(dtype=float))
        ind = (head_scores[(head_scores.model == model) & (head_scores.score == "induction")]
               .groupby("tokens").value.max().reindex(ck.tokens).to_numpy())
        ind = np.nan_to_num(ind)
        # no window when the best induction score never rises by MIN_RISE (e.g. a vanilla 1-layer model)
        s, e, p = _fastest_rise(x, ind) if ind.max() - ind[0] >= MIN_RISE else (float("nan"),) * 3
        si, ei, pi = _fastest_rise(x, -ck.icl_score.to_numpy())
        # bump: concave stretch of loss(log tokens) after warm-up (second difference < 0)
        loss = np.convolve(np.pad(ck.val_loss.to_numpy(), 1, mode="edge"), np.ones(3) / 3, mode="valid")
        curv = np.gradient(np.gradient(loss, x), x)
        # ignore the initial fall from uniform: only checkpoints past 5% of the run's tokens
        half = int(np.searchsorted(x, x[-1] + np.log10(0.05)))
        j = half + int(np.argmin(curv[half:])) if len(x) > 3 else 0
        bump = curv[j] < 0
        lo = hi = j
        while bump and lo > half and curv[lo - 1] < 0:
            lo -= 1
        while bump and hi < len(x) - 1 and curv[hi + 1] < 0:
            hi += 1
        final_ind = float(np.nan_to_num(ind)[-1]) if len(ind) else float("nan")
        rows.append({"model": model, "window_start_tokens": 10 ** s, "window_end_tokens": 10 ** e,
                     "window_peak_tokens": 10 ** p, "icl_window_start_tokens": 10 ** si,
                     "icl_window_end_tokens": 10 ** ei, "bump": bool(bump),
                     "bump_start_tokens": 10 ** x[lo] if bump else float("nan"),
                     "bump_end_tokens": 10 ** x[hi] if bump else float("nan"),
                     "final_max_induction": final_ind, "final_icl": float(ck.icl_score.iloc[-1])})
    return pd.DataFrame(rows)


def pca_trajectories(vectors: dict[str, np.ndarray], checkpoints: pd.DataFrame) -> pd.DataFrame:
    """Project every checkpoint's per-token-loss vector (all models jointly) on 2 principal components."""
    names = [n for n in vectors if vectors[n].size]
    if not names:
        return pd.DataFrame(columns=["model", "step", "tokens", "pc1", "pc2"])
    length = min(v.shape[1] for v in vectors.values())
    X = np.concatenate([vectors[n][:, :length] for n in names])
    Xc = X - X.mean(0)
    _, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    pcs = Xc @ Vt[:2].T
    var = (S[:2] ** 2 / (S ** 2).sum()).tolist()
    rows, i = [], 0
    for n in names:
        ck = checkpoints[checkpoints.model == n].sort_values("step")
        for (_, r), v in zip(ck.iterrows(), pcs[i:i + len(vectors[n])]):
            rows.append({"model": n, "step": r.step, "tokens": r.tokens, "pc1": v[0], "pc2": v[1],
                         "var_pc1": var[0], "var_pc2": var[1]})
        i += len(vectors[n])
    return pd.DataFrame(rows)
