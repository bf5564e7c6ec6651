"""Left-padded batches: every primitive gives, at real tokens, what the unpadded sequences give."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from interventions import (AttnOnlyConfig, AttnOnlyForCausalLM, PatternPreserving, ZeroAblation, ablation_sweep,
                           per_token_loss)


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
