"""Paper-quality checks of every figure, drawn from small synthetic tables shaped like the default run's
(four models, two of them trained 20M tokens and two 6M; no training, no model)."""

import numpy as np
import pandas as pd
import pytest

from experiments.common import Results

MODELS = {"attn-1l": 2e7, "attn-2l": 2e7, "smear-1l": 6e6, "smear-2l": 6e6}
HEADS = [(layer, head) for layer in (0, 1) for head in range(4)]


def write_tables(root) -> None:
    """Every table the figures read, for ``MODELS``: a fall from uniform loss over the first decades, an
    ICL window in attn-2l (6M - 9M tokens) and the smeared models (0.7M - 4M), a loss bump in attn-1l."""
    g = np.random.default_rng(0)
    pc = Results(root, "phase_change")
    ck, tr, hs, lbi, pca, win = [], [], [], [], [], []
    for i, (model, end) in enumerate(MODELS.items()):
        tokens = np.unique(np.round(np.logspace(np.log10(2e3), np.log10(end), 40), -3))
        start, stop = (6e6, 9e6) if model == "attn-2l" else (7e5, 4e6) if model.startswith("smear") else (np.nan, np.nan)
        rise = 0 if np.isnan(start) else 1 / (1 + np.exp(-4 * (np.log10(tokens) - np.log10(np.sqrt(start * stop)))))
        fall = 3.5 / (1 + np.exp(4 * (np.log10(tokens) - 5.1)))  # the fall from uniform loss
        for j, t in enumerate(tokens):
            icl = -0.1 - 0.3 * rise[j] if np.ndim(rise) else -0.1
            ck.append({"model": model, "step": j, "tokens": t, "icl_score": icl + 0.02 * g.normal(),
                       "icl_sem": 0.03, "val_loss": 2 + fall[j] - 0.1 * np.log10(t / 1e3)})
            tr.append({"model": model, "tokens": t, "val_loss": ck[-1]["val_loss"], "repeat_loss_first": 5.8,
                       "repeat_loss_second": 5.8 - 1.5 * (rise[j] if np.ndim(rise) else 0), "wall_s": t / 1e4})
            for la, h in HEADS[: 4 if model.endswith("1l") else 8]:
                top = (la, h) == ((1, 3) if model == "attn-2l" else (0, 0))
                for score in ("induction", "previous_token", "prefix_matching"):
                    value = 0.02 + (0.5 * rise[j] if top and np.ndim(rise) else 0.01 * g.random())
                    hs.append({"model": model, "step": j, "tokens": t, "layer": la, "head": h, "score": score,
                               "value": value})
            for k in range(1, 256, 3):
                lbi.append({"model": model, "step": j, "tokens": t, "token_index": k, "sem": 0.1,
                            "loss": 2 + fall[j] - (0.3 + 0.3 * (rise[j] if np.ndim(rise) else 0)) * np.log10(k)})
            pca.append({"model": model, "step": j, "tokens": t, "pc1": -90 + 100 * j / len(tokens) + i,
                        "pc2": 10 - 30 * (rise[j] if np.ndim(rise) else j / len(tokens)), "var_pc1": 0.35,
                        "var_pc2": 0.16})
        win.append({"model": model, "icl_window_start_tokens": start, "icl_window_end_tokens": stop,
                    "induction_window_start_tokens": start, "induction_window_end_tokens": stop,
                    "bump": model == "attn-1l", "bump_start_tokens": 8e6 if model == "attn-1l" else np.nan,
                    "bump_end_tokens": 8e6 if model == "attn-1l" else np.nan})
    for name, rows in (("checkpoints", ck), ("training", tr), ("head_scores", hs), ("loss_by_index", lbi),
                       ("pca", pca), ("windows", win)):
        pc.write(name, pd.DataFrame(rows))
    ab = Results(root, "ablations_attn-2l")
    ab.write("sets_by_index", pd.DataFrame(
        [{"group": grp, "set": s, "token_index": k, "loss": 3 - 0.7 * np.log10(k) + off + 0.05 * g.normal()}
         for grp, off, n in (("clean", 0, 1), ("induction heads", 0.2, 1), ("random (non-induction)", 0.1, 6))
         for s in range(n) for k in range(1, 256)]))
    ab.write("per_head", pd.DataFrame([{"kind": kind, "layer": la, "head": h, "icl_share": 0.8 if (la, h) == (1, 3)
                                        else 0.2 * g.normal()} for kind in ("zero", "mean", "pattern")
                                       for la, h in HEADS]))
    at_tokens = [2e3, 6e6, 6.5e6, 7e6, 8e6, 9e6, 2e7]
    ab.write("attribution", pd.DataFrame([{"tokens": t, "head_name": f"L{la}H{h}", "in_window": 6e6 <= t <= 9e6,
                                           "attribution": (0.5 if (la, h) == (1, 3) and t > 6e6 else 0.03 * g.normal())}
                                          for t in at_tokens for la, h in HEADS]))
    circ = Results(root, "circuit_attn-2l")
    circ.write("patch_heads", pd.DataFrame([{"layer": la, "head": h, "restored": float((la, h) == (1, 3))}
                                            for la, h in HEADS]))
    circ.write("patch_head_pos", pd.DataFrame([{"head_name": f"L{la}H{h}", "position": p,
                                                "restored": 0.02 * ((la, h) == (1, 3) and p > 50) + 0.002 * g.normal()}
                                               for la, h in HEADS for p in range(101)]))
    circ.write("path_patch", pd.DataFrame(
        [{"sender": f"L0H{s}", "receiver": f"L1H{r}", "receiver_input": kind, "se": 0.01,
          "effect": (0.8 if kind == "k" else 0.3) * (r == 3) + 0.01 * g.normal(),
          "sender_is_previous_token": s == 0, "receiver_is_induction": r == 3}
         for kind in ("q", "k", "v") for s in range(4) for r in range(4)]))
    Results(root, "survey").write("induction_scores", pd.DataFrame(
        [{"model": m, "layer": la, "head": h, "score": 0.55 * ((la, h) == (1, 3))}
         for m in MODELS for la, h in HEADS[: 4 if m.endswith("1l") else 8]]))


@pytest.fixture(scope="module")
def figures_drawn(tmp_path_factory):
    """Every figure of ``write_tables``' tables, by name, drawn (not saved); drawn once for the module."""
    import matplotlib.pyplot as plt

    from experiments import figures

    root = tmp_path_factory.mktemp("tables")
    write_tables(root)
    saved = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(figures, "_save", lambda fig, out, name: saved.setdefault(name, fig) and [])
        for fn in figures.ALL:
            fn(root, root / "figures")
        for model in MODELS:
            for fn in figures.PER_MODEL:
                fn(root, root / "figures", model)
        for fn in figures.PER_ABLATED + figures.PER_CIRCUIT:
            fn(root, root / "figures", "attn-2l")
    yield saved
    for fig in saved.values():
        plt.close(fig)


def _texts(fig):
    """Every drawn, non-empty text of ``fig`` (titles, labels, tick labels, legends, annotations); tick
    labels of ticks outside their axis' view limits are not drawn and left out."""
    from matplotlib.text import Text

    hidden = set()
    for ax in fig.axes:
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = sorted(lim)
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if not lo - 1e-9 * abs(hi - lo) <= tick.get_loc() <= hi + 1e-9 * abs(hi - lo):
                    hidden |= {id(tick.label1), id(tick.label2)}
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and t.figure is not None
            and id(t) not in hidden]


def test_every_figure_is_drawn(figures_drawn):
    """The synthetic tables make every figure of the default run."""
    names = {"icl_over_training", "loss_curves", "per_token_loss_pca", "smeared_vs_vanilla",
             "loss_by_index_over_training", "induction_mosaic", "ablation_loss_by_index_attn-2l",
             "ablation_icl_share_attn-2l", "attribution_over_training_attn-2l", "patching_attn-2l",
             "path_patching_attn-2l"} | {f"{kind}_{m}" for m in MODELS for kind in ("training_curves", "head_scores")}
    assert names <= set(figures_drawn), names - set(figures_drawn)


def test_no_two_texts_overlap(figures_drawn):
    """No two texts of a figure come within 1 pt of each other (the loss-by-index column titles ran into
    each other; a y label sat on tick labels)."""
    for name, fig in figures_drawn.items():
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        pt = fig.dpi / 72
        texts = [(t, t.get_window_extent(r).shrunk(0.98, 0.8).padded(0.5 * pt)) for t in _texts(fig)]
        for i, (a, box_a) in enumerate(texts):
            for b, box_b in texts[i + 1:]:
                assert not box_a.overlaps(box_b), f"{name}: {a.get_text()!r} overlaps {b.get_text()!r}"


def test_every_axes_is_labelled_with_two_tick_labels(figures_drawn):
    """Every data axes has an x and a y label (its own, or the figure's shared one) and at least two
    labelled ticks on each axis with more than one category (a 1-layer heatmap has one layer)."""
    for name, fig in figures_drawn.items():
        fig.canvas.draw()
        sup = {"x": fig._supxlabel is not None, "y": fig._supylabel is not None}
        for ax in fig.axes:
            if not ax.get_visible() or not ax.axison or ax.get_label() == "<colorbar>":
                continue
            for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
                labels = [t for t in axis.get_ticklabels() if t.get_text().strip() and t.get_visible()]
                shared = (ax.get_shared_x_axes() if which == "x" else ax.get_shared_y_axes()).get_siblings(ax)
                if len(shared) > 1 and not any(t.get_visible() for t in axis.get_ticklabels()):
                    continue  # a shared axis labelled on its neighbour
                lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
                inside = [t for t in labels if lo <= (t.get_position()[0] if which == "x" else t.get_position()[1]) <= hi]
                if hi - lo > 1.0001 or ax.get_images() == [] and not ax.collections:
                    assert len(inside) >= 2, f"{name}: {which} axis has tick labels {[t.get_text() for t in inside]}"
            row = ax.get_subplotspec().rowspan.stop == ax.get_subplotspec().get_gridspec().nrows if ax.get_subplotspec() else True
            assert ax.get_xlabel() or sup["x"] or not row or not ax.get_xticklabels(), f"{name}: no x label"
            col0 = ax.get_subplotspec().colspan.start == 0 if ax.get_subplotspec() else True
            assert ax.get_ylabel() or sup["y"] or not col0, f"{name}: no y label"


def test_legends_inside_axes_cover_no_data(figures_drawn):
    """A legend drawn inside an axes covers none of that axes' plotted points (the training curves'
    legend sat on the validation loss)."""
    for name, fig in figures_drawn.items():
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        for ax in fig.axes:
            leg = ax.get_legend()
            if leg is None or not leg.get_visible():
                continue
            box = leg.get_window_extent(r)
            if not box.overlaps(ax.get_window_extent(r)):
                continue
            for line in ax.get_lines():
                xy = line.get_xydata()
                if len(xy) < 2 or line.get_label().startswith("_"):
                    continue
                xs = np.logspace(*np.log10(xy[[0, -1], 0]), 200) if ax.get_xscale() == "log" and (xy[:, 0] > 0).all() \
                    else np.linspace(xy[0, 0], xy[-1, 0], 200)
                order = np.argsort(xy[:, 0])
                pts = ax.transData.transform(np.c_[xs, np.interp(xs, xy[order, 0], xy[order, 1])])
                assert not any(box.contains(*p) for p in pts), f"{name}: legend on {line.get_label()!r}"


def test_figures_fit_a_paper_page(figures_drawn):
    """Each figure prints at one column (3.4 in) or two (7 in) wide without shrinking its text below
    5 pt: a one-column figure drawn at most 3.6 in wide (a long title made one 4.1 in), any at most
    7.2 in, every text at least 5 pt."""
    from experiments.figures import COLUMN_WIDTH

    for name, fig in figures_drawn.items():
        fig.canvas.draw()
        width = fig.get_tightbbox(fig.canvas.get_renderer()).width
        limit = 3.6 if fig.get_figwidth() <= COLUMN_WIDTH else 7.2
        assert width <= limit, f"{name}: {width:.1f} in wide"
        small = [t.get_text() for t in _texts(fig) if t.get_fontsize() < 5]
        assert not small, f"{name}: text below 5 pt: {small[:3]}"


def test_models_keep_their_colour_across_figures(figures_drawn):
    """A model's lines have the same colour in every figure (the smeared-vs-vanilla figure coloured by
    layer count: smear-2l was orange there and red elsewhere)."""
    from matplotlib.colors import to_hex

    from experiments.figures import model_colors

    want = {m: to_hex(c) for m, c in model_colors(list(MODELS)).items()}
    for name in ("icl_over_training", "loss_curves", "per_token_loss_pca", "smeared_vs_vanilla"):
        fig = figures_drawn[name]
        handles = [h for leg in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if leg is not None
                   for h, t in zip(leg.legend_handles, leg.get_texts()) if t.get_text() in MODELS]
        labels = [t.get_text() for leg in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if leg is not None
                  for t in leg.get_texts() if t.get_text() in MODELS]
        assert set(labels) == set(MODELS), (name, labels)
        for h, model in zip(handles, labels):
            assert to_hex(h.get_color()) == want[model], (name, model)


def test_loss_by_index_derivative_keeps_its_colours_for_the_window(figures_drawn):
    """The derivative panels' colour range is not spent on the initial fall from uniform loss: those
    checkpoints are masked (named in the panel), so no drawn cell before the window is saturated."""
    fig = figures_drawn["loss_by_index_over_training"]
    meshes = [c for ax in fig.axes if ax.get_label() != "<colorbar>" for c in ax.collections
              if c.get_array() is not None and c.get_cmap().name == "RdBu_r"]
    assert len(meshes) == len(MODELS)
    for mesh in meshes:
        z = np.ma.masked_invalid(mesh.get_array())
        assert np.ma.count_masked(z) > 0  # the fall from uniform is masked
        assert (np.abs(z) >= mesh.norm.vmax).mean() < 0.1  # few saturated cells remain (it was a third)
