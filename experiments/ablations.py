"""Argument 3: which heads carry the in-context learning (ablations).

On a trained model's final checkpoint, over fixed validation windows (the run's own, see
``phase_change.eval_windows``):

* every head ablated **alone**, three ways (zero, mean, pattern-preserving zero): the change in loss
  at each token index and the head's **share of the ICL score** removed,
  ``share = (ICL_ablated - ICL_clean) / -ICL_clean`` (ICL is negative when context helps; 1 = the
  head carries all of it, negative = ablating it makes the ICL score larger);
* head **sets** (pattern-preserving zero ablation, the paper's kind): the induction heads chosen by
  the library's rule (``classify_induction_heads``: prefix matching and copying), random control
  sets of the same size from the non-induction heads only (distinct sets: ``random_head_sets``), and all
  other heads together
  (reported in nats only: ablating most of a model breaks it, so a share of the ICL score means
  little there).

Standard errors: every ICL number here is a mean over windows of a per-window difference; a share's
s.e. comes from a bootstrap over windows (``N_BOOT`` resamples, fixed seed), which keeps the pairing
of clean and ablated losses on the same window. Both are the library's
(``interventions.analysis.icl_ablation``); ``icl_share`` fixes this experiment's tokens and bands.

* **before-and-after attribution** over training, at checkpoints inside the ICL window (>= 5) and a
  few outside: each head's ablation change in per-token losses projected on the change across the
  phase change, ``-<delta_ablation, loss_after - loss_before> / |loss_after - loss_before|^2`` (+1:
  ablating the head alone undoes the whole phase change on those tokens).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from interventions import PatternPreserving, ZeroAblation
from interventions.primitives.loss import per_token_loss_sets
from interventions.engine.heads import Head
from interventions.analysis.icl_ablation import icl_share_from_losses
from interventions.analysis.metrics import icl_band, icl_band_losses, icl_indices
from interventions.engine.adapters import get_adapter
from interventions.zoo.train import RunFolderError, TrainConfig, list_checkpoints, load_model

from .common import Results, fingerprint, owns_results, run_fingerprint, run_setting
from .phase_change import (edge_checkpoint, eval_windows, induction_heads_of, run_config, run_source, step_tokens,
                           window_losses)

KINDS = ("zero", "mean", "pattern")
N_BOOT = 1000
MIN_WINDOWS = 8  # the zero / mean sweeps run on a quarter of the windows: at least 2 each, for a standard error


def icl_share(clean: torch.Tensor, ablated: torch.Tensor, seed: int) -> dict:
    """The library's ``icl_share_from_losses`` with the experiments' ICL tokens and bands
    (``icl_indices(pos)``, ``icl_band(pos)``) and ``N_BOOT`` resamples: clean and ablated (n_windows,
    pos - 1) losses of the same windows -> share removed, ICL change (nats) and their paired s.e."""
    pos = clean.shape[1] + 1
    return icl_share_from_losses(clean, ablated, *icl_indices(pos), icl_band(pos), N_BOOT, seed)


def random_head_sets(others: list, size: int, n: int, seed: int) -> list[list]:
    """The random control's head sets: ``n`` distinct sets of ``size`` heads from ``others`` (the
    non-induction heads), each in ``others``' order. Every possible set (``itertools.combinations``' order)
    when there are at most ``n`` (``math.comb(len(others), size)``), so fewer than ``n`` then; else ``n``
    drawn by a generator seeded ``seed``, a set drawn again rejected. No set ([]) when ``size`` is 0 or
    exceeds ``len(others)``.

        >>> random_head_sets(["a", "b", "c"], 2, 6, seed=0)
        [['a', 'b'], ['a', 'c'], ['b', 'c']]
    """
    if size <= 0 or size > len(others):
        return []
    if math.comb(len(others), size) <= n:
        return [list(c) for c in itertools.combinations(others, size)]
    g = np.random.default_rng(seed)
    picks: list[tuple] = []
    while len(picks) < n:  # one seeded choice per draw, as before; a repeated set is drawn again
        pick = tuple(sorted(g.choice(len(others), size=size, replace=False).tolist()))
        if pick not in picks:
            picks.append(pick)
    return [[others[i] for i in pick] for pick in picks]


def set_losses(model, windows: torch.Tensor, sets: dict[str, list], progress: bool | None = None
               ) -> dict[str, torch.Tensor]:
    """Per-token losses (n_windows, pos - 1) with each set's heads pattern-preservingly zero-ablated together
    (an empty set: the clean run). All on the eager attention path that pattern preservation runs on
    (``observable``), the clean run included: SDPA's clean loss differs from it in low precision, so a
    change from it would mix the two paths (``per_token_loss_sets``, which also reads each chunk's clean
    patterns once for all sets)."""
    return per_token_loss_sets(model, windows, {name: [PatternPreserving(ZeroAblation(heads))] if heads else []
                                                for name, heads in sets.items()}, batch_size=64, progress=progress)


@owns_results()
def run_ablations(run: Path, name: str, head_scores: pd.DataFrame | None, results_root: Path,
                  windows_table: pd.DataFrame | None = None, n_windows: int = 1024, n_random: int = 6,
                  n_attribution_inside: int = 5, device: str = "cpu", progress: bool = True) -> Results:
    from interventions.primitives.sweep import ablation_sweep

    from .common import InputError

    if n_windows < MIN_WINDOWS:  # a sweep of no window crashed, of one gave a bootstrap s.e. of 0
        raise InputError(f"--windows {n_windows}: the ablations need at least {MIN_WINDOWS} windows (the per-head "
                         f"sweeps use a quarter and a half of them, at least 2 each for a standard error)")
    res = Results(results_root, f"ablations_{name}")
    cfg = run_config(run)
    source = run_source(run, cfg)  # refuses a corpus edited since the run was trained
    windows = eval_windows(cfg, n_windows, source)
    reference = eval_windows(TrainConfig.from_dict({**cfg.to_dict(), "seed": cfg.seed + 100}), min(n_windows, 256),
                             source)
    ckpts = list_checkpoints(run)
    if not ckpts:
        raise RunFolderError(f"{run} has no complete checkpoint: train it first, or resume it with `train --resume`")
    model = load_model(ckpts[-1], device)
    a = get_adapter(model)
    ind = induction_heads_of(model, windows, cfg.seed)
    rule = "classify_induction_heads"
    if not ind:  # no head passes the rule (e.g. a model without induction): say so in the tables
        rule = "none passed classify_induction_heads"
    res.write_provenance({"run": run_setting(res, run), "model": name, "n_windows": n_windows, "n_random": n_random,
                          "induction_heads": [str(h) for h in ind], "rule": rule}, seed=cfg.seed)
    all_heads = [Head(layer, h) for layer in range(a.n_layers) for h in range(a.n_heads)]
    key = {"run": run_fingerprint(run), "n_windows": n_windows, "n_random": n_random,
           "induction_heads": [str(h) for h in ind]}  # tables are recomputed when any of these change

    if not res.has_all(["per_head", "per_head_by_index"], key):
        rows, by_index = [], []
        for kind in KINDS:
            # the paper's kind (pattern) on half the windows, the zero / mean comparisons on a quarter
            sub = windows[:n_windows // 2] if kind == "pattern" else windows[:n_windows // 4]
            clean, delta = ablation_sweep(model, sub, kind=kind,
                                          reference=reference if kind == "mean" else None,
                                          progress=progress)
            for i, head in enumerate(all_heads):
                r = icl_share(clean, clean + delta[i], cfg.seed)
                rows.append({"model": name, "kind": kind, "layer": head.layer, "head": head.head,
                             "head_name": str(head), "is_induction": head in ind,
                             "icl_clean": r["icl_clean"], "icl_ablated": r["icl_ablated"],
                             "icl_change": r["icl_change"], "icl_change_sem": r["icl_change_sem"],
                             "icl_share": r["share_removed"], "icl_share_sem": r["share_removed_sem"],
                             "mean_delta_loss": delta[i].mean().item(),
                             "late_delta_loss": float(icl_band_losses(delta[i], *icl_indices(windows.shape[1]),
                                                                      icl_band(windows.shape[1]))[1].mean())})
                d = delta[i].mean(0).numpy()
                by_index.append(pd.DataFrame({"model": name, "kind": kind, "head_name": str(head),
                                              "token_index": np.arange(1, len(d) + 1), "delta_loss": d}))
        res.write("per_head_by_index", pd.concat(by_index), inputs=key)
        res.write("per_head", pd.DataFrame(rows), inputs=key)

    # tables of random sets drawn with repeats (before ``random_head_sets``) are recomputed
    skey = {**key, "random_sets": "distinct"}
    if not res.has_all(["sets", "sets_by_index"], skey):
        others = [h for h in all_heads if h not in ind]
        sets: dict[str, list] = {"clean": [], "induction heads": ind, "all other heads": others}
        for r, heads in enumerate(random_head_sets(others, len(ind), n_random, cfg.seed)):
            sets[f"random {r}"] = heads
        rows, by_index = [], []
        all_losses = set_losses(model, windows, sets, progress)
        for set_name, heads in sets.items():
            losses = all_losses[set_name]
            r = icl_share(all_losses["clean"], losses, cfg.seed)
            share, share_se = (r["share_removed"], r["share_removed_sem"]) if heads else (0.0, 0.0)
            group = "random (non-induction)" if set_name.startswith("random") else set_name
            rows.append({"model": name, "set": set_name, "group": group, "n_heads": len(heads),
                         "heads": " ".join(map(str, heads)), "icl_score": r["icl_ablated"],
                         "icl_sem": r["icl_ablated_sem"], "icl_change": r["icl_change"],
                         "icl_change_sem": r["icl_change_sem"],
                         "icl_share_removed": share, "icl_share_removed_sem": share_se,
                         "val_loss": losses.mean().item()})
            n = losses.shape[0]
            by_index.append(pd.DataFrame({"model": name, "set": set_name, "group": group,
                                          "token_index": np.arange(1, losses.shape[1] + 1),
                                          "loss": losses.mean(0).numpy(),
                                          "sem": (losses.std(0) / math.sqrt(n)).numpy()}))
        res.write("sets_by_index", pd.concat(by_index), inputs=skey)
        res.write("sets", pd.DataFrame(rows), inputs=skey)

    akey = {**key, "n_attribution_inside": n_attribution_inside,
            "windows": None if windows_table is None else fingerprint(windows_table[windows_table.model == name]
                                                                     .to_dict("records"))}
    if not res.has("attribution", akey) and windows_table is not None and len(ckpts) >= 3:
        res.write("attribution", _attribution(ckpts, cfg, name, windows[:128], windows_table, n_attribution_inside,
                                              device, progress, res, akey), inputs=akey)
    return res


def attribution_checkpoints(ckpts: list[Path], cfg: TrainConfig, start: float, end: float,
                            n_inside: int) -> list[Path]:
    """``n_inside`` checkpoints spread through [start, end] (all when fewer), plus the first and the last
    checkpoint before the window and after it, oldest first."""
    tok = np.array([step_tokens(c, cfg)[1] for c in ckpts], dtype=float)
    inside = np.flatnonzero((tok >= start) & (tok <= end))
    pick = set(inside[np.unique(np.round(np.linspace(0, len(inside) - 1, min(n_inside, len(inside)))).astype(int))]
               .tolist()) if len(inside) else set()
    before = np.flatnonzero((tok < start) & (tok > 0))
    after = np.flatnonzero(tok > end)
    for side in (before, after):
        if len(side):
            pick |= set(side[np.unique(np.round(np.linspace(0, len(side) - 1, 2)).astype(int))].tolist())
    return [ckpts[i] for i in sorted(pick)]


def _attribution(ckpts, cfg, name, windows, windows_table, n_inside, device, progress, res=None,
                 key=None) -> pd.DataFrame:
    """Before-and-after attribution of each head at checkpoints through the ICL window. With ``res``,
    each checkpoint's rows are kept as a table of their own (keyed on ``key``), so an interrupted
    attribution resumes at the next checkpoint."""
    from tqdm.auto import tqdm

    from interventions.primitives.sweep import ablation_sweep

    w = windows_table[windows_table.model == name].iloc[0]
    start, end = w.icl_window_start_tokens, w.icl_window_end_tokens
    if not (np.isfinite(start) and np.isfinite(end)):
        return pd.DataFrame(columns=["model", "step", "tokens", "layer", "head", "head_name", "attribution",
                                     "in_window"])
    before, after = edge_checkpoint(ckpts, cfg, start, "before"), edge_checkpoint(ckpts, cfg, end, "after")
    l_before = window_losses(load_model(before, device), windows)
    l_after = window_losses(load_model(after, device), windows)
    phase = l_after - l_before
    norm2 = (phase ** 2).sum().item()
    rows = []
    for ckpt in tqdm(attribution_checkpoints(ckpts, cfg, start, end, n_inside), desc=f"attribution {name}",
                     disable=not progress):
        step, tokens = step_tokens(ckpt, cfg)
        part = f"attribution_step_{step:08d}"
        if res is not None and res.has(part, key):
            rows += res.read(part).to_dict("records")
            continue
        model = load_model(ckpt, device)
        a = get_adapter(model)
        _, delta = ablation_sweep(model, windows, kind="pattern", progress=False)  # the bar over checkpoints
        new = [{"model": name, "step": step, "tokens": tokens, "layer": layer, "head": head,
                "head_name": f"L{layer}H{head}", "attribution": -(delta[j] * phase).sum().item() / norm2,
                "in_window": bool(start <= tokens <= end),
                "before_step": step_tokens(before, cfg)[0], "after_step": step_tokens(after, cfg)[0]}
               for j, (layer, head) in enumerate(divmod(j, a.n_heads) for j in range(a.n_layers * a.n_heads))]
        if res is not None:
            res.write(part, pd.DataFrame(new), inputs=key)
        rows += new
    return pd.DataFrame(rows)
