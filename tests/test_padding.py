"""Padded batches: every primitive gives, at real tokens, what the unpadded sequences give (left
padding; the patching functions left and right padding)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from interventions import (AttnOnlyConfig, AttnOnlyForCausalLM, PatternPreserving, ZeroAblation, ablation_sweep,
                           mean_loss_metric, patch_heads, per_token_loss)
from interventions.primitives.patching import logit_diff, patch_residual


def _models():
    torch.manual_seed(0)
    ours = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=32, n_ctx=32, vocab_size=50)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    return {"attn_only": ours, "gpt2": gpt2}


def _padded(seqs):
    """Left-pad sequences (each (1, len)) with id 0; returns tokens and mask."""
    n = max(s.shape[1] for s in seqs)
    tokens = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, n - s.shape[1]:] = s[0]
        mask[i, n - s.shape[1]:] = 1
    return tokens, mask


@pytest.mark.parametrize("arch", ["attn_only", "gpt2"])
def test_padded_per_token_loss_and_sweep_match_unpadded(arch):
    """With attention_mask, per-token loss (clean, zero and pattern-preserving ablation) and the
    all-heads sweep equal the unpadded runs at real tokens (< 1e-5); padded entries are NaN."""
    model = _models()[arch]
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 50, (1, 12), generator=g), torch.randint(1, 50, (1, 7), generator=g)]
    tokens, mask = _padded(seqs)
    for abl in (None, ZeroAblation("L0H1"), PatternPreserving(ZeroAblation("L0H0"))):
        padded = per_token_loss(model, tokens, abl, attention_mask=mask)
        for i, s in enumerate(seqs):
            alone = per_token_loss(model, s, abl)[0]
            got = padded[i, -alone.shape[0]:]
            assert torch.allclose(got, alone, atol=1e-5), (arch, abl, i)
        assert torch.isnan(padded[1, : tokens.shape[1] - seqs[1].shape[1]]).all()
    for kind in ("zero", "pattern"):
        clean, delta = ablation_sweep(model, tokens, kind=kind, attention_mask=mask)
        for i, s in enumerate(seqs):
            c1, d1 = ablation_sweep(model, s, kind=kind)
            n = c1.shape[1]
            assert torch.allclose(clean[i, -n:], c1[0], atol=1e-5)
            assert torch.allclose(delta[:, i, -n:], d1[:, 0], atol=1e-5), (arch, kind, i)


def test_bad_mask_is_rejected():
    """A mask of the wrong shape or with values other than 0/1 raises ValueError naming the problem."""
    model = _models()["attn_only"]
    tokens = torch.randint(1, 50, (2, 6))
    with pytest.raises(ValueError, match="shape"):
        per_token_loss(model, tokens, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="only 0"):
        ablation_sweep(model, tokens, attention_mask=torch.full((2, 6), 2))


@pytest.mark.parametrize("arch", ["attn_only", "gpt2"])
def test_padded_mean_and_resample_match_unpadded(arch):
    """Mean (per position) and resample ablation index their reference by each token's unpadded
    position: on a left-padded batch they equal the unpadded runs at real tokens (< 1e-5), in
    per_token_loss / run_with_ablations and (mean) in the sweep."""
    from interventions import MeanAblation, ResampleAblation, run_with_ablations
    from interventions.primitives.loss import loss_from_logits

    model = _models()[arch]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 50, (1, 12), generator=g), torch.randint(1, 50, (1, 7), generator=g)]
    reference = torch.randint(1, 50, (5, 12), generator=g)
    tokens, mask = _padded(seqs)
    mean = MeanAblation(["L0H1", "L1H0"], reference)
    padded = per_token_loss(model, tokens, mean, attention_mask=mask)
    resample = ResampleAblation(["L0H0", "L1H1"], reference, seed=3)
    padded_rs = pad = run_with_ablations(model, tokens, resample, attention_mask=mask)
    for i, s in enumerate(seqs):
        n = s.shape[1]
        assert torch.allclose(padded[i, -(n - 1):], per_token_loss(model, s, mean)[0], atol=1e-5), (arch, i)
        alone = run_with_ablations(model, s, resample, row_offset=i)  # the row batch row i draws
        assert torch.allclose(loss_from_logits(padded_rs[i:i + 1, -n:], s), loss_from_logits(alone, s), atol=1e-5)
    del pad
    clean, delta = ablation_sweep(model, tokens, kind="mean", reference=reference, attention_mask=mask)
    for i, s in enumerate(seqs):
        _, d1 = ablation_sweep(model, s, kind="mean", reference=reference)
        assert torch.allclose(delta[:, i, -(s.shape[1] - 1):], d1[:, 0], atol=1e-5), (arch, i)


def test_subclass_value_taking_kwargs_gets_positions_and_row_offset():
    """An ``Ablation`` subclass whose ``value`` takes ``**kwargs`` and passes them on (e.g. to
    ``super().value``) is given each token's unpadded position and the chunk's row offset, as one that
    names them: on a left-padded batch run in chunks it equals the subclass that names them."""
    from interventions import ResampleAblation

    class Named(ResampleAblation):
        def value(self, head, tokens, row_offset=0, positions=None):
            return 0.5 * super().value(head, tokens, row_offset=row_offset, positions=positions)

    class Forwarding(ResampleAblation):
        def value(self, head, tokens, **kwargs):
            return 0.5 * super().value(head, tokens, **kwargs)

    model = _models()["attn_only"]
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(1, 50, (1, 12), generator=g), torch.randint(1, 50, (1, 7), generator=g)]
    reference = torch.randint(1, 50, (6, 12), generator=g)
    tokens, mask = _padded(seqs)
    want = per_token_loss(model, tokens, Named("L0H1", reference, seed=2), batch_size=1, attention_mask=mask)
    got = per_token_loss(model, tokens, Forwarding("L0H1", reference, seed=2), batch_size=1, attention_mask=mask)
    torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)


def test_position_tables_refuse_padded_results():
    """loss_by_position and sweep_table average column t as token index t + 1; in a left-padded batch
    a column holds different token indices in different rows (here row 1's tokens 1-3 sit under row 0's
    6-8). Such results (NaN at padding) raise ValueError naming the fix instead of a table whose
    non-NaN rows mix token indices silently; unpadded results give the same tables as before."""
    from interventions.engine.heads import all_heads
    from interventions.primitives.loss import loss_by_position
    from interventions.primitives.sweep import sweep_table

    model = _models()["attn_only"]
    g = torch.Generator().manual_seed(4)
    tokens, mask = _padded([torch.randint(1, 50, (1, 9), generator=g), torch.randint(1, 50, (1, 4), generator=g)])
    loss = per_token_loss(model, tokens, attention_mask=mask)
    _, delta = ablation_sweep(model, tokens, attention_mask=mask)
    with pytest.raises(ValueError, match="unpadded sequences of one length"):
        loss_by_position(loss)
    with pytest.raises(ValueError, match="unpadded sequences of one length"):
        sweep_table(delta, all_heads(2, 2))
    clean = per_token_loss(model, tokens[:1])
    table = loss_by_position(clean)
    assert torch.allclose(torch.tensor(table["loss"].to_numpy()), clean[0]) and table["token_index"].tolist() == list(range(1, 9))


# ----------------------------------------------------------------------------- patching

def padded_pairs(prompts, side: str, width: int, vocab: int = 50, seed: int = 0):
    """Pad (clean, corrupted) prompt pairs (each (1, len), one length per pair) identically on ``side``
    to ``width`` columns. Padding holds random ids, different in the two runs (it must not matter).
    Returns clean, corrupted, mask."""
    g = torch.Generator().manual_seed(seed)
    clean, corrupted = (torch.randint(0, vocab, (len(prompts), width), generator=g) for _ in range(2))
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, (c, k) in enumerate(prompts):
        cols = slice(width - c.shape[1], width) if side == "left" else slice(0, c.shape[1])
        clean[i, cols], corrupted[i, cols], mask[i, cols] = c[0], k[0], 1
    return clean, corrupted, mask


def by_column(alone, mask):
    """What a padded batch's per-position result must be, from each prompt's unpadded result (..., len):
    at column c the mean over the prompts with a real token there of their entry at that token; NaN
    where every prompt has padding."""
    out = torch.full((*alone[0].shape[:-1], mask.shape[1]), float("nan"))
    for c in range(mask.shape[1]):
        values = [a[..., int(mask[i, :c].sum())] for i, a in enumerate(alone) if mask[i, c]]
        if values:
            out[..., c] = torch.stack(values).mean(0)
    return out


def last_logsumexp(logits, tokens, attention_mask=None):
    """A metric of one's own that leaves padding out: log-sum-exp of each row's logits at its last real token."""
    if attention_mask is None:
        return logits[:, -1].logsumexp(-1)
    last = attention_mask.cumsum(-1).argmax(-1)  # first column holding the row's last real token
    return logits[torch.arange(logits.shape[0]), last].logsumexp(-1)


def row_only(i: int, batch: int):
    """mean_loss_metric of row i only (times the batch size, so the batch mean is that row's value)."""
    def metric(logits, tokens, attention_mask=None):
        return mean_loss_metric(logits, tokens, attention_mask) * (torch.arange(logits.shape[0]) == i) * batch
    return metric


@pytest.mark.parametrize("arch", ["attn_only", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_patching_matches_unpadded_prompts(arch, side):
    """patch_heads (by head and by position) and patch_residual on a padded batch (one mask for clean
    and corrupted; one column padding in every row; padding ids differ between the runs) equal, to
    1e-5, the same call on each prompt pair run unpadded on its own: by head the mean over the prompts
    (and each prompt alone, through a metric of one row), by position each column the mean over the
    prompts with a real token there (NaN where none has), with mean_loss_metric, a per-row logit_diff
    (pos -1: each row's last real token) and a mask-aware metric of one's own."""
    model = _models()[arch]
    g = torch.Generator().manual_seed(6)
    prompts = [tuple(torch.randint(1, 50, (1, n), generator=g) for _ in range(2)) for n in (9, 5, 7)]
    clean, corrupted, mask = padded_pairs(prompts, side, width=10)
    correct, wrong = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    metrics = [(mean_loss_metric, lambda i: mean_loss_metric),
               (logit_diff(correct, wrong), lambda i: logit_diff(correct[i], wrong[i])),
               (last_logsumexp, lambda i: last_logsumexp)]
    calls = [(patch_heads, {}, False), (patch_heads, {"by": "head_pos"}, True), (patch_residual, {}, True)]
    for metric, alone_metric in metrics:
        for fn, kwargs, per_position in calls:
            got = fn(model, clean, corrupted, metric, attention_mask=mask, **kwargs)
            alone = [fn(model, c, k, alone_metric(i), **kwargs) for i, (c, k) in enumerate(prompts)]
            want = by_column(alone, mask) if per_position else torch.stack(alone).mean(0)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, equal_nan=True)
            if per_position:  # the column of padding only is NaN, every other entry a number
                assert got.isnan().flatten(0, -2).any(0).tolist() == (mask.sum(0) == 0).tolist()
    for i, (c, k) in enumerate(prompts):
        got = patch_heads(model, clean, corrupted, row_only(i, 3), attention_mask=mask)
        torch.testing.assert_close(got, patch_heads(model, c, k, mean_loss_metric), atol=1e-5, rtol=0)
    unmasked = patch_heads(model, clean, corrupted, mean_loss_metric)
    assert (unmasked - patch_heads(model, clean, corrupted, mean_loss_metric, attention_mask=mask)).abs().max() > 1e-3
