"""The measurement definitions of the reproduction, checked against hand computations."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from experiments.phase_change import detect_bump, pca_trajectories, rise_window, turn_angle
from interventions.analysis.metrics import icl_band, icl_from_losses


def test_banded_icl_is_the_mean_of_per_window_band_differences():
    """band=b averages tokens k-b..k+b (1-indexed; entry k-2 of the loss array) before differencing;
    its s.e. is the std of the per-window differences / sqrt(n); band=0 is the single-token score."""
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(40, 255, generator=g)  # windows of 256 tokens
    r = icl_from_losses(losses, 25, 250, band=5)
    per = losses[:, 243:254].double().mean(1) - losses[:, 18:29].double().mean(1)  # tokens 245-255, 20-30
    assert r["icl_score"] == pytest.approx(per.mean().item(), abs=1e-12)
    assert r["sem"] == pytest.approx((per.std() / math.sqrt(40)).item(), abs=1e-12)
    single = icl_from_losses(losses, 25, 250)
    assert single["icl_score"] == pytest.approx((losses[:, 248] - losses[:, 23]).double().mean().item(), abs=1e-12)
    assert icl_band(256) == 5 and icl_band(512) == 10


def test_banded_icl_rejects_bad_bands():
    losses = torch.rand(4, 63)
    with pytest.raises(ValueError, match="overlap"):
        icl_from_losses(losses, 6, 20, band=8)
    with pytest.raises(ValueError, match="non-negative"):
        icl_from_losses(losses, 6, 20, band=-1)


def test_rise_window_finds_the_10_to_90_percent_points_of_a_noisy_logistic():
    """For y = lo + trend * log10 t + rise / (1 + exp(-k (log10 t - c))) the 10% and 90% points of the
    rise are c -+ ln(9) / k in log10 t; the fit recovers them, and the rise apart from the slow trend,
    through noise of a tenth of the rise on each point (the real ICL curves' level)."""
    t = np.logspace(5, 8, 150)
    k, c = 6.0, 7.0
    y = (-0.2 + 0.1 * np.log10(t) + 0.4 / (1 + np.exp(-k * (np.log10(t) - c)))
         + np.random.default_rng(0).normal(0, 0.04, len(t)))
    w = rise_window(t, y, 0.2)
    assert w["rise"] == pytest.approx(0.4, abs=0.05)
    assert w["trend_per_decade"] == pytest.approx(0.1, abs=0.03)
    assert math.log10(w["start_tokens"]) == pytest.approx(c - math.log(9) / k, abs=0.05)
    assert math.log10(w["end_tokens"]) == pytest.approx(c + math.log(9) / k, abs=0.05)
    assert w["ends_inside"] and w["n_checkpoints"] == int(((t >= w["start_tokens"]) & (t <= w["end_tokens"])).sum())
    flat = rise_window(t, 0.01 * np.sin(np.log10(t)), 0.1)
    fall = rise_window(t, -y, 0.2)
    assert math.isnan(fall["start_tokens"])
    assert math.isnan(flat["start_tokens"]) and flat["n_checkpoints"] == 0


def test_logistic_fit_warns_no_overflow_on_a_steep_rise_and_is_the_plain_formulas_fit(monkeypatch):
    """On a step (a rise steeper than the grid) the plain sigmoid 1 / (1 + exp(-z)) overflowed with a
    RuntimeWarning; the fit's sigmoid (its exponent capped) warns nothing and finds the step, and on seeded noisy
    rises where the plain formula does not overflow it gives the plain formula's fits (to 1e-9)."""
    from experiments import phase_change

    x = np.linspace(5, 9, 60)  # 4 decades: the grid's narrowest sigmoid (w = 0.005) spans 800 units of z
    step = 2 - 1.5 * (x > 7.03) + np.random.default_rng(0).normal(0, 0.01, len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b, r, c, w, rms = phase_change.logistic_fit(x, step)
    assert r == pytest.approx(-1.5, abs=0.02) and 6.98 < c < 7.07 and rms < 0.02

    def plain(z, r=1.0):  # the formula before: exp(-z) overflows past z = -709.8
        return r / (1 + np.exp(-z))

    with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.setattr(phase_change, "_sigmoid", plain)
        phase_change.logistic_fit(x, step)
    assert any("overflow" in str(c.message) for c in caught)
    x = np.log10(np.geomspace(1e6, 1e8, 60))
    for seed in range(4):
        g = np.random.default_rng(seed)
        c, w, r = g.uniform(6.3, 7.7), g.uniform(0.02, 0.3), g.uniform(-2, -0.2)
        y = 3 - 0.1 * (x - x[0]) + r / (1 + np.exp(-(x - c) / w)) + g.normal(0, 0.02, len(x))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = phase_change.logistic_fit(x, y)
            with monkeypatch.context() as m:
                m.setattr(phase_change, "_sigmoid", plain)
                want = phase_change.logistic_fit(x, y)  # no overflow here (it would raise)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_a_rise_that_began_before_the_data_is_no_window():
    """Data from 1M tokens of a logistic rise whose 10% point lies at 0.35M (centre 10^6.2): the start of the
    rise is not in the data, so no window is claimed (the fit alone put one at 0.19M - 10.5M); the same
    rise centred inside the data (10^7) is found."""
    t = np.geomspace(1e6, 1e8, 60)
    noise = np.random.default_rng(0).normal(0, 0.01, len(t))
    before = rise_window(t, 0.4 / (1 + np.exp(-(np.log10(t) - 6.2) / 0.3)) + noise, 0.15)
    inside = rise_window(t, 0.4 / (1 + np.exp(-(np.log10(t) - 7.0) / 0.3)) + noise, 0.15)
    assert math.isnan(before["start_tokens"]) and before["n_checkpoints"] == 0
    assert t[0] <= inside["start_tokens"] < 1e7 < inside["end_tokens"]


def test_a_rise_still_going_at_the_end_does_not_end_inside():
    t = np.logspace(5, 7, 50)
    w = rise_window(t, np.log10(t), 0.5)
    assert not w["ends_inside"]


def test_bump_detector_finds_a_concave_stretch_and_not_in_a_convex_curve():
    t = np.logspace(5, 8, 60)
    x = np.log10(t)
    convex = 3 + 0.3 * (x - 8) ** 2
    assert not detect_bump(t, convex)["bump"]
    bumped = convex - 0.4 / (1 + np.exp(-8 * (x - 7)))  # a sudden extra drop around 1e7
    b = detect_bump(t, bumped)
    assert b["bump"] and 3e6 < b["bump_start_tokens"] < b["bump_end_tokens"] <= 1.1e7  # concave before the centre


def test_turn_angle_of_a_right_angle_and_a_straight_line():
    tokens = np.array([1e6, 2e6, 4e6, 8e6])
    d = pd.DataFrame({"tokens": tokens, "pc1": [0, 1, 2, 2], "pc2": [0, 0, 0, 1.0]})
    assert turn_angle(d, 4e6, 8e6) == pytest.approx(90.0)
    line = pd.DataFrame({"tokens": tokens, "pc1": [0, 1, 2, 3.0], "pc2": [0, 0, 0, 0.0]})
    assert turn_angle(line, 4e6, 8e6) == pytest.approx(0.0, abs=1e-6)


def test_pca_is_fit_after_warm_up_and_projects_every_checkpoint():
    """PCs come from the checkpoints past fit_from_tokens; the early ones are projected, not fit."""
    g = np.random.default_rng(0)
    late = np.outer(np.linspace(0, 1, 6), np.r_[1.0, np.zeros(9)]) + 0.001 * g.normal(size=(6, 10))
    early = np.tile(np.r_[0, 50.0, np.zeros(8)], (3, 1))  # a huge early move along another axis
    vectors = {"m": np.concatenate([early, late])}
    ck = pd.DataFrame({"model": "m", "step": range(9), "tokens": [1e4, 1e5, 5e5] + [1e6 * (i + 1) for i in range(6)]})
    pca = pca_trajectories(vectors, ck, fit_from_tokens=1_000_000)
    fit = pca[pca.fit]
    assert len(pca) == 9 and len(fit) == 6
    assert abs(np.corrcoef(fit.pc1, np.linspace(0, 1, 6))[0, 1]) > 0.99  # PC1 is the late direction


def test_pca_pairs_are_shared_by_every_seed_and_the_pca_is_fit_per_set_of_pairs():
    """Runs of different seeds on one corpus are evaluated on the same (example, token) pairs (their
    per-token losses are the same coordinates); runs on other pairs get a PCA of their own, which does
    not move the first set's."""
    from experiments.phase_change import pairs_fingerprint, pca_by_pairs, pca_pairs, pca_trajectories
    from experiments.zoo import zoo_configs

    cfgs = zoo_configs("tiny", "cpu", 2)
    a, b = (pca_pairs(cfgs[f"attn-2l-s{k}"], 32) for k in (0, 1))
    assert cfgs["attn-2l-s0"].seed != cfgs["attn-2l-s1"].seed
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and pairs_fingerprint(*a) == pairs_fingerprint(*b)
    g = np.random.default_rng(0)
    vectors = {"m0": g.normal(size=(4, 8)), "m1": g.normal(size=(4, 8)), "other": 50 + 9 * g.normal(size=(4, 8))}
    ck = pd.DataFrame([{"model": m, "step": s, "tokens": 10 ** (s + 5)} for m in vectors for s in range(4)])
    both = pca_by_pairs(vectors, ck, {"m0": "p", "m1": "p", "other": "q"})
    alone = pca_trajectories({m: vectors[m] for m in ("m0", "m1")}, ck)
    got = both[both.pairs == "p"].drop(columns="pairs").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, alone)
    assert set(both[both.pairs == "q"].model) == {"other"}


def test_pca_refuses_vectors_on_different_pairs_instead_of_truncating_or_joining_them():
    """Per-token-loss vectors of different lengths are losses on different pairs: a joint PCA of their first
    columns would compare different tokens; a run without a pairs fingerprint is not fit with others."""
    from experiments.phase_change import pca_by_pairs

    g = np.random.default_rng(0)
    ck = pd.DataFrame([{"model": m, "step": s, "tokens": 10 ** (s + 5)} for m in ("a", "b") for s in range(4)])
    with pytest.raises(ValueError, match="pairs"):
        pca_trajectories({"a": g.normal(size=(4, 8)), "b": g.normal(size=(4, 6))}, ck)
    with pytest.raises(ValueError, match="fingerprint"):
        pca_by_pairs({"a": g.normal(size=(4, 8)), "b": g.normal(size=(4, 8))}, ck, {"a": "p"})
    shifted = pd.concat([ck.iloc[1:], pd.DataFrame([{"model": "b", "step": 9, "tokens": 10 ** 14}])])
    with pytest.raises(ValueError, match="checkpoint rows"):  # 3 + 5 rows for 4 + 4 vectors: tokens misaligned
        pca_trajectories({"a": g.normal(size=(4, 8)), "b": g.normal(size=(4, 8))}, shifted)


def test_share_removed_by_hand_and_undefined_without_clean_icl():
    """share = (mean ablated - mean clean) / -mean clean, its s.e. the std (ddof 1) of that ratio over
    window resamples shared by clean and ablated (paired). Without ICL to remove (clean mean >= 0) both
    are NaN: a clean +0.05 and an ablation to -0.10 gave share +3.0 ("removes 300%" of ICL it added),
    a clean mean of 0 a share of -inf (a mean of -1e-18, -3.6e17), silently; where resamples reach a
    clean mean >= 0 the s.e. is NaN."""
    from interventions.analysis.icl_ablation import N_BOOT, share_removed

    g = np.random.default_rng(1)
    clean = -0.4 + g.normal(0, 0.2, 300)
    abl = clean + 0.3 + g.normal(0, 0.1, 300)
    share, se = share_removed(clean, abl, seed=3)
    idx = np.random.default_rng(3).integers(0, 300, size=(N_BOOT, 300))
    boots = [(abl[i].mean() - clean[i].mean()) / -clean[i].mean() for i in idx]
    assert share == pytest.approx((abl.mean() - clean.mean()) / -clean.mean(), abs=1e-12)
    assert se == pytest.approx(np.std(boots, ddof=1), abs=1e-12)
    positive = 0.05 + g.normal(0, 0.02, 200)
    centred = np.tile([0.02, -0.02], 100)  # mean exactly 0
    for c, a in ((positive, positive - 0.15), (centred, centred + 0.1)):
        assert all(math.isnan(v) for v in share_removed(c, a))
    # a clean mean below 0 that resamples can push to >= 0: the share stands, its bootstrap s.e. does not
    near = g.normal(0, 0.5, 20)
    near -= near.mean() + 0.01
    share, se = share_removed(near, near + 0.005)
    assert share == pytest.approx(0.5) and math.isnan(se)


def test_no_plateau_test_when_the_80pct_point_is_the_final_checkpoint():
    """A run with no checkpoint in its last 20% takes the final checkpoint as its 80% point: the paired
    change is 0 +- 0 by construction and was reported as "not plateaued" (|0| < 2 * 0 is false); it is no
    test (NaN change and s.e.). Two distinct checkpoints keep the test: |0.01| < 2 * 0.02."""
    from experiments.phase_change import add_plateau

    win = pd.DataFrame({"model": ["same", "distinct"]})
    rows = []
    for model, at80 in (("same", 9), ("distinct", 8)):
        d = 0.0 if model == "same" else 0.01
        rows += [{"model": model, "point": "at_80pct", "step": at80, "icl_score": -0.4, "icl_sem": 0.02},
                 {"model": model, "point": "final", "step": 9, "icl_score": -0.4 + d, "icl_sem": 0.02},
                 {"model": model, "point": "final_minus_at_80pct", "step": -1, "icl_score": d,
                  "icl_sem": 0.0 if model == "same" else 0.02}]
    out = add_plateau(win, pd.DataFrame(rows)).set_index("model")
    assert math.isnan(out.loc["same", "plateau_change"]) and math.isnan(out.loc["same", "plateau_sem"])
    assert out.loc["distinct", "plateau_change"] == pytest.approx(0.01) and bool(out.loc["distinct", "plateaued"])


def _window_trials(rise: float, min_rise: float, n: int = 40) -> tuple[list[dict], np.ndarray]:
    """``rise_window`` on ``n`` seeded curves at 60 log-spaced checkpoints (0.5M - 20M tokens): a linear
    trend in log tokens, plus a logistic ``rise`` centred at 10^6.5 tokens (0.1 decades wide), plus noise of
    s.d. 0.03 on each checkpoint."""
    t = np.geomspace(5e5, 2e7, 60)
    x = np.log10(t)
    out = []
    for seed in range(n):
        g = np.random.default_rng([seed, 11])
        y = 0.03 * (x - x[0]) + rise / (1 + np.exp(-(x - 6.5) / 0.1)) + g.normal(0, 0.03, len(t))
        out.append((rise_window(t, y, min_rise), y))
    return out, x


def test_a_window_needs_a_significant_rise_not_only_min_rise():
    """Noise about a trend gives a window in <= 1 of 40 seeded trials at the ICL window's least fall
    (``MIN_ICL_DROP``; with ``min_rise`` alone, 3 of these 40; 1 with the test at p < 0.05), while a real rise of 0.16 nats (5x the noise's
    s.d.) is still found, in its place, in >= 38 of 40 (with no least rise, so that only the significance
    test can lose it). ``p_value`` is the F-test of the logistic fit against a straight line fit
    independently (``np.polyfit``), on (3, n - 5) degrees of freedom."""
    from scipy import stats

    from experiments.phase_change import MIN_ICL_DROP

    noise, x = _window_trials(0.0, MIN_ICL_DROP)
    assert sum(np.isfinite(w["start_tokens"]) for w, _ in noise) <= 1
    real, _ = _window_trials(0.16, 0.0)
    found = [w for w, _ in real if np.isfinite(w["start_tokens"]) and abs(math.log10(w["peak_tokens"]) - 6.5) < 0.2]
    assert len(found) >= 38
    for w, y in noise[:3] + real[:3]:  # the p-value by hand
        sse_line = float(((np.polyval(np.polyfit(x, y, 1), x) - y) ** 2).sum())
        sse_fit = len(x) * w["fit_rms"] ** 2
        f = ((sse_line - sse_fit) / 3) / (sse_fit / (len(x) - 5))
        assert w["p_value"] == pytest.approx(stats.f.sf(f, 3, len(x) - 5), rel=1e-6, abs=1e-12)
    from experiments.phase_change import WINDOW_P

    assert all(w["p_value"] < WINDOW_P for w in found)


@pytest.mark.parametrize("n_ctx", [64, 256, 512])
def test_transient_bands_are_the_query_positions_whose_losses_make_the_icl_score(n_ctx):
    """The transient's "early" / "late" query positions are exactly those whose next-token loss enters the ICL
    score's early / late band: a loss of 1 at one column of the (1, n_ctx - 1) losses moves
    ``icl_band_losses``' early (late) band iff that column is in the band, and column q of the losses is the
    prediction made at query position q (a logit raised for the true next token at position q lowers
    column q alone). ``attention_by_band`` averages over those positions (its uniform entropy, log(q + 1),
    is their mean)."""
    from experiments.phase_change import attention_by_band, transient_bands
    from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    from interventions.analysis.metrics import icl_band_losses, icl_indices
    from interventions.primitives.loss import loss_from_logits

    x = torch.randint(0, 7, (1, n_ctx))
    for q in (0, n_ctx // 2, n_ctx - 2):
        logits = torch.zeros(1, n_ctx, 7)
        logits[0, q, x[0, q + 1]] = 5.0
        low = loss_from_logits(logits, x)[0]
        assert torch.nonzero(low < low.max()).flatten().tolist() == [q]
    in_band = {"early": [], "late": []}
    for q in range(n_ctx - 1):
        one = torch.zeros(1, n_ctx - 1)
        one[0, q] = 1.0
        e, l_ = icl_band_losses(one, *icl_indices(n_ctx), icl_band(n_ctx))
        for name, v in (("early", e), ("late", l_)):
            if v.item() > 0:
                in_band[name].append(q)
    if n_ctx == 256:
        model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=20, n_ctx=n_ctx)).eval()
        got = attention_by_band(model, torch.randint(0, 20, (2, n_ctx))).set_index("band")
        for name in ("early", "late"):
            assert got.loc[name, "uniform_entropy"] == pytest.approx(np.log(np.array(in_band[name]) + 1).mean())
    bands = dict(zip(("early", "late"), transient_bands(n_ctx)))
    for name, (lo, hi) in bands.items():
        assert list(range(lo, hi + 1)) == in_band[name]
