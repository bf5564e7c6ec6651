"""ICL score and loss by token index: arithmetic, agreement with an independent loss, bad inputs."""

import math

import pytest
import torch

from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
from interventions.analysis import metrics
from interventions.analysis.metrics import icl_from_losses, icl_indices, icl_score, loss_by_token_index

from .oracle import to_hooked_transformer


def _uniform_model(seed=0):
    """Random weights, but W_Q = W_K = 0 (and their biases): every head attends uniformly to its context."""
    torch.manual_seed(seed)
    cfg = AttnOnlyConfig(n_layers=1, n_heads=2, d_model=32, n_ctx=40, vocab_size=30, init_range=0.3)
    model = AttnOnlyForCausalLM(cfg).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.q_proj, block.attn.k_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    return model


def test_icl_indices_unchanged():
    """The paper's indices for 512-token contexts, proportional ones for shorter contexts."""
    assert icl_indices(512) == (50, 500)
    assert icl_indices(256) == (25, 250)


def test_icl_arithmetic_by_hand(monkeypatch):
    """With known per-token losses: score = mean(late - early); sem = std(diff, ddof=1)/sqrt(n); the k-th
    token (1-indexed) is entry k - 2 of the loss array."""
    losses = torch.zeros(3, 5)  # windows of 6 tokens
    losses[:, 0] = torch.tensor([3.0, 4.0, 5.0])  # token 2
    losses[:, 4] = torch.tensor([2.0, 2.0, 2.0])  # token 6
    losses[:, 2] = 100.0  # token 4: must not be read
    monkeypatch.setattr(metrics, "per_token_loss", lambda model, windows, batch_size=None: losses)
    out = icl_score(object(), torch.zeros(3, 6, dtype=torch.long), early=2, late=6)
    # diffs: -1, -2, -3 -> mean -2, std 1
    assert out["icl_score"] == pytest.approx(-2.0)
    assert out["sem"] == pytest.approx(1 / math.sqrt(3))
    assert (out["n"], out["early"], out["late"]) == (3, 2, 6)
    assert out["loss_early"] == pytest.approx(4.0) and out["loss_late"] == pytest.approx(2.0)


def test_icl_single_window_has_nan_sem():
    """One window gives a score but no spread: sem is NaN, not 0."""
    out = icl_from_losses(torch.tensor([[1.0, 0.5, 0.25]]), 2, 4)
    assert out["icl_score"] == pytest.approx(-0.75) and math.isnan(out["sem"])


def test_icl_uniform_attention_matches_transformer_lens():
    """On a uniform-attention model, icl_score equals the hand formula applied to TransformerLens'
    per-token losses of the same weights (independent forward pass); default indices follow
    icl_indices(pos); batch size does not change the result; loss_by_token_index is the column mean."""
    model = _uniform_model()
    torch.manual_seed(1)
    windows = torch.randint(0, 30, (7, 40))
    tl = to_hooked_transformer(model)
    with torch.no_grad():
        ref = tl(windows, return_type="loss", loss_per_token=True)  # (n, pos - 1)
    early, late = icl_indices(40)
    diff = ref[:, late - 2] - ref[:, early - 2]
    out = icl_score(model, windows, batch_size=3)
    assert (out["early"], out["late"]) == (early, late)
    assert out["icl_score"] == pytest.approx(diff.mean().item(), abs=1e-4)
    assert out["sem"] == pytest.approx((diff.std() / math.sqrt(7)).item(), abs=1e-4)
    assert out == pytest.approx(icl_score(model, windows, batch_size=16), abs=1e-5)
    curve = loss_by_token_index(model, windows)
    assert list(curve.token_index) == list(range(1, 40))
    assert torch.allclose(torch.tensor(curve.loss.values, dtype=torch.float32), ref.mean(0), atol=1e-4)
    assert curve.loss[curve.token_index == late - 1].item() == pytest.approx(out["loss_late"], abs=1e-4)


def test_bad_inputs_raise():
    """Too-short windows, misordered or impossible indices and malformed windows raise ValueError
    naming the fix."""
    model = _uniform_model()
    w = torch.randint(0, 30, (2, 20))
    with pytest.raises(ValueError, match="longer windows"):
        icl_score(model, w, early=5, late=30)
    with pytest.raises(ValueError, match="must come before"):
        icl_score(model, w, early=10, late=5)
    with pytest.raises(ValueError, match="early >= 2"):
        icl_score(model, w, early=1, late=10)
    with pytest.raises(ValueError, match="at least 3 tokens"):
        icl_score(model, w[:, :2])
    with pytest.raises(ValueError, match=r"\(n, pos\)"):
        icl_score(model, w[0])
    with pytest.raises(ValueError, match="integer"):
        icl_score(model, w.float())
    with pytest.raises(ValueError, match="at least 2 tokens"):
        loss_by_token_index(model, w[:, :1])


def test_bad_losses_and_n_ctx_raise():
    """A losses array that is not (n >= 1, pos - 1) raises a ValueError naming the shape (no windows used to
    give icl_score NaN silently; one window's 1-D losses an IndexError); icl_band / icl_indices reject a
    non-positive or non-integer context (icl_band(-100) was -2, icl_indices(100.7) (10, 98))."""
    import numpy as np

    for bad in (torch.zeros(0, 63), torch.zeros(63), torch.zeros(2, 3, 63)):
        with pytest.raises(ValueError, match=r"shape \(n_windows, pos - 1\).*losses\[None\]"):
            icl_from_losses(bad, 10, 50)
        with pytest.raises(ValueError, match=r"shape \(n_windows, pos - 1\)"):
            metrics.icl_band_losses(bad, 10, 50)
    with pytest.raises(ValueError, match="no window"):
        icl_score(_uniform_model(), torch.zeros(0, 20, dtype=torch.long))
    for bad in (-100, 0, 2.5, 100.7, True):
        for f in (metrics.icl_band, icl_indices):
            with pytest.raises(ValueError, match="n_ctx=.* must be a positive integer"):
                f(bad)
    assert metrics.icl_band(np.int64(256)) == 5 and icl_indices(np.int64(256)) == (25, 250)
    # a list of float64 losses is used at float64 (it was rounded through float32)
    losses = np.random.default_rng(0).random((4, 63)) * 1e-3 + 3.0
    d = losses[:, 48] - losses[:, 8]
    assert icl_from_losses(losses.tolist(), 10, 50)["icl_score"] == pytest.approx(d.mean(), abs=1e-12)


def test_n_ctx_is_checked_as_every_count_is():
    """n_ctx shares the library's count check: the message says why after a colon, a numpy integer is that
    int (icl_indices and icl_band return ints), a bool is refused."""
    import numpy as np

    for f in (metrics.icl_band, icl_indices):
        with pytest.raises(ValueError, match=r"^n_ctx=True must be a positive integer: the windows' length in tokens$"):
            f(True)
    early, late = icl_indices(np.int64(600))
    assert (early, late) == (50, 500) and type(early) is int and type(metrics.icl_band(np.int64(600))) is int


def test_icl_score_checks_band_before_running_the_model(monkeypatch):
    """A band that overlaps (or is not an integer) raises before any forward pass."""
    monkeypatch.setattr(metrics, "per_token_loss", lambda *a, **k: pytest.fail("ran the model"))
    w = torch.randint(0, 30, (2, 20))
    with pytest.raises(ValueError, match="overlap"):
        icl_score(_uniform_model(), w, early=5, late=15, band=5)
    with pytest.raises(ValueError, match="non-negative integer"):
        icl_score(_uniform_model(), w, band=-1)


def test_icl_refuses_losses_of_a_left_padded_batch():
    """Losses of a left-padded batch (NaN at the padding, each padded row's tokens shifted right) raise
    ValueError instead of reading column k - 2 as the k-th token: with 3 tokens of padding the score was
    a finite, wrong -0.015 where the rows aligned by hand give the unpadded -0.040."""
    from interventions.primitives.loss import per_token_loss

    torch.manual_seed(0)
    model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=20, n_ctx=64)).eval()
    x = torch.randint(1, 20, (4, 64))
    padded, mask = x.clone(), torch.ones_like(x)
    padded[:2] = torch.cat([torch.zeros(2, 3, dtype=torch.long), x[:2, :-3]], 1)  # 3 pads, same tokens after
    mask[:2, :3] = 0
    losses = per_token_loss(model, padded, attention_mask=mask)
    # independent: row r's k-th real token sits at column k - 2 + pad_r
    aligned = torch.cat([losses[:2, 38 + 3] - losses[:2, 4 + 3], losses[2:, 38] - losses[2:, 4]]).double()
    clean = icl_from_losses(per_token_loss(model, x), 6, 40)["icl_score"]
    assert aligned.mean().item() == pytest.approx(clean, abs=1e-5)
    for band in (0, 1):
        with pytest.raises(ValueError, match="NaN"):
            icl_from_losses(losses, 6, 40, band)
        with pytest.raises(ValueError, match="NaN"):
            metrics.icl_band_losses(losses, 6, 40, band)
