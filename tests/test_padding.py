"""Padded batches: every primitive gives, at real tokens, what the unpadded sequences give (left
padding; the patching functions left and right padding)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from interventions import (AttnOnlyConfig, AttnOnlyForCausalLM, PatternPreserving, ZeroAblation, ablation_sweep,
                           mean_loss_metric, patch_heads, per_token_loss)
from interventions.primitives.patching import DIRECTIONS, logit_diff, patch_patterns, patch_residual, path_patch


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


@pytest.mark.parametrize("arch", ["attn_only", "gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_patch_patterns_matches_unpadded_prompts(arch, side):
    """patch_patterns on a padded batch (one mask for clean and corrupted; padding ids differ between the
    runs; 3 patches per pass) equals, to 1e-5, the same call on each prompt pair run unpadded on its own:
    the mean over the prompts (and each prompt alone, through a metric of one row), in both directions,
    with mean_loss_metric, a per-row logit_diff (pos -2: each row's real tokens) and a mask-aware metric
    of one's own; our model, GPT-2 (learned positions: ids from the mask) and Llama with grouped-query
    attention (rotary). Without the mask the result differs."""
    from .test_ablation import VOCAB, build

    model = build(arch)
    g = torch.Generator().manual_seed(16)
    prompts = [tuple(torch.randint(1, VOCAB, (1, n), generator=g) for _ in range(2)) for n in (9, 5, 7)]
    clean, corrupted, mask = padded_pairs(prompts, side, width=10, vocab=VOCAB)
    correct, wrong = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    metrics = [(mean_loss_metric, lambda i: mean_loss_metric),
               (logit_diff(correct, wrong, pos=-2), lambda i: logit_diff(correct[i], wrong[i], pos=-2)),
               (last_logsumexp, lambda i: last_logsumexp)]
    for direction in DIRECTIONS:
        for metric, alone_metric in metrics:
            got = patch_patterns(model, clean, corrupted, metric, direction=direction, heads_per_pass=3,
                                 attention_mask=mask)  # (n_layers, n_heads)
            alone = [patch_patterns(model, c, k, alone_metric(i), direction=direction)
                     for i, (c, k) in enumerate(prompts)]
            torch.testing.assert_close(got, torch.stack(alone).mean(0), atol=1e-5, rtol=0)
            assert got.std() > 1e-3  # the heads' patterns move the metric differently
    for i, (c, k) in enumerate(prompts):
        got = patch_patterns(model, clean, corrupted, row_only(i, 3), attention_mask=mask)
        torch.testing.assert_close(got, patch_patterns(model, c, k, mean_loss_metric), atol=1e-5, rtol=0)
    masked = patch_patterns(model, clean, corrupted, mean_loss_metric, attention_mask=mask)
    assert (patch_patterns(model, clean, corrupted, mean_loss_metric) - masked).abs().max() > 1e-3


def test_padded_patch_patterns_fp16_left_padding_has_no_nan():
    """In fp16 a left-padded query row has no real key: observable's eager attention added the mask's
    dtype minimum to its scores in fp16, where it overflows to -inf once scores are below -16, so that
    row's pattern was NaN, and the padded keys' values (0 * NaN) carried it to every real query of the
    next layer: patch_patterns gave NaN everywhere. The mask is now added in float32 (where the softmax
    runs): the result equals the prompt pairs run unpadded (fp16 rounding)."""
    from .test_ablation import VOCAB, build

    model = build("gpt2")
    d = model.config.n_embd
    with torch.no_grad():  # every score about -16 * 8 / sqrt(8): below fp16's overflow for a masked key
        for block in model.transformer.h:
            block.attn.c_attn.bias[:d] += 4.0
            block.attn.c_attn.bias[d:2 * d] -= 4.0
    model = model.half()
    g = torch.Generator().manual_seed(17)
    prompts = [tuple(torch.randint(1, VOCAB, (1, n), generator=g) for _ in range(2)) for n in (9, 5, 7)]
    clean, corrupted, mask = padded_pairs(prompts, "left", width=10, vocab=VOCAB)
    got = patch_patterns(model, clean, corrupted, mean_loss_metric, attention_mask=mask)
    want = torch.stack([patch_patterns(model, c, k, mean_loss_metric) for c, k in prompts]).mean(0)
    assert got.isfinite().all()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def _count_forwards(model):
    """A list that grows by one per forward of ``model`` (a plain pre-hook) and the hook's handle."""
    calls = []
    return calls, model.register_forward_pre_hook(lambda mod, args: calls.append(1))


def test_padding_between_real_tokens_refused_before_any_run():
    """A mask with padding *between* a row's real tokens is refused (ValueError naming the row, the
    column and the fix) before any forward by patch_heads, patch_residual, path_patch and patch_patterns
    (which leaves the model's attention implementation as it was). It ran: the
    runs drop the gap (position ids skip it) but mean_loss_metric drops the loss across it too, so
    patch_heads on this GPT-2 gave 0.05 nats off the row's real tokens run unpadded, silently. A row
    padded at both ends (one run of real tokens) is accepted and equals the prompts run unpadded."""
    model = _models()["gpt2"]
    g = torch.Generator().manual_seed(11)
    clean, corrupted = torch.randint(1, 50, (2, 8), generator=g), torch.randint(1, 50, (2, 8), generator=g)
    gap = torch.ones(2, 8, dtype=torch.long)
    gap[1, 3] = 0
    impl = model.config._attn_implementation
    calls, handle = _count_forwards(model)
    try:
        for call in (lambda m: patch_heads(model, clean, corrupted, m, attention_mask=gap),
                     lambda m: patch_heads(model, clean, corrupted, m, by="head_pos", attention_mask=gap),
                     lambda m: patch_residual(model, clean, corrupted, m, attention_mask=gap),
                     lambda m: path_patch(model, clean, corrupted, m, "L0H0", "L1H1", attention_mask=gap),
                     lambda m: patch_patterns(model, clean, corrupted, m, attention_mask=gap)):
            for metric in (mean_loss_metric, logit_diff(1, 2)):
                with pytest.raises(ValueError, match=r"row 1 has padding between real tokens \(column 3\).*left or "
                                                     "the right"):
                    call(metric)
        assert calls == [] and model.config._attn_implementation == impl
    finally:
        handle.remove()
    # every primitive refuses it, before any forward (the engine's one mask check): per_token_loss ran it
    # and gave NaN for the losses across the gap, which the row's real tokens run unpadded have
    calls, handle = _count_forwards(model)
    try:
        for call in (lambda: per_token_loss(model, clean, attention_mask=gap),
                     lambda: per_token_loss(model, clean, ZeroAblation("L0H0"), attention_mask=gap),
                     lambda: ablation_sweep(model, clean, attention_mask=gap)):
            with pytest.raises(ValueError, match=r"row 1 has padding between real tokens \(column 3\)"):
                call()
        assert calls == []
    finally:
        handle.remove()
    # padding at both ends of a row is one run of real tokens: accepted, equal to the prompts alone
    ends = torch.ones(2, 8, dtype=torch.long)
    ends[0, :2] = ends[0, -1] = 0
    prompts = [(clean[i:i + 1, ends[i].bool()], corrupted[i:i + 1, ends[i].bool()]) for i in range(2)]
    for fn, kwargs, per_position in ((patch_heads, {}, False), (patch_residual, {}, True)):
        got = fn(model, clean, corrupted, mean_loss_metric, attention_mask=ends, **kwargs)
        each = [fn(model, c, k, mean_loss_metric, **kwargs) for c, k in prompts]
        want = by_column(each, ends) if per_position else torch.stack(each).mean(0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, equal_nan=True)


def test_metric_that_requires_the_mask_is_taken():
    """On a padded batch the metric is called metric(logits, tokens, attention_mask=mask), so one whose
    attention_mask parameter is required (positional or keyword-only), or that takes **kwargs, fits:
    each gives the prompts' unpadded mean (patch_heads by head; patch_residual by column). A required
    mask parameter was refused as a metric that does not take (logits, tokens). Without a mask a metric
    that requires one is refused, naming the mask."""
    model = _models()["attn_only"]
    g = torch.Generator().manual_seed(12)
    prompts = [tuple(torch.randint(1, 50, (1, n), generator=g) for _ in range(2)) for n in (7, 4)]
    clean, corrupted, mask = padded_pairs(prompts, "left", width=8)

    def required(logits, tokens, attention_mask):
        return mean_loss_metric(logits, tokens, attention_mask)

    def keyword_only(logits, tokens, *, attention_mask):
        return mean_loss_metric(logits, tokens, attention_mask)

    def forwarding(logits, tokens, **kwargs):
        return mean_loss_metric(logits, tokens, **kwargs)

    by_head = torch.stack([patch_heads(model, c, k, mean_loss_metric) for c, k in prompts]).mean(0)
    by_pos = by_column([patch_residual(model, c, k, mean_loss_metric) for c, k in prompts], mask)
    for metric in (required, keyword_only, forwarding):
        torch.testing.assert_close(patch_heads(model, clean, corrupted, metric, attention_mask=mask), by_head,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(patch_residual(model, clean, corrupted, metric, attention_mask=mask), by_pos,
                                   atol=1e-5, rtol=0, equal_nan=True)
    for metric in (required, keyword_only):
        with pytest.raises(ValueError, match="requires attention_mask.*pass attention_mask="):
            patch_heads(model, *prompts[0], metric)


def test_logit_diff_called_on_a_padded_batch_refuses_pos_outside_a_row():
    """logit_diff called directly with a mask reads, for each row, its real token number pos; a pos
    outside some row's real tokens is refused (ValueError naming the row) instead of silently reading
    column 0 (a padding column: no real token matched). In range it equals each row's real tokens
    indexed by hand (plain tensor indexing), for pos >= 0 and < 0, left and right padding."""
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(2, 5, 7, generator=g)
    correct, wrong = torch.tensor([1, 3]), torch.tensor([2, 4])
    for mask in (torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])):
        for pos in (0, 2, -1, -3):
            got = logit_diff(correct, wrong, pos=pos)(logits, None, mask)
            want = torch.stack([logits[i, mask[i].bool()][pos, correct[i]] - logits[i, mask[i].bool()][pos, wrong[i]]
                                for i in range(2)])
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        for pos in (3, 4, -4, -5):
            with pytest.raises(ValueError, match=f"pos={pos} is out of range for row 0, which has 3 real tokens"):
                logit_diff(correct, wrong, pos=pos)(logits, None, mask)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_noising_on_llama_gqa_matches_unpadded_prompts(side):
    """direction="corrupted_to_clean" on a Llama with grouped-query attention (rotary positions are
    shift-invariant: GPT-2 above tests absolute ones), patch_heads by="head_pos" at z and at the
    key/value heads' k, with logit_diff at a pos >= 0 and < 0 (each row's real tokens) and
    mean_loss_metric, several patches per pass: each column the mean over the prompts with a real
    token there of the same call on each prompt pair run unpadded (1e-5)."""
    from .test_ablation import VOCAB, build

    model = build("llama")
    g = torch.Generator().manual_seed(14)
    prompts = [tuple(torch.randint(1, VOCAB, (1, n), generator=g) for _ in range(2)) for n in (7, 4, 6)]
    clean, corrupted, mask = padded_pairs(prompts, side, width=8, vocab=VOCAB)
    correct, wrong = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    metrics = [(mean_loss_metric, lambda i: mean_loss_metric)] + [
        (logit_diff(correct, wrong, pos=p), lambda i, p=p: logit_diff(correct[i], wrong[i], pos=p)) for p in (2, -3)]
    for site in ("z", "k"):
        for metric, alone_metric in metrics:
            got = patch_heads(model, clean, corrupted, metric, by="head_pos", site=site, direction="corrupted_to_clean",
                              heads_per_pass=5, attention_mask=mask)
            alone = [patch_heads(model, c, k, alone_metric(i), by="head_pos", site=site,
                                 direction="corrupted_to_clean") for i, (c, k) in enumerate(prompts)]
            torch.testing.assert_close(got, by_column(alone, mask), atol=1e-5, rtol=0, equal_nan=True)
            assert got.nan_to_num(0).std() > 1e-3  # the patches move the metric


def test_patching_takes_a_mask_of_any_0_1_dtype():
    """A mask of dtype bool, int32 or float (0/1) gives what the long mask gives, exactly, in patch_heads
    by position and patch_residual (logit_diff's columns, mean_loss_metric's real losses, the rows a
    column counts), path_patch and patch_patterns; the long mask's results equal the prompts run
    unpadded (tests above), and differ from the unmasked call here."""
    model = _models()["gpt2"]
    g = torch.Generator().manual_seed(15)
    prompts = [tuple(torch.randint(1, 50, (1, n), generator=g) for _ in range(2)) for n in (6, 3)]
    clean, corrupted, mask = padded_pairs(prompts, "right", width=7)
    calls = [lambda m, metric: patch_heads(model, clean, corrupted, metric, by="head_pos", attention_mask=m),
             lambda m, metric: patch_residual(model, clean, corrupted, metric, attention_mask=m),
             lambda m, metric: path_patch(model, clean, corrupted, metric, ["L0H0", "L0H1"], "L1H1", attention_mask=m),
             lambda m, metric: patch_patterns(model, clean, corrupted, metric, attention_mask=m)]
    for metric in (mean_loss_metric, logit_diff(torch.tensor([3, 4]), torch.tensor([5, 6]), pos=-2)):
        for call in calls:
            want = call(mask, metric)
            assert not torch.allclose(want, call(None, metric), equal_nan=True)
            for dtype in (torch.bool, torch.int32, torch.float32):
                torch.testing.assert_close(call(mask.to(dtype), metric), want, atol=0, rtol=0, equal_nan=True)
