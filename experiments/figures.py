"""Paper figures, made only from result tables: ``python -m experiments figures --results R --out figures``.

One shared style (``style()``); every figure saved as PNG and PDF; axes labelled with units.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .common import ResultError, Results, made_from_another_run, tables_fingerprint

COLUMN_WIDTH = 3.4  # inches: a paper column


def style():
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", font_scale=1.0,
                  rc={"figure.dpi": 150, "savefig.dpi": 300, "axes.titlesize": 9, "axes.labelsize": 8,
                      "legend.fontsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7,
                      "savefig.bbox": "tight", "pdf.fonttype": 42})
    return sns


# One colour per model in every figure (a model's seeds share it): the reproduction's four models first, in
# the colours the figures gave them before there was this table; any other model (a survey's, a custom
# run) takes the next palette colours in order of appearance.
MODEL_ORDER = ("attn-1l", "attn-2l", "smear-1l", "smear-2l")


def model_colors(models) -> dict[str, tuple]:
    """Colour of each name in ``models`` (runs ``attn-2l-s1`` get their model's), the same in every figure.

        >>> c = model_colors(["smear-2l-s1", "gpt2", "attn-1l"])
        >>> c["smear-2l-s1"] == model_colors(["smear-2l"])["smear-2l"], c["gpt2"] == c["attn-1l"]
        (True, False)
    """
    import seaborn as sns

    from .zoo import split_run_name

    palette = sns.color_palette("deep", 10)
    fams = list(dict.fromkeys(split_run_name(str(m))[0] for m in models))
    others = [f for f in fams if f not in MODEL_ORDER]
    index = {f: i for i, f in enumerate(MODEL_ORDER)} | {f: len(MODEL_ORDER) + i for i, f in enumerate(others)}
    return {m: palette[index[split_run_name(str(m))[0]] % len(palette)] for m in models}


def _si(value: float, _pos=None) -> str:
    """A token count as the report writes it: 2e5 -> "200k", 6e6 -> "6M" (not 10^6: the report's numbers)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values of a log axis from ``lo`` to ``hi``: the powers of ten, or 1-2-5 / 1-3 steps where fewer
    than three powers of ten lie inside (a run of under two decades had one lone tick label, "10^6").

        >>> _log_ticks(1e3, 2e7), _log_ticks(1e5, 6e6), _log_ticks(2e6, 9e6)
        ([1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0], [100000.0, 300000.0, 1000000.0, 3000000.0], [2000000.0, 5000000.0])
    """
    ticks: list[float] = []
    for subs in ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [float(s * 10.0 ** k) for k in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
                 for s in subs if lo <= s * 10.0 ** k <= hi]
        if len(ticks) >= 3 or (len(ticks) >= 2 and len(subs) > 1):
            break
    return ticks


def _log_axis(ax, which: str = "x", tokens: bool = True) -> None:
    """Make ``ax``'s ``which`` axis logarithmic with at least two labelled ticks (``_log_ticks`` of its
    current limits: call after plotting), labelled ``_si`` for tokens, plainly (1, 10, 100) otherwise;
    unlabelled minor ticks in between."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    axis.set_major_locator(FixedLocator(_log_ticks(max(lo, 1e-12), hi)))
    axis.set_major_formatter(FuncFormatter(_si if tokens else lambda v, _pos=None: f"{v:g}"))
    axis.set_minor_locator(LogLocator(subs="auto"))
    axis.set_minor_formatter(NullFormatter())


def _legend_below(fig, ax, ncol: int = 2, title: str | None = None) -> None:
    """``ax``'s legend under the figure (``fig`` made with ``layout="constrained"``), where it can cover no
    data: inside the axes it sat on curves (training curves of attn-1l) or bands."""
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False, title=title,
               title_fontsize=7, columnspacing=1.2, handlelength=1.8)


def save_figure(fig, out: Path, name: str) -> list[Path]:
    """Save ``fig`` as ``out/name.png`` and ``.pdf`` and close it."""
    return _save(fig, out, name)


def _save(fig, out: Path, name: str) -> list[Path]:
    import os

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:  # via a temporary file and rename: an interrupted save never leaves a half-written figure
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        try:
            fig.savefig(tmp, format=p.suffix[1:])
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def _read(root: Path, exp: str, table: str) -> pd.DataFrame | None:
    """A table, or None if it was never written; a damaged one raises ResultError (never a silently
    missing figure)."""
    return Results(root, exp).read_optional(table)


def _twin_attn2l(win: pd.DataFrame | None, model: str) -> str | None:
    """The attn-2l run whose windows mark ``model``'s curves: of the same seed (runs ``<model>-s<k>``, as
    the PCA reference is), else the unseeded ``attn-2l``, else the first attn-2l run; None if there is none.

        >>> w = pd.DataFrame({"model": ["attn-2l-s0", "attn-2l-s1", "attn-1l-s1"]})
        >>> _twin_attn2l(w, "attn-1l-s1"), _twin_attn2l(w, "smear-1l"), _twin_attn2l(None, "attn-2l")
        ('attn-2l-s1', 'attn-2l-s0', None)
    """
    from .zoo import split_run_name

    if win is None:
        return None
    runs = [m for m in dict.fromkeys(win.model) if split_run_name(m)[0] == "attn-2l"]
    seed = split_run_name(model)[1]
    same = [m for m in runs if split_run_name(m)[1] == seed]
    return same[0] if same else (runs[0] if runs else None)


def _shade_window(ax, win, model=None, kind="icl", label=True):
    """Grey span: ``model``'s ``kind`` window (10%-90% of the rise) if it has one (default: the first
    attn-2l run, e.g. seed 0's where several seeds ran)."""
    model = model or _twin_attn2l(win, "")
    if win is None or model is None:
        return
    for r in win[win.model == model].itertuples():
        s, e = getattr(r, f"{kind}_window_start_tokens"), getattr(r, f"{kind}_window_end_tokens")
        if np.isfinite(s):
            ax.axvspan(s, e, color="0.85" if kind == "icl" else "0.93", zorder=0,
                       label=f"{model} {kind.upper() if kind == 'icl' else kind} window" if label else None)


def _families(models: pd.Series) -> pd.Series | None:
    """Each run's model (``attn-2l-s1`` -> ``attn-2l``) when some run is one of several seeds, else None.

        >>> _families(pd.Series(["attn-2l-s0", "attn-2l-s1"])).tolist(), _families(pd.Series(["attn-2l"]))
        (['attn-2l', 'attn-2l'], None)
    """
    from .zoo import split_run_name

    fam = models.map(lambda name: split_run_name(name)[0])
    return fam if (fam != models).any() else None


def _legend_outside(ax, title: str | None = None) -> None:
    ax.legend(frameon=False, title=title, title_fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")


SEED_BANDS = "mean; band: seed min-max"


def _seed_lines(ax, sns, d: pd.DataFrame, y: str, ylabel: str) -> None:
    """One line per model: the mean over its seeds at each token count, the band from the lowest to the
    highest seed (the seed spread, not a standard error; legend title ``SEED_BANDS``). Only the token
    counts every seed of a model has are drawn (elsewhere the mean and band would be over fewer seeds)."""
    d = d.assign(family=_families(d.model))
    n = d.groupby("family").model.nunique()
    shared = d.groupby(["family", "tokens"]).model.transform("nunique") == d.family.map(n)
    d = d[shared]
    colors = model_colors(list(d.family.unique()))
    d = d.assign(family=d.family.map(lambda f: f"{f} ({n[f]} seeds)"))
    palette = {f"{f} ({n[f]} seeds)": c for f, c in colors.items()}
    sns.lineplot(data=d, x="tokens", y=y, hue="family", palette=palette, errorbar=("pi", 100), lw=1, ax=ax, seed=0)
    ax.set_ylabel(ylabel)


def fig_icl_over_training(root: Path, out: Path):
    import matplotlib.pyplot as plt

    sns = style()
    ck, win = _read(root, "phase_change", "checkpoints"), _read(root, "phase_change", "windows")
    if ck is None:
        return []
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.7), layout="constrained")
    ck = ck[ck.tokens > 0]
    seeded = _families(ck.model) is not None
    if seeded:
        _seed_lines(ax, sns, ck, "icl_score", "ICL score (nats)\nloss[late] - loss[early]")
    else:
        colors = model_colors(list(ck.model.unique()))
        for model, d in ck.groupby("model", sort=False):
            d = d.sort_values("tokens")
            ax.plot(d.tokens, d.icl_score, color=colors[model], lw=1, label=model)
            ax.fill_between(d.tokens, d.icl_score - d.icl_sem, d.icl_score + d.icl_sem, color=colors[model],
                            alpha=0.2, lw=0)
        ax.set_ylabel("ICL score (nats; band: 1 s.e.)\nloss[late] - loss[early]")
    _shade_window(ax, win)  # seed 0's attn-2l window where several seeds ran
    ax.axhline(0, color="k", lw=0.5)
    _log_axis(ax)
    ax.set_xlabel("training tokens")
    ax.set_title("in-context learning score over training")
    _legend_below(fig, ax, ncol=2 if seeded else 3, title=SEED_BANDS if seeded else None)
    return _save(fig, out, "icl_over_training")


def fig_loss_curves(root: Path, out: Path):
    import matplotlib.pyplot as plt

    sns = style()
    ck, win = _read(root, "phase_change", "checkpoints"), _read(root, "phase_change", "windows")
    if ck is None:
        return []
    ck = ck[ck.tokens > 0]
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.7), layout="constrained")
    seeded = _families(ck.model) is not None
    if seeded:
        _seed_lines(ax, sns, ck, "val_loss", "validation loss (nats/token)")
    else:
        sns.lineplot(data=ck, x="tokens", y="val_loss", hue="model", palette=model_colors(list(ck.model.unique())),
                     ax=ax, seed=0)
        marked = False
        for r in (win.itertuples() if win is not None else ()):
            if r.bump and np.isfinite(r.bump_start_tokens):
                sub = ck[(ck.model == r.model) & (ck.tokens >= r.bump_start_tokens) & (ck.tokens <= r.bump_end_tokens)]
                # a marker too: a stretch of one checkpoint (start == end) is a point, which a line alone omits
                ax.plot(sub.tokens, sub.val_loss, color="k", lw=2.5, alpha=0.35, marker="o", markersize=4,
                        label=None if marked else "loss-bump detector")
                marked = True
        ax.set_ylabel("validation loss (nats/token)")
    _log_axis(ax)
    ax.set_xlabel("training tokens")
    ax.set_title("validation loss over training")
    _legend_below(fig, ax, ncol=2 if seeded else 3, title=SEED_BANDS if seeded else None)
    return _save(fig, out, "loss_curves")


def fig_training_curves(root: Path, out: Path, model: str = "attn-2l"):
    """Validation loss and the induction check (loss on the 2nd copy of repeated random tokens)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    style()
    tr = _read(root, "phase_change", "training")
    if tr is None or tr[tr.model == model].empty:
        return []
    d = tr[(tr.model == model) & (tr.tokens > 0)]
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 3.1), layout="constrained")
    # neutral colours: in the other figures a colour names a model, and these lines are not models
    ax.plot(d.tokens, d.val_loss, color="k", label="validation loss (corpus)")
    ax.plot(d.tokens, d.repeat_loss_first, color="0.55", ls=":", label="random tokens, 1st copy")
    ax.plot(d.tokens, d.repeat_loss_second, color="0.45", ls="--", label="random tokens, 2nd copy")
    _log_axis(ax)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    w = d.dropna(subset=["wall_s"])
    if len(w) > 1:  # a top axis of wall-clock minutes (interpolated between checkpoints)
        minutes = [m for m in (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 240) if m <= w.wall_s.max() / 60]
        at = np.interp(minutes, w.wall_s / 60, w.tokens)
        lo, hi = ax.get_xlim()
        keep = []  # each tick at least 8% of the axis from the last (20 and 30 min ran together as "2030")
        for i, t in enumerate(at):
            if not keep or np.log(t / at[keep[-1]]) >= 0.08 * np.log(hi / lo):
                keep.append(i)
        minutes, at = [minutes[i] for i in keep], at[keep]
        top = ax.secondary_xaxis("top")
        top.set_xticks(at)
        top.set_xticklabels([f"{m:g}" for m in minutes], fontsize=6)
        top.xaxis.set_minor_locator(NullLocator())  # else the token axis's log minor ticks, meaningless in minutes
        top.set_xlabel("wall-clock of training (min)", fontsize=7)
    ax.set_title(f"{model}: loss over training", fontsize=8)
    _legend_below(fig, ax, ncol=1)
    return _save(fig, out, f"training_curves_{model}")


def fig_head_scores(root: Path, out: Path, model: str = "attn-2l"):
    sns = style()
    hs = _read(root, "phase_change", "head_scores")
    if hs is None or hs[hs.model == model].empty:
        return []
    hs = hs[(hs.model == model) & (hs.tokens > 0) & hs.score.isin(["induction", "previous_token", "prefix_matching"])]
    hs = hs.assign(head_name="L" + hs.layer.astype(str) + "H" + hs["head"].astype(str))
    g = sns.relplot(data=hs, x="tokens", y="value", hue="head_name", col="score", kind="line",
                    height=2.0, aspect=1.0, facet_kws={"sharey": True})
    for ax in g.axes.flat:
        _log_axis(ax)
    g.set_axis_labels("training tokens", "score (attention share)")
    for ax, name in zip(g.axes.flat, g.col_names):  # the score's name, not the table's column value
        ax.set_title(name.replace("_", " ") + " score")
    g.legend.set_title("head")
    g.figure.suptitle(f"{model}: head scores over training", fontsize=9, y=1.04)
    return _save(g.figure, out, f"head_scores_{model}")


def fig_pca(root: Path, out: Path):
    """The PCA trajectories; runs evaluated on different (example, token) pairs (another corpus or context:
    column ``pairs``) are separate PCA fits, each drawn in a panel of its own."""
    import matplotlib.pyplot as plt

    style()
    pca = _read(root, "phase_change", "pca")
    if pca is None or pca.empty:
        return []
    several = "pairs" in pca and pca.pairs.nunique(dropna=False) > 1
    sets = list(pca.groupby("pairs", sort=False, dropna=False)) if several else [(None, pca)]
    fig, axes = plt.subplots(1, len(sets), figsize=(COLUMN_WIDTH * len(sets), 2.6), squeeze=False,
                             layout="constrained")
    win = _read(root, "phase_change", "windows")
    for ax, (pairs, p) in zip(axes[0], sets):
        _pca_panel(ax, p, win, None if pairs is None else f"PCA pairs {pairs}")
    return _save(fig, out, "per_token_loss_pca")


END_MARKER, END_LABEL = "X", "end of training"  # each PCA trajectory's last checkpoint


def _pca_panel(ax, pca: pd.DataFrame, win: pd.DataFrame | None, fit: str | None) -> None:
    """One PCA fit's trajectories on ``ax`` (``fit``: its name in the title where there are several)."""
    fam = _families(pd.Series(pca.model.unique()))  # several seeds: one colour per model, one legend entry
    family = dict(zip(pca.model.unique(), fam if fam is not None else pca.model.unique()))
    colors = model_colors(list(dict.fromkeys(family.values())))
    labelled = set()
    for model, d in pca.groupby("model", sort=False):
        d = d[d.tokens > 0].sort_values("step")
        f = family[model]
        line, = ax.plot(d.pc1, d.pc2, marker="o", markersize=1.5, lw=0.8, color=colors[f],
                        label=None if f in labelled else f)
        labelled.add(f)
        # the last checkpoint: a marker (explained in the legend), not a text label, which sat on the
        # trajectory's markers and on the other runs' labels where trajectories end close together
        ax.plot(d.pc1.iloc[-1], d.pc2.iloc[-1], END_MARKER, color=line.get_color(), markersize=5, mec="k", mew=0.5)
        twin = _twin_attn2l(win, model)  # each run marked at its own seed's attn-2l window
        ref = win[win.model == twin] if twin is not None else None
        if ref is not None and len(ref) and np.isfinite(ref.icl_window_start_tokens.iloc[0]):
            for t, mk in ((ref.icl_window_start_tokens.iloc[0], ">"), (ref.icl_window_end_tokens.iloc[0], "s")):
                if d.tokens.max() >= t:
                    j = int(np.argmin(np.abs(np.log(d.tokens.to_numpy()) - np.log(t))))
                    ax.plot(d.pc1.iloc[j], d.pc2.iloc[j], mk, color=line.get_color(), markersize=5, mec="k", mew=0.5)
    ax.set_title("triangle / square: attn-2l ICL window start / end"
                 + (" (same seed)" if pca.model.str.contains(r"-s\d+$").any() else "")
                 + (f"\n{fit}" if fit else ""), fontsize=7)
    ax.plot([], [], END_MARKER, color="0.7", markersize=5, mec="k", mew=0.5, label=END_LABEL)
    ax.set_xlabel(f"PC1 of per-token losses ({100 * pca.var_pc1.iloc[0]:.0f}% var., nats)")
    ax.set_ylabel(f"PC2 ({100 * pca.var_pc2.iloc[0]:.0f}% var., nats)")
    if fam is not None and len(ax.figure.axes) == 1:  # under the figure: at the right it made it 4.4 in wide
        _legend_below(ax.figure, ax, ncol=3, title="one line per seed")
    elif fam is not None:
        _legend_outside(ax, "one line per seed")
    else:
        ax.legend(frameon=False)


def fig_ablation_by_index(root: Path, out: Path, model: str = "attn-2l"):
    import matplotlib.pyplot as plt

    sns = style()
    sets = _read(root, f"ablations_{model}", "sets_by_index")
    if sets is None:
        return []
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.9), layout="constrained")
    sub = sets[sets.group.isin(["clean", "induction heads", "random (non-induction)"])].copy()
    # single-token losses are noisy: average within ~24 log-spaced bins of token index
    edges = np.unique(np.round(np.logspace(0, np.log10(sub.token_index.max() + 1), 25)).astype(int))
    sub["bin"] = pd.cut(sub.token_index, edges, right=False, labels=False)
    sub = sub.groupby(["group", "set", "bin"], as_index=False).agg(token_index=("token_index", "mean"),
                                                                   loss=("loss", "mean"))
    sns.lineplot(data=sub, x="token_index", y="loss", hue="group", ax=ax, errorbar=("ci", 95), marker="o",
                 markersize=3, seed=0)  # seeded bootstrap: the same band every time
    _log_axis(ax, tokens=False)
    ax.set_xlabel("token index (tokens of context)")
    ax.set_ylabel("loss (nats/token, log-binned)")
    n_random = sets[sets.group == "random (non-induction)"].set.nunique()
    ax.set_title(f"{model}: loss by token index, heads ablated\n(pattern-preserving; random: {n_random} distinct sets, "
                 "95% CI)", fontsize=8)
    _legend_below(fig, ax, ncol=3)
    return _save(fig, out, f"ablation_loss_by_index_{model}")


def fig_ablation_heatmap(root: Path, out: Path, model: str = "attn-2l"):
    import matplotlib.pyplot as plt

    sns = style()
    ph = _read(root, f"ablations_{model}", "per_head")
    if ph is None:
        return []
    kinds = list(ph.kind.unique())
    fig, axes = plt.subplots(1, len(kinds), figsize=(2 * COLUMN_WIDTH, 1.5 + 0.35 * ph.layer.nunique()),
                             layout="constrained")
    axes = np.atleast_1d(axes)
    vmax = max(0.05, ph.icl_share.abs().max())
    for ax, kind in zip(axes, kinds):
        m = ph[ph.kind == kind].pivot(index="layer", columns="head", values="icl_share")
        sns.heatmap(m, ax=ax, cmap="RdBu_r", center=0, vmin=-vmax, vmax=vmax, annot=True, fmt=".2f",
                    annot_kws={"size": 6}, cbar=ax is axes[-1], cbar_kws={"label": "share of ICL score removed"})
        ax.set_title({"pattern": "pattern-preserving zero"}.get(kind, kind) + " ablation", fontsize=8)
        ax.set_xlabel("head")
        ax.set_ylabel("layer" if ax is axes[0] else "")
        ax.tick_params(axis="y", rotation=0)
    fig.suptitle(f"{model}: share of the ICL score removed by ablating one head (negative: ICL grows)", fontsize=9)
    return _save(fig, out, f"ablation_icl_share_{model}")


def fig_attribution(root: Path, out: Path, model: str = "attn-2l"):
    import matplotlib.pyplot as plt

    sns = style()
    at, win = _read(root, f"ablations_{model}", "attribution"), _read(root, "phase_change", "windows")
    if at is None or at.empty:
        return []
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 3.0), layout="constrained")
    _shade_window(ax, win, model)
    sns.lineplot(data=at, x="tokens", y="attribution", hue="head_name", ax=ax, marker="o", markersize=3, seed=0)
    ax.axhline(0, color="k", lw=0.5)
    _log_axis(ax)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("before-and-after attribution\n(fraction of phase-change loss drop)")
    ax.set_title(f"{model}: each head's share of the loss drop\n({int(at[at.in_window].tokens.nunique())} "
                 "checkpoints inside the ICL window)", fontsize=8)
    _legend_below(fig, ax, ncol=4)
    return _save(fig, out, f"attribution_over_training_{model}")


def _smooth_log(z: np.ndarray, x: np.ndarray, sigma: float = 0.05) -> np.ndarray:
    """Gaussian smoothing of the columns of z (index bin x tokens) over x = log10 tokens, width ``sigma``
    decades: dense checkpoints are closer together than one checkpoint's noise is small."""
    w = np.exp(-0.5 * ((x[:, None] - x[None, :]) / sigma) ** 2)
    w /= w.sum(0, keepdims=True)
    return z @ w


def fig_loss_heatmap(root: Path, out: Path):
    """Loss by token index over training (the paper's heatmap) and its derivative against log tokens."""
    import matplotlib.pyplot as plt

    style()
    lbi, win = _read(root, "phase_change", "loss_by_index"), _read(root, "phase_change", "windows")
    if lbi is None or lbi.empty:
        return []
    models = list(lbi.model.unique())
    several = _families(pd.Series(models)) is not None
    # drawn from 1e5 tokens on, a derivative over at least two checkpoints there
    models = [m for m in models if lbi[(lbi.model == m) & (lbi.tokens >= 1e5)].tokens.nunique() >= 2]
    if not models:  # shorter runs: nothing to draw (an empty panel raised IndexError)
        return []
    if several:  # one row per model, its lowest seed (a row per run made the gpu scale's 21 rows, 38 inches)
        from .zoo import split_run_name

        lowest: dict[str, str] = {}
        for name in sorted(models, key=lambda n: split_run_name(n)[1] or 0):
            lowest.setdefault(split_run_name(name)[0], name)
        models = [name for name in models if name in lowest.values()]
    fig, axes = plt.subplots(len(models), 2, figsize=(2 * COLUMN_WIDTH, 1.8 * len(models)), squeeze=False,
                             layout="constrained")
    for row, model in zip(axes, models):
        d = lbi[(lbi.model == model) & (lbi.tokens >= 1e5)]
        edges = np.unique(np.round(np.logspace(0, np.log10(d.token_index.max() + 1), 30)).astype(int))
        d = d.assign(bin=pd.cut(d.token_index, edges, right=False, labels=edges[:-1]))
        m = d.groupby(["bin", "tokens"], observed=True).loss.mean().unstack("tokens")  # (index bin, tokens)
        tok = m.columns.to_numpy(dtype=float)
        x = np.log10(tok)
        deriv = np.gradient(_smooth_log(m.to_numpy(), x), x, axis=1)
        y = m.index.to_numpy(dtype=float)
        late = tok >= min(1e6, tok[len(tok) // 2])  # colour range from after warm-up: the fall from uniform saturates
        v = np.nanpercentile(np.abs(deriv[:, late]), 98)
        # the fall from uniform loss (the leading checkpoints before `late` whose median |derivative| is off
        # this scale) is masked: drawn, it was one saturated block that drew the eye from the window
        off = (np.nanmedian(np.abs(deriv), axis=0) > v) & ~late
        fall = int(np.argmin(off)) if not off.all() else len(off)
        deriv = np.where(np.arange(len(tok)) < fall, np.nan, deriv)
        for ax, z, label, cmap, kw in ((row[0], m.to_numpy(), "loss (nats)", "viridis", {}),
                                       (row[1], deriv, "nats per decade\nof tokens", "RdBu_r", dict(vmin=-v, vmax=v))):
            im = ax.pcolormesh(tok, y, np.ma.masked_invalid(z), cmap=cmap, shading="nearest", **kw)
            ax.grid(False)
            _log_axis(ax, "x")
            _log_axis(ax, "y", tokens=False)
            fig.colorbar(im, ax=ax, label=label, shrink=0.9, extend="both" if kw else "neither")
            if win is not None:
                for r in win[win.model == model].itertuples():
                    for t in (r.icl_window_start_tokens, r.icl_window_end_tokens):
                        if np.isfinite(t):
                            ax.axvline(t, color="w" if cmap == "viridis" else "k", lw=0.8, ls="--")
            ax.set_xlabel("training tokens")
        if fall:
            lo = row[1].get_xlim()[0]
            hi = np.sqrt(tok[fall - 1] * tok[fall]) if fall < len(tok) else row[1].get_xlim()[1]
            row[1].axvspan(lo, hi, facecolor="0.9", edgecolor="0.75", hatch="////", lw=0, zorder=0)
            if np.log(hi / lo) > 0.2 * np.log(np.divide(*row[1].get_xlim()[::-1])):
                row[1].text(np.sqrt(lo * hi), np.sqrt(y[0] * y[-1]), "initial fall\n(off scale)", ha="center",
                            va="center", fontsize=6, bbox=dict(fc="0.9", ec="none", pad=1))
        row[0].set_ylabel(f"{model}\ntoken index")
    axes[0][0].set_title("loss by token index\n(dashed: ICL window)")
    axes[0][1].set_title("d loss / d log$_{10}$ training tokens\n(smoothed over 0.05 decades)")
    if several:
        fig.suptitle("lowest seed of each model", fontsize=8)
    return _save(fig, out, "loss_by_index_over_training")


def fig_smear(root: Path, out: Path):
    import matplotlib.pyplot as plt

    sns = style()
    ck, hs = _read(root, "phase_change", "checkpoints"), _read(root, "phase_change", "head_scores")
    if ck is None or hs is None:
        return []
    ind = (hs[hs.score == "induction"].groupby(["model", "tokens"]).value.max().rename("max_induction").reset_index())
    from .zoo import split_run_name

    d = ck.merge(ind, on=["model", "tokens"])
    family = d.model.map(lambda name: split_run_name(name)[0])  # attn-2l-s1 -> attn-2l (seeds averaged)
    d = d.assign(family=family)
    d = d[(d.tokens > 0) & family.isin(["attn-1l", "attn-2l", "smear-1l", "smear-2l"])]
    seeded = _families(d.model) is not None  # several seeds: mean over them, band from the lowest to the highest
    fig, axes = plt.subplots(1, 2, figsize=(2 * COLUMN_WIDTH, 2.8), layout="constrained")
    # each model in its colour of the other figures (the hue was the layer count: smear-2l orange here, red
    # there); smeared keys dashed, so each smeared model still reads against its vanilla twin
    order = [m for m in MODEL_ORDER if m in set(d.family)]
    dashes = {m: (4, 1.5) if m.startswith("smear") else "" for m in order}
    for ax, y in zip(axes, ("icl_score", "max_induction")):  # no seaborn default band (a 95% bootstrap CI over 3 seeds)
        sns.lineplot(data=d, x="tokens", y=y, hue="family", hue_order=order, palette=model_colors(order),
                     style="family", style_order=order, dashes=dashes, ax=ax, seed=0,
                     errorbar=("pi", 100) if seeded else None)
        _log_axis(ax)
        ax.set_xlabel("training tokens")
        if seeded:
            ax.set_title(SEED_BANDS, fontsize=7)
    axes[0].set_ylabel("ICL score (nats)")
    axes[1].set_ylabel("best head's induction score\n(attention share)")
    _legend_below(fig, axes[0], ncol=4)
    if axes[1].get_legend() is not None:
        axes[1].get_legend().remove()
    fig.suptitle("smeared keys (dashed) against vanilla attention (solid) over training", fontsize=9)
    return _save(fig, out, "smeared_vs_vanilla")


def fig_patching(root: Path, out: Path, model: str = "attn-2l"):
    import matplotlib.pyplot as plt

    sns = style()
    ph, pp = _read(root, f"circuit_{model}", "patch_heads"), _read(root, f"circuit_{model}", "patch_head_pos")
    if ph is None:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(2 * COLUMN_WIDTH, 2.4), gridspec_kw={"width_ratios": [1, 3]},
                             layout="constrained")  # room for the right panel's head labels and axis label
    sns.heatmap(ph.pivot(index="layer", columns="head", values="restored"), ax=axes[0], cmap="Blues",
                annot=True, fmt=".2f", annot_kws={"size": 6}, cbar=False)
    axes[0].set_title(f"{model}: one head patched\n(all positions)", fontsize=8)
    axes[0].tick_params(axis="y", rotation=0)
    m = pp.assign(row=pp.head_name).pivot(index="row", columns="position", values="restored")
    sns.heatmap(m, ax=axes[1], cmap="Blues", cbar_kws={"label": "fraction of\nloss gap restored"})
    axes[1].set_title("one head at one position patched\n(dashed: the second copy starts)", fontsize=8)
    # every position labelled made ~34 rotated 5-pt labels: label about ten, upright
    cols = list(m.columns)
    xs = _ticks(len(cols), 11)
    axes[1].set_xticks([i + 0.5 for i in xs], [str(cols[i]) for i in xs], rotation=0)
    axes[1].axvline((len(cols) + 1) / 2, color="k", lw=0.8, ls="--")  # BOS + L + L positions: the 2nd copy from 1 + L
    axes[1].set_xlabel("position in the prompt (BOS + first copy + second copy)")
    axes[1].set_ylabel("head")
    axes[1].tick_params(axis="y", rotation=0)
    return _save(fig, out, f"patching_{model}")


def mosaic_grid(n: int) -> tuple[int, int]:
    """(rows, columns) of the mosaic's grid for ``n`` models: about 3:2 landscape (40 -> 5 x 8)."""
    cols = max(1, min(n, round(float(np.sqrt(n * 1.5)))))
    return -(-n // cols), cols


def fig_path_patching(root: Path, out: Path, model: str = "attn-2l"):
    """Path patching: second-copy loss increase when one sender's output reaching one receiver's
    queries, keys or values is resampled (table ``path_patch``), one heatmap per receiver input; the
    previous-token head -> induction head cell is outlined."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    style()
    pp = _read(root, f"circuit_{model}", "path_patch")
    if pp is None or pp.empty:
        return []
    senders, receivers = list(dict.fromkeys(pp.sender)), list(dict.fromkeys(pp.receiver))
    vmax = max(float(pp.effect.abs().max()), 1e-9)
    fig, axes = plt.subplots(1, 3, figsize=(2 * COLUMN_WIDTH, 1.5 + 0.32 * len(senders)), sharey=True,
                             layout="constrained")
    names = {"q": "queries (Q)", "k": "keys (K)", "v": "values (V)"}
    im = None
    for ax, kind in zip(axes, ("q", "k", "v")):
        d = pp[pp.receiver_input == kind]
        m = d.pivot(index="sender", columns="receiver", values="effect").loc[senders, receivers]
        se = d.pivot(index="sender", columns="receiver", values="se").loc[senders, receivers]
        im = ax.imshow(m.to_numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        for i in range(len(senders)):
            for j in range(len(receivers)):
                ax.text(j, i, f"{m.iat[i, j]:.2f}\n±{se.iat[i, j]:.2f}", ha="center", va="center", fontsize=5,
                        color="w" if abs(m.iat[i, j]) > 0.6 * vmax else "k")
        key = d[d.sender_is_previous_token & d.receiver_is_induction]
        for r in key.itertuples():
            ax.add_patch(Rectangle((receivers.index(r.receiver) - 0.5, senders.index(r.sender) - 0.5), 1, 1,
                                   fill=False, lw=1.5, ec="k"))
        ax.set_xticks(range(len(receivers)), receivers, rotation=0 if len(receivers) <= 6 else 90)
        ax.set_yticks(range(len(senders)), senders)
        ax.set_title(names[kind])
        ax.set_xlabel("receiver head")
        ax.grid(False)
    axes[0].set_ylabel("sender head (output resampled)")
    fig.suptitle(f"{model}: path patching, the sender's output resampled on its path into the receiver's\n"
                 "queries, keys or values (outlined: previous-token head \u2192 induction head; \u00b1 1 s.e.)",
                 fontsize=8)
    fig.colorbar(im, ax=list(axes), label="second-copy loss\nincrease (nats)", shrink=0.9)
    return _save(fig, out, f"path_patching_{model}")


def _ticks(n: int, most: int = 6) -> list[int]:
    """Indices 0..n-1 to label: multiples of a round step (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, ...), at
    most ``most``, plus the last index when it is not close to the last multiple."""
    rounds = (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 40, 50, 64, 100, 128, 200, 256, 500)
    step = next((s for s in rounds if -(-n // s) <= most), -(-n // most))
    ticks = list(range(0, n, step))
    if n - 1 - ticks[-1] > step / 2:
        ticks.append(n - 1)
    return ticks


def _fit_label(label: str, width: int = 26) -> str:
    """A model label that fits a panel: whole if short enough, else without its organisation
    ("EleutherAI/pythia-70m" -> "pythia-70m") and with a pinned commit shortened to 7 hex digits
    ("gpt2@607a30d7...cd7e" -> "gpt2@607a30d"), else cut from its informative end ("...-70m-deduped")."""
    if len(label) > width and "/" in label:
        label = label.rsplit("/", 1)[1]
    name, at, rev = label.partition("@")
    if len(label) > width and at and re.fullmatch(r"[0-9a-f]{40}", rev):  # else the title is the hash alone
        label = f"{name}@{rev[:7]}"
    return label if len(label) <= width else "\u2026" + label[-(width - 1):]


def _fit_labels(labels: list[str], width: int = 26) -> list[str]:
    """``_fit_label`` of each label, except where that gives two models the same title (labels that
    are whole paths ending alike, e.g. ``.../attn-1l/final`` and ``.../attn-2l/final`` both fit as
    ``final``): those keep the path component that tells them apart and their end (``attn-1l/final``,
    ``attn-1l/\u2026/step-00001000``); titles are always distinct.

        >>> _fit_labels(["/home/me/zoo/runs/attn-1l/final", "/home/me/zoo/runs/attn-2l/final", "gpt2"])
        ['attn-1l/final', 'attn-2l/final', 'gpt2']
    """
    fitted = [_fit_label(label, width) for label in labels]
    out = list(fitted)
    for text in {t for t in fitted if fitted.count(t) > 1}:
        group = [i for i, t in enumerate(fitted) if t == text]
        parts = [labels[i].split("/") for i in group]
        p = 0  # components shared by the whole group, from the left
        while all(len(q) > p + 1 for q in parts) and len({q[p] for q in parts}) == 1:
            p += 1
        for i, q in zip(group, parts):
            tail = _fit_label(q[-1], width)
            if p >= len(q) - 1:
                continue
            sep = "/" if p == len(q) - 2 else "/\u2026/"
            room = width - len(sep) - len(tail)
            head = q[p] if len(q[p]) <= room else "\u2026" + q[p][-(room - 1):] if room > 1 else ""
            out[i] = head + sep + tail if head else _fit_label(labels[i], width)
    seen: dict[str, int] = {}
    for i, t in enumerate(out):  # still alike (e.g. labels differing only inside a cut part): number them
        seen[t] = seen.get(t, 0) + 1
        if out.count(t) > 1:
            suffix = f" #{seen[t]}"
            out[i] = _fit_label(t, width - len(suffix)) + suffix
    return out


def fig_mosaic(root: Path, out: Path):
    """The induction mosaic of the survey table (``mosaic_figure``), saved as PNG and PDF."""
    sv = _read(root, "survey", "induction_scores")
    if sv is None or sv.empty:
        return []
    return _save(mosaic_figure(sv), out, "induction_mosaic")


def mosaic_figure(sv: pd.DataFrame):
    """Induction score of every head of every model in ``sv`` (columns model, layer, head, score): one
    heatmap per model (layers down, heads across) in a grid of equal panels, in survey order, so 4 or
    40 models stay legible (a panel keeps its size: a larger survey makes a larger figure, never
    smaller panels)."""
    import matplotlib.pyplot as plt

    style()
    models = list(sv.model.unique())
    rows, cols = mosaic_grid(len(models))
    panel_w, panel_h = 1.7, 1.35  # inches per model, axes and their labels
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel_w + 0.9, rows * panel_h + 0.5), squeeze=False,
                             layout="constrained")
    im = None
    titles = _fit_labels([str(m) for m in models])
    for ax, name, title in zip(axes.flat, models, titles):
        m = sv[sv.model == name].pivot(index="layer", columns="head", values="score").sort_index()
        im = ax.imshow(m.to_numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.grid(False)
        ys, xs = _ticks(m.shape[0]), _ticks(m.shape[1])
        ax.set_yticks(ys, [str(m.index[i]) for i in ys], fontsize=6)
        ax.set_xticks(xs, [str(m.columns[i]) for i in xs], fontsize=6)
        ax.tick_params(length=2, pad=1)
        ax.set_title(title, fontsize=7, loc="left", pad=2)
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    fig.supxlabel("head", fontsize=8)
    fig.supylabel("layer", fontsize=8)
    fig.colorbar(im, ax=axes, label="induction score (attention share)", shrink=min(1.0, 4.0 / (rows * panel_h + 0.5)))
    fig.suptitle("induction score of every head, one panel per model", fontsize=9)
    return fig


ALL = [fig_icl_over_training, fig_loss_curves, fig_pca, fig_smear, fig_loss_heatmap, fig_mosaic]
PER_MODEL = [fig_training_curves, fig_head_scores]  # every model in the phase-change tables
PER_ABLATED = [fig_ablation_by_index, fig_ablation_heatmap, fig_attribution]  # every model with ablation tables
PER_CIRCUIT = [fig_patching, fig_path_patching]
# the tables of each run's experiment folders that the figures and the report read
RUN_TABLES = {"ablations": ("per_head", "per_head_by_index", "sets", "sets_by_index", "attribution"),
              "circuit": ("patch_heads", "patch_head_pos", "path_patch")}


def attribution_at_other_windows(root: Path, model: str) -> bool:
    """Whether the attribution of ``ablations_<model>`` marks other checkpoints as inside the ICL window than
    the phase-change ``windows`` table's window of ``model`` holds (made at windows of an older rule or of
    another run state): drawn under these windows' shading, it would contradict it."""
    at, win = _read(root, f"ablations_{model}", "attribution"), _read(root, "phase_change", "windows")
    w = win[win.model == model] if win is not None else ()
    if at is None or not len(at) or not len(w):
        return False
    return not (at.in_window == at.tokens.between(w.icl_window_start_tokens.iloc[0],
                                                  w.icl_window_end_tokens.iloc[0])).all()


def _models_with(root: Path, prefix: str) -> list[str]:
    """Models that have an experiment folder ``<prefix>_<model>`` (read only: nothing is created)."""
    return sorted(p.name[len(prefix) + 1:] for p in root.glob(f"{prefix}_*") if p.is_dir())


DRAWN = "figures_manifest.json"  # in the figures folder: the files the last drawing into it wrote


def drawn_before(out: Path) -> list[str]:
    """The figure files the last ``make_figures`` into ``out`` wrote (its ``DRAWN`` manifest); [] if none.
    A damaged manifest raises ResultError (callers check it before writing anything)."""
    path = out / DRAWN
    if not path.is_file():
        return []
    try:
        names = json.loads(path.read_text()).get("files")
    except (ValueError, AttributeError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ResultError(f"{path} is damaged: delete it (the next drawing then removes no earlier figure)")
    return names


def drawn_from(out: Path) -> str | None:
    """The ``tables_fingerprint`` of the tables the last ``make_figures`` into ``out`` drew (None: none
    recorded); ``REPORT.md`` and ``headline.json`` there were written from the same tables."""
    drawn_before(out)  # a damaged manifest raises
    path = out / DRAWN
    tables = json.loads(path.read_text()).get("tables") if path.is_file() else None
    return tables if isinstance(tables, str) else None


def _record_drawing(out: Path, before: list[str], paths: list[Path], tables: str) -> None:
    """Remove the figures the previous drawing into ``out`` wrote that this one did not (their tables no
    longer make them), then record this drawing's files. Only files a drawing recorded are removed (plain
    ``.png``/``.pdf`` names in ``out``), never a file the tool did not write."""
    from interventions.zoo.train import atomic_write_text

    now = sorted({p.name for p in paths})
    stale = [n for n in dict.fromkeys(before) if n not in now and Path(n).name == n
             and Path(n).suffix in (".png", ".pdf") and (out / n).is_file()]
    for n in stale:
        (out / n).unlink()
    if stale:
        print(f"figures: removed {len(stale)} figure file(s) of an earlier drawing into {out} that these tables no "
              f"longer make: {', '.join(stale)}", file=sys.stderr)
    atomic_write_text(out / DRAWN, json.dumps({"files": now, "tables": tables}, indent=1) + "\n")


def make_figures(results_root: str | Path, out: str | Path) -> list[Path]:
    """Every figure whose result tables exist, for every model present. Returns the written paths. The
    files are recorded in ``out/figures_manifest.json``; figures an earlier drawing into ``out`` recorded
    and this one does not make are removed (named on stderr); other files in ``out`` are left alone. A
    drawing that makes no figure changes nothing."""
    root, out = Path(results_root), Path(out)
    before = drawn_before(out)  # a damaged manifest raises before any figure is drawn
    paths = []
    for fn in ALL:
        paths += fn(root, out)
    ck = _read(root, "phase_change", "checkpoints")
    models = list(ck.model.unique()) if ck is not None else []
    for model in models:
        for fn in PER_MODEL:
            paths += fn(root, out, model)
    for prefix, fns in (("ablations", PER_ABLATED), ("circuit", PER_CIRCUIT)):
        for model in _models_with(root, prefix):
            if ck is not None and model not in models:  # left by an earlier invocation of other runs
                print(f"figures: {root / f'{prefix}_{model}'} is left out: its run {model} is not in the phase-change "
                      "tables (an earlier invocation's; delete the folder to silence this)", file=sys.stderr)
                continue
            if made_from_another_run(root, f"{prefix}_{model}", model, RUN_TABLES[prefix]):
                print(f"figures: {root / f'{prefix}_{model}'} is left out: it was computed from another state of run "
                      f"{model} than the phase-change tables (retrained or resumed since, or another folder of that "
                      f"name): run `{prefix}` on the run again to draw it, or delete the folder", file=sys.stderr)
                continue
            for fn in fns:
                if fn is fig_attribution and attribution_at_other_windows(root, model):
                    print(f"figures: {root / f'{prefix}_{model}' / 'attribution.csv'} is left out: it was made at "
                          "other ICL windows than the phase-change tables: run `ablations` on the run again to draw "
                          "it", file=sys.stderr)
                    continue
                paths += fn(root, out, model)
    if paths:
        _record_drawing(out, before, paths, tables_fingerprint(root))
    return paths
