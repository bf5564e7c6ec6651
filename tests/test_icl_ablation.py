"""The ICL score under an ablation and the share of it an ablation removes, against an independent
computation: the ablated model by weight surgery (a head's columns of the output projection zeroed),
losses by a plain forward pass and log-softmax, the statistics by numpy by hand."""

import math

import numpy as np
import pytest
import torch

import interventions as iv
from interventions.analysis.icl_ablation import N_BOOT, icl_share_from_losses, icl_share_removed, share_removed
from interventions.analysis.metrics import icl_per_window, icl_score, resolve_ablation
from interventions.analysis.scores import probe_sequences

from .test_scores import BOS, POOL, circuit_model

L = 20  # probe prompts: BOS + 20 tokens twice (41 tokens; ICL tokens 4 and 40, icl_indices(41))


def _surgery(model, layer: int, head: int):
    """A copy of ``model`` with head (layer, head)'s output removed by zeroing its columns of c_proj."""
    import copy

    out = copy.deepcopy(model)
    dh = out.config.d_head
    with torch.no_grad():
        out.transformer.h[layer].attn.c_proj.weight[:, head * dh:(head + 1) * dh] = 0
    return out


def _losses(model, tokens) -> np.ndarray:
    """(n, pos - 1) next-token losses by a plain forward pass (no library code)."""
    with torch.no_grad():
        logp = model(tokens).logits.double().log_softmax(-1)
    return -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1).numpy()


def _by_hand(losses: np.ndarray, early: int, late: int, band: int) -> np.ndarray:
    """(n,) per-window ICL: mean loss of tokens late +- band minus early +- band (1-indexed token k is
    column k - 2)."""
    return losses[:, late - band - 2:late + band - 1].mean(1) - losses[:, early - band - 2:early + band - 1].mean(1)


@pytest.fixture(scope="module")
def induction():
    """The hand-built induction circuit (L1H0 reads L0H0 through its keys) on repeated probe prompts: a
    strongly negative ICL score that ablating L1H0 removes."""
    model = circuit_model(2)
    return model, probe_sequences(model, L, 12, 0, bos_id=BOS, token_pool=POOL)


def test_icl_score_under_ablation_matches_weight_surgery(induction):
    """icl_score(ablation=ZeroAblation(L1H0)) equals the hand formula on the losses of the model with
    L1H0's output projection columns zeroed; heads given as a string mean the same zero ablation;
    without an ablation the result is unchanged (the clean model's)."""
    model, windows = induction
    early, late = 4, 40
    hand = _by_hand(_losses(_surgery(model, 1, 0), windows), early, late, 1)
    for abl in (iv.ZeroAblation("L1H0"), ["L1H0"], "L1H0", iv.PatternPreserving(iv.ZeroAblation("L1H0"))):
        r = icl_score(model, windows, band=1, ablation=abl)  # L1H0 is the last layer: patterns equal too
        assert (r["early"], r["late"], r["n"]) == (early, late, 12)
        assert r["icl_score"] == pytest.approx(hand.mean(), abs=1e-5)
        assert r["sem"] == pytest.approx(hand.std(ddof=1) / math.sqrt(12), abs=1e-5)
    clean = _by_hand(_losses(model, windows), early, late, 1)
    assert icl_score(model, windows, band=1)["icl_score"] == pytest.approx(clean.mean(), abs=1e-5)
    assert icl_score(model, windows, band=1, ablation=[]) == icl_score(model, windows, band=1)
    assert clean.mean() < -1.0 and hand.mean() > clean.mean() + 1.0  # the circuit's ICL, removed by L1H0


def test_icl_share_removed_matches_surgery_and_numpy(induction):
    """share, its paired bootstrap s.e. (numpy.random.default_rng(seed), resamples taken by clean and
    ablated together), the change in nats with its paired s.e., from weight surgery + numpy by hand."""
    model, windows = induction
    c = _by_hand(_losses(model, windows), 4, 40, 2)
    a = _by_hand(_losses(_surgery(model, 1, 0), windows), 4, 40, 2)
    r = icl_share_removed(model, windows, iv.PatternPreserving(iv.ZeroAblation("L1H0")), band=2, seed=5)
    assert r["share_removed"] == pytest.approx((a.mean() - c.mean()) / -c.mean(), abs=1e-5)
    idx = np.random.default_rng(5).integers(0, 12, size=(N_BOOT, 12))
    boots = [(a[i].mean() - c[i].mean()) / -c[i].mean() for i in idx]
    assert r["share_removed_sem"] == pytest.approx(np.std(boots, ddof=1), abs=1e-5)
    assert r["icl_change"] == pytest.approx((a - c).mean(), abs=1e-5)
    assert r["icl_change_sem"] == pytest.approx((a - c).std(ddof=1) / math.sqrt(12), abs=1e-5)
    assert r["icl_clean"] == pytest.approx(c.mean(), abs=1e-5) and r["icl_ablated"] == pytest.approx(a.mean(), abs=1e-5)
    assert (r["n"], r["early"], r["late"], r["band"], r["n_boot"], r["seed"]) == (12, 4, 40, 2, N_BOOT, 5)
    assert 0.5 < r["share_removed"] < 1.5  # the induction head carries the circuit's ICL
    # a head that does nothing (L0H1 has no output in the circuit) removes none of it
    none = icl_share_removed(model, windows, "L0H1")
    assert none["share_removed"] == pytest.approx(0.0, abs=1e-6) and none["icl_change"] == pytest.approx(0.0, abs=1e-6)


def test_share_is_nan_without_clean_icl():
    """No ICL to remove (clean mean >= 0): share and s.e. NaN; one window: a share, no s.e."""
    assert all(math.isnan(v) for v in share_removed([0.1, 0.2], [0.0, 0.1]))
    share, se = share_removed([-0.4], [-0.1])
    assert share == pytest.approx(0.75) and math.isnan(se)
    losses = torch.tensor([[1.0, 1.0, 2.0], [1.0, 1.0, 1.5]])  # late above early: positive ICL
    r = icl_share_from_losses(losses, losses - 0.1, early=2, late=4)
    assert math.isnan(r["share_removed"]) and r["icl_change"] == pytest.approx(0.0, abs=1e-12)


def test_experiment_share_is_the_library_share_exactly():
    """experiments.ablations.icl_share (the ablation tables' numbers) is the library's icl_share_from_losses
    with icl_indices(pos), icl_band(pos), N_BOOT, bit for bit, and its parts are icl_per_window and
    share_removed, on random losses (positive-ICL ones included: NaN in both)."""
    from experiments.ablations import N_BOOT as EXP_N_BOOT, icl_share
    from interventions.analysis.metrics import icl_band, icl_indices

    assert EXP_N_BOOT == N_BOOT
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, pos = 2 + trial * 7, 30 + trial * 11
        clean = torch.rand(n, pos - 1, generator=g) * 4
        clean[:, pos // 2:] -= 0.5 if trial % 4 else -0.5
        abl = clean + 0.3 * torch.randn(n, pos - 1, generator=g) + 0.1
        got = icl_share(clean, abl, seed=trial)
        early, late, band = *icl_indices(pos), icl_band(pos)
        want = icl_share_from_losses(clean, abl, early, late, band, N_BOOT, trial)
        assert got.keys() == want.keys()
        for k in got:
            assert got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])), (trial, k)
        c, a = icl_per_window(clean, early, late, band), icl_per_window(abl, early, late, band)
        share, se = share_removed(c, a, N_BOOT, trial)
        assert (share, se) == (want["share_removed"], want["share_removed_sem"]) or math.isnan(share)
        assert want["icl_change"] == float((a - c).mean())


def test_bad_input_names_the_fix(induction):
    """Bad ablations, empty ablations, unpaired losses, bad bootstrap settings: ValueError naming the fix,
    before any forward pass."""
    model, windows = induction
    with pytest.raises(ValueError, match="neither an ablation"):
        icl_score(model, windows, ablation=3)
    with pytest.raises(ValueError, match="neither an ablation"):
        resolve_ablation([iv.ZeroAblation("L1H0"), "L0H0"])  # a mix
    with pytest.raises(ValueError, match="ablated more than once"):
        resolve_ablation([iv.ZeroAblation("L1H0"), iv.ZeroAblation("L1H0")])
    with pytest.raises(ValueError, match="out of range"):
        icl_score(model, windows, ablation="L5H0")
    with pytest.raises(ValueError, match="ablation is empty"):
        icl_share_removed(model, windows, [])
    with pytest.raises(ValueError, match="n_boot"):
        icl_share_removed(model, windows, "L1H0", n_boot=1)
    with pytest.raises(ValueError, match="seed"):
        icl_share_removed(model, windows, "L1H0", seed=-1)
    with pytest.raises(ValueError, match="band"):
        icl_share_removed(model, windows, "L1H0", band=30)
    with pytest.raises(ValueError, match="same windows"):
        icl_share_from_losses(torch.zeros(3, 9), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="same windows"):
        share_removed([-1.0, -2.0], [-1.0])
    with pytest.raises(ValueError, match="NaN"):
        share_removed([-1.0, float("nan")], [-1.0, -1.0])
    with pytest.raises(ValueError, match="per-window"):
        share_removed(np.zeros((2, 3)), np.zeros((2, 3)))


@pytest.mark.parametrize("n_others, size", [(7, 1), (2, 2), (4, 2), (7, 2), (12, 3)])
def test_random_control_sets_are_distinct_and_every_one_when_few(n_others, size):
    """The random control (``random_head_sets``) ablates min(n, C(len(others), size)) distinct sets of the
    induction heads' size, none holding an induction head, the same for a seed: when there are at most n
    possible sets, exactly those (checked against ``itertools.combinations``); otherwise the seeded draws
    of before (one ``choice`` each, sorted) with repeated sets skipped, in the order drawn."""
    import itertools

    from experiments.ablations import random_head_sets
    from interventions.engine.heads import Head

    heads = [Head(layer, h) for layer in range(3) for h in range(8)]
    ind, others = heads[-size:], heads[:n_others]  # induction heads last, the others from the first
    n = 6
    sets = random_head_sets(others, size, n, seed=3)
    possible = {frozenset(c) for c in itertools.combinations(others, size)}
    assert len(sets) == min(n, len(possible)) == len({frozenset(s) for s in sets})
    assert all(len(s) == size and frozenset(s) in possible and not set(s) & set(ind) for s in sets)
    assert random_head_sets(others, size, n, seed=3) == sets
    if len(possible) <= n:
        assert {frozenset(s) for s in sets} == possible
    else:
        g, drawn = np.random.default_rng(3), []
        while len(drawn) < n:
            pick = [others[i] for i in sorted(g.choice(len(others), size=size, replace=False))]
            if pick not in drawn:
                drawn.append(pick)
        assert sets == drawn
    assert random_head_sets(others, 0, n, seed=3) == [] and random_head_sets(others[:1], 2, n, seed=3) == []
