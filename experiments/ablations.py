"""Argument 3: which heads carry the in-context learning (ablations).

On a trained model's final checkpoint, over fixed validation windows:
  * every head ablated alone, three ways (zero, mean, pattern-preserving zero): the change in loss at
    each token index, and the head's share of the ICL score (the fraction of the ICL score that
    disappears: (ICL_ablated - ICL_clean) / -ICL_clean; ICL is negative when context helps);
  * all induction heads vs all other heads vs random sets of the same size (pattern-preserving);
  * before-and-after attribution over training: at each checkpoint, each head's ablation change in
    per-token losses projected on the change across the phase change
    (attribution = -<delta_ablation, loss_after - loss_before> / |loss_after - loss_before|^2;
    +1 means ablating the head alone undoes the whole phase change on those tokens).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from interventions import Head, PatternPreserving, ZeroAblation, per_token_loss
from interventions.engine.adapters import get_adapter
from interventions.analysis.metrics import icl_from_losses, icl_indices
from interventions.zoo.train import RunFolderError, TrainConfig, list_checkpoints, load_model, load_train_config

from .common import Results, fingerprint, owns_results, run_fingerprint
from .phase_change import eval_windows

KINDS = ("zero", "mean", "pattern")
INDUCTION_THRESHOLD = 0.4  # TransformerLens-style induction score; see interventions.analysis.scores


def _icl(losses: torch.Tensor, early: int, late: int) -> float:
    return icl_from_losses(losses, early, late)["icl_score"]


def induction_heads(head_scores: pd.DataFrame, model: str, threshold: float = INDUCTION_THRESHOLD,
                    min_heads: int = 1) -> list[Head]:
    """Heads of ``model`` whose final induction score exceeds ``threshold`` (at least the top one)."""
    hs = head_scores[(head_scores.model == model) & (head_scores.score == "induction")]
    final = hs[hs.step == hs.step.max()].sort_values("value", ascending=False)
    chosen = [Head(int(r.layer), int(r.head)) for r in final.itertuples() if r.value > threshold]
    if len(chosen) < min_heads:
        chosen = [Head(int(r.layer), int(r.head)) for r in final.head(min_heads).itertuples()]
    return chosen


@owns_results()
def run_ablations(run: Path, name: str, head_scores: pd.DataFrame, results_root: Path,
                  windows_table: pd.DataFrame | None = None, n_windows: int = 64, n_random: int = 10,
                  n_attribution_ckpts: int = 10, device: str = "cpu", progress: bool = True) -> Results:
    from interventions.primitives.sweep import ablation_sweep

    res = Results(results_root, f"ablations_{name}")
    cfg = load_train_config(run)
    windows = eval_windows(cfg, n_windows)
    reference = eval_windows(TrainConfig.from_dict({**cfg.to_dict(), "seed": cfg.seed + 100}), n_windows)
    early, late = icl_indices(windows.shape[1])
    ckpts = list_checkpoints(run)
    if not ckpts:
        raise RunFolderError(f"{run} has no complete checkpoint: train it first, or resume it with `train --resume`")
    model = load_model(ckpts[-1], device)
    a = get_adapter(model)
    ind = induction_heads(head_scores, name)
    res.write_provenance({"run": str(run), "model": name, "n_windows": n_windows, "n_random": n_random,
                          "induction_heads": [str(h) for h in ind], "threshold": INDUCTION_THRESHOLD},
                         seed=cfg.seed)
    key = {"run": run_fingerprint(run), "n_windows": n_windows, "n_random": n_random,
           "induction_heads": [str(h) for h in ind]}  # tables are recomputed when any of these change

    if not res.has_all(["per_head", "per_head_by_index"], key):
        rows, by_index = [], []
        for kind in KINDS:
            clean, delta = ablation_sweep(model, windows, kind=kind, reference=reference if kind == "mean" else None,
                                          progress=progress)
            icl_clean = _icl(clean, early, late)
            heads = [Head(layer, h) for layer in range(a.n_layers) for h in range(a.n_heads)]
            for i, head in enumerate(heads):
                ablated = clean + delta[i]
                icl_abl = _icl(ablated, early, late)
                rows.append({"model": name, "kind": kind, "layer": head.layer, "head": head.head,
                             "head_name": str(head), "icl_clean": icl_clean, "icl_ablated": icl_abl,
                             "icl_share": (icl_abl - icl_clean) / -icl_clean if icl_clean < 0 else float("nan"),
                             "mean_delta_loss": delta[i].mean().item(),
                             "late_delta_loss": delta[i][:, late - 2].mean().item()})
                d = delta[i].mean(0).numpy()
                by_index.append(pd.DataFrame({"model": name, "kind": kind, "head_name": str(head),
                                              "token_index": np.arange(1, len(d) + 1), "delta_loss": d}))
        res.write("per_head_by_index", pd.concat(by_index), inputs=key)
        res.write("per_head", pd.DataFrame(rows), inputs=key)

    if not res.has_all(["sets", "sets_by_index"], key):
        all_heads = [Head(layer, h) for layer in range(a.n_layers) for h in range(a.n_heads)]
        others = [h for h in all_heads if h not in ind]
        g = np.random.default_rng(cfg.seed)
        sets = {"clean": [], "induction heads": ind, "other heads": others}
        for r in range(n_random):
            pick = g.choice(len(all_heads), size=len(ind), replace=False)
            sets[f"random {r}"] = [all_heads[i] for i in pick]
        rows, by_index = [], []
        clean = per_token_loss(model, windows, batch_size=32)
        icl_clean = _icl(clean, early, late)
        for set_name, heads in sets.items():
            abl = [PatternPreserving(ZeroAblation(heads))] if heads else None
            losses = clean if not heads else per_token_loss(model, windows, abl, batch_size=32)
            icl = _icl(losses, early, late)
            group = "random" if set_name.startswith("random") else set_name
            rows.append({"model": name, "set": set_name, "group": group, "n_heads": len(heads),
                         "heads": " ".join(map(str, heads)), "icl_score": icl,
                         "icl_share_removed": (icl - icl_clean) / -icl_clean if icl_clean < 0 else float("nan"),
                         "val_loss": losses.mean().item()})
            n = losses.shape[0]
            by_index.append(pd.DataFrame({"model": name, "set": set_name, "group": group,
                                          "token_index": np.arange(1, losses.shape[1] + 1),
                                          "loss": losses.mean(0).numpy(),
                                          "sem": (losses.std(0) / math.sqrt(n)).numpy()}))
        res.write("sets_by_index", pd.concat(by_index), inputs=key)
        res.write("sets", pd.DataFrame(rows), inputs=key)

    akey = {**key, "n_attribution_ckpts": n_attribution_ckpts,
            "windows": None if windows_table is None else fingerprint(windows_table[windows_table.model == name]
                                                                     .to_dict("records"))}
    if not res.has("attribution", akey) and windows_table is not None and len(ckpts) >= 3:
        res.write("attribution", _attribution(ckpts, cfg, name, windows, windows_table, n_attribution_ckpts,
                                              device, progress), inputs=akey)
    return res


def _attribution(ckpts, cfg, name, windows, windows_table, n_pick, device, progress) -> pd.DataFrame:
    """Before-and-after attribution of each head at a log-spaced selection of checkpoints."""
    from tqdm.auto import tqdm

    from interventions.primitives.sweep import ablation_sweep

    w = windows_table[windows_table.model == name].iloc[0]
    steps = np.array([int(c.name.split("-")[1]) for c in ckpts])
    tokens = steps * cfg.batch_size * cfg.n_ctx
    start, end = w.window_start_tokens, w.window_end_tokens
    if not (np.isfinite(start) and np.isfinite(end)):
        start, end = tokens[len(tokens) // 3], tokens[-1]
    before = ckpts[int(np.searchsorted(tokens, start, side="right")) - 1 if tokens[0] <= start else 0]
    after = ckpts[min(int(np.searchsorted(tokens, end)), len(ckpts) - 1)]
    l_before = per_token_loss(load_model(before, device), windows, batch_size=32)
    l_after = per_token_loss(load_model(after, device), windows, batch_size=32)
    phase = l_after - l_before
    norm2 = (phase ** 2).sum().item()
    pick = sorted(set(np.unique(np.round(np.linspace(0, len(ckpts) - 1, n_pick)).astype(int)).tolist()))
    rows = []
    for i in tqdm(pick, desc=f"attribution {name}", disable=not progress):
        model = load_model(ckpts[i], device)
        a = get_adapter(model)
        _, delta = ablation_sweep(model, windows, kind="pattern")
        for j in range(a.n_layers * a.n_heads):
            layer, head = divmod(j, a.n_heads)
            rows.append({"model": name, "step": int(steps[i]), "tokens": int(tokens[i]), "layer": layer,
                         "head": head, "head_name": f"L{layer}H{head}",
                         "attribution": -(delta[j] * phase).sum().item() / norm2,
                         "before_step": int(before.name.split("-")[1]), "after_step": int(after.name.split("-")[1])})
    return pd.DataFrame(rows)
