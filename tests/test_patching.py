"""Tests of activation patching and activation caching against plain PyTorch hooks.

The oracles never touch nnsight or the toolkit's adapters: they hook modules by their HF paths
(``transformer.h[L]``, ``transformer.h[L].attn.c_proj``, ...) with ``register_forward_pre_hook`` /
``register_forward_hook``, or recompute attention by hand."""

import re

import pytest
import torch

from interventions import InterventionError, observable
from interventions.primitives.cache import cache_activations
from interventions.primitives.patching import (logit_diff, mean_loss_metric, patch_heads, patch_patterns,
                                    patch_residual, path_patch, second_copy_loss)

N_LAYERS, N_HEADS, D_HEAD, POS = 2, 4, 8, 6


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(n_layer=N_LAYERS, n_head=N_HEADS, n_embd=32, n_positions=32, vocab_size=50,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, 50, (3, POS), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1:4] = torch.randint(0, 50, (3, 3), generator=g)
    return clean, corrupted


@pytest.fixture(params=["attn_only", "gpt2"])
def model(request, tiny_model, tiny_gpt2):
    return tiny_model if request.param == "attn_only" else tiny_gpt2


def _metric(clean, corrupted):
    return logit_diff(clean[:, -1], corrupted[:, -1] + 1)


def _blocks(model):
    return model.transformer.h


@torch.no_grad()
def _forward(model, tokens, pre_hooks=()):
    """Logits with plain torch forward pre-hooks [(module, fn)] attached (kwargs-aware)."""
    handles = [m.register_forward_pre_hook(fn, with_kwargs=True) for m, fn in pre_hooks]
    try:
        return model(tokens).logits
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _record_inputs(model, tokens, modules):
    """The first positional input of each module on a plain forward pass."""
    seen = {}

    def make(i):
        def fn(mod, args, kwargs):
            seen[i] = args[0].clone()
        return fn

    _forward(model, tokens, [(m, make(i)) for i, m in enumerate(modules)])
    return [seen[i] for i in range(len(modules))]


def _replace_input(index, value):
    def fn(mod, args, kwargs):
        x = args[0].clone()
        x[index] = value
        return (x,) + args[1:], kwargs
    return fn


# ----------------------------------------------------------------------------- invariants

def test_identical_runs_give_clean_metric(model, pair):
    """With clean == corrupted every patch is a no-op: each entry equals the unpatched metric."""
    clean, _ = pair
    metric = _metric(clean, clean)
    base = metric(_forward(model, clean)).mean()
    for result in (patch_heads(model, clean, clean, metric),
                   patch_heads(model, clean, clean, metric, by="head_pos", heads_per_pass=16),
                   patch_residual(model, clean, clean, metric),
                   patch_patterns(model, clean, clean, metric)):
        torch.testing.assert_close(result, base.expand_as(result), atol=1e-5, rtol=0)


def test_patch_heads_matches_pre_hook(model, pair):
    """patch_heads(by="head") equals a plain forward pre-hook on c_proj that overwrites the head's
    slice in the corrupted run with the slice recorded (by a pre-hook) on the clean run."""
    clean, corrupted = pair
    metric = _metric(clean, corrupted)
    o_projs = [b.attn.c_proj for b in _blocks(model)]
    src = _record_inputs(model, clean, o_projs)  # (batch, pos, head*d_head) per layer
    got = patch_heads(model, clean, corrupted, metric, heads_per_pass=3)
    want = torch.empty(N_LAYERS, N_HEADS)
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            sl = slice(head * D_HEAD, (head + 1) * D_HEAD)
            hook = _replace_input((slice(None), slice(None), sl), src[layer][:, :, sl])
            want[layer, head] = metric(_forward(model, corrupted, [(o_projs[layer], hook)])).mean()
    assert got.shape == (N_LAYERS, N_HEADS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - metric(_forward(model, corrupted)).mean()).abs().max() > 1e-4  # patches matter


def test_patch_heads_by_position_matches_pre_hook(tiny_model, pair):
    """patch_heads(by="head_pos") equals the pre-hook oracle writing one head at one position."""
    clean, corrupted = pair
    metric = _metric(clean, corrupted)
    o_projs = [b.attn.c_proj for b in _blocks(tiny_model)]
    src = _record_inputs(tiny_model, clean, o_projs)
    got = patch_heads(tiny_model, clean, corrupted, metric, by="head_pos", heads_per_pass=7)
    want = torch.empty(N_LAYERS, N_HEADS, POS)
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            sl = slice(head * D_HEAD, (head + 1) * D_HEAD)
            for p in range(POS):
                hook = _replace_input((slice(None), p, sl), src[layer][:, p, sl])
                want[layer, head, p] = metric(_forward(tiny_model, corrupted, [(o_projs[layer], hook)])).mean()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Position 0 holds the same token in both runs and attends only to itself: a no-op everywhere.
    base = metric(_forward(tiny_model, corrupted)).mean()
    torch.testing.assert_close(got[:, :, 0], base.expand(N_LAYERS, N_HEADS), atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-4


def test_direction_flip(tiny_model, pair):
    """corrupted_to_clean on (clean, corrupted) is clean_to_corrupted on (corrupted, clean)."""
    clean, corrupted = pair
    metric = _metric(clean, corrupted)
    for fn in (patch_heads, patch_residual, patch_patterns):
        a = fn(tiny_model, clean, corrupted, metric, direction="corrupted_to_clean")
        b = fn(tiny_model, corrupted, clean, metric, direction="clean_to_corrupted")
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    a = patch_heads(tiny_model, clean, corrupted, metric, direction="corrupted_to_clean")
    b = patch_heads(tiny_model, clean, corrupted, metric)
    assert (a - b).abs().max() > 1e-4  # the two directions are different experiments


def test_patch_residual_matches_block_pre_hook(model, pair):
    """patch_residual equals a plain forward pre-hook on block L replacing hidden_states[:, p] with the
    clean run's block input there."""
    clean, corrupted = pair
    metric = _metric(clean, corrupted)
    blocks = list(_blocks(model))
    src = _record_inputs(model, clean, blocks)  # (batch, pos, d_model) per layer
    got = patch_residual(model, clean, corrupted, metric, patches_per_pass=5)
    want = torch.empty(N_LAYERS, POS)
    for layer in range(N_LAYERS):
        for p in range(POS):
            hook = _replace_input((slice(None), p), src[layer][:, p])
            want[layer, p] = metric(_forward(model, corrupted, [(blocks[layer], hook)])).mean()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Where the two runs' residuals already agree the patch is a no-op: position 0 at every layer
    # (same token, sees only itself) and, at layer 0, the untouched positions 4 and 5 (embeddings).
    base = metric(_forward(model, corrupted)).mean()
    torch.testing.assert_close(got[:, 0], base.expand(N_LAYERS), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[0, 4:], base.expand(2), atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-4


@torch.no_grad()
def test_patch_patterns_attn_only_matches_forward_hook(tiny_model, pair):
    """patch_patterns equals the eager forward (output_attentions=True) with a plain forward hook on
    the pattern module swapping in the clean run's pattern of that head."""
    clean, corrupted = pair
    metric = _metric(clean, corrupted)
    src = tiny_model(clean, output_attentions=True).attentions  # (batch, head, q, k) per layer
    impl = tiny_model.config._attn_implementation
    got = patch_patterns(tiny_model, clean, corrupted, metric, heads_per_pass=3)
    assert tiny_model.config._attn_implementation == impl  # the model was restored
    want = torch.empty(N_LAYERS, N_HEADS)
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            def hook(mod, args, out, layer=layer, head=head):
                out = out.clone()
                out[:, head] = src[layer][:, head]
                return out
            h = tiny_model.transformer.h[layer].attn.hook_pattern.register_forward_hook(hook)
            try:
                want[layer, head] = metric(tiny_model(corrupted, output_attentions=True).logits).mean()
            finally:
                h.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_patch_patterns_gpt2_matches_monkeypatched_attention(tiny_gpt2, pair, monkeypatch):
    """On GPT-2, patch_patterns equals an eager run whose attention function (monkeypatched, written
    out by hand) uses the clean pattern for one head."""
    from transformers.models.gpt2 import modeling_gpt2

    clean, corrupted = pair
    metric = _metric(clean, corrupted)
    got = patch_patterns(tiny_gpt2, clean, corrupted, metric)
    assert not hasattr(tiny_gpt2.transformer.h[0].attn, "hook_pattern")  # observable cleaned up
    state = {"swap": None, "record": {}}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scores = query @ key.transpose(-1, -2) * (scaling or query.shape[-1] ** -0.5)  # (b, h, q, k)
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        state["record"][module.layer_idx] = weights.clone()
        if state["swap"] is not None and state["swap"][0] == module.layer_idx:
            weights = weights.clone()
            weights[:, state["swap"][1]] = state["swap"][2]
        return (weights @ value).transpose(1, 2), weights

    monkeypatch.setattr(modeling_gpt2, "eager_attention_forward", attention)
    old = tiny_gpt2.config._attn_implementation
    tiny_gpt2.config._attn_implementation = "eager"
    try:
        tiny_gpt2(clean)
        src = dict(state["record"])
        assert sorted(src) == list(range(N_LAYERS))  # the hand-written attention ran in every layer
        want = torch.empty(N_LAYERS, N_HEADS)
        for layer in range(N_LAYERS):
            for head in range(N_HEADS):
                state["swap"] = (layer, head, src[layer][:, head])
                want[layer, head] = metric(tiny_gpt2(corrupted).logits).mean()
    finally:
        tiny_gpt2.config._attn_implementation = old
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- metrics and inputs

def test_metrics_and_batching_invariance(tiny_model, pair):
    """A scalar metric works like a per-row one; mean_loss_metric is the mean next-token loss; the
    result does not depend on how many patches share a pass."""
    clean, corrupted = pair
    per_row = mean_loss_metric
    scalar = lambda logits, tokens: per_row(logits, tokens).mean()  # noqa: E731
    a = patch_heads(tiny_model, clean, corrupted, per_row, heads_per_pass=1)
    b = patch_heads(tiny_model, clean, corrupted, scalar, heads_per_pass=8)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    logits = _forward(tiny_model, corrupted)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), corrupted[:, 1:].reshape(-1))
    torch.testing.assert_close(per_row(logits, corrupted).mean(), want, atol=1e-5, rtol=0)


def test_bad_inputs(tiny_model, pair):
    """Mismatched shapes, unknown `by`/direction, a bad per-pass count and a metric of the wrong shape
    raise ValueError naming the fix."""
    clean, corrupted = pair
    metric = _metric(clean, corrupted)
    with pytest.raises(ValueError, match="same \\(batch, pos\\)"):
        patch_heads(tiny_model, clean, corrupted[:, :-1], metric)
    with pytest.raises(ValueError, match="same \\(batch, pos\\)"):
        patch_residual(tiny_model, clean, corrupted[:2], metric)
    with pytest.raises(ValueError, match="'head' .*'head_pos'"):
        patch_heads(tiny_model, clean, corrupted, metric, by="layer")
    with pytest.raises(ValueError, match="clean_to_corrupted"):
        patch_patterns(tiny_model, clean, corrupted, metric, direction="forward")
    with pytest.raises(ValueError, match="heads_per_pass"):
        patch_heads(tiny_model, clean, corrupted, metric, heads_per_pass=0)
    with pytest.raises(ValueError, match="\\(batch,\\) tensor"):
        patch_heads(tiny_model, clean, corrupted, lambda logits, tokens: logits[:, -1])
    with pytest.raises(ValueError, match="\\(logits, tokens\\)"):  # a metric must be told the measured run's tokens
        patch_heads(tiny_model, clean, corrupted, lambda logits: logits[:, -1, 0])
    with pytest.raises(ValueError, match="add a batch dimension"):
        patch_heads(tiny_model, clean[0], corrupted[0], metric)
    # one-token sequences have no next-token loss: every entry used to come back NaN
    for run in (lambda: patch_heads(tiny_model, clean[:, :1], corrupted[:, :1], mean_loss_metric),
                lambda: patch_residual(tiny_model, clean[:, :1], corrupted[:, :1], mean_loss_metric),
                lambda: path_patch(tiny_model, clean[:, :1], corrupted[:, :1], mean_loss_metric, "L0H0", "L1H0"),
                lambda: mean_loss_metric(torch.zeros(2, 1, 5), torch.zeros(2, 1, dtype=torch.long))):
        with pytest.raises(ValueError, match="at least 2 tokens"):
            run()


# ----------------------------------------------------------------------------- cache

def test_cache_matches_hooks(model, pair):
    """Cached z / resid_pre / k equal the inputs of c_proj / the block and the key part of
    the key projection's output as recorded by plain hooks; the pattern equals output_attentions."""
    clean, _ = pair
    is_gpt2 = model.config.model_type == "gpt2"
    k_mod = model.transformer.h[1].attn.c_attn if is_gpt2 else model.transformer.h[1].attn.k_proj
    outs = {}
    h = k_mod.register_forward_hook(lambda m, a, o: outs.setdefault("k", o.clone()))
    try:
        z0, r1 = _record_inputs(model, clean, [model.transformer.h[0].attn.c_proj, model.transformer.h[1]])
    finally:
        h.remove()
    keys = outs["k"][..., 32:64] if is_gpt2 else outs["k"]
    cache = cache_activations(model, clean, ["L0.z", "L1.resid_pre", "L1.k"])
    assert set(cache) == {"L0.z", "L1.resid_pre", "L1.k"}
    torch.testing.assert_close(cache["L0.z"], z0.view(3, POS, N_HEADS, D_HEAD), atol=0, rtol=0)
    torch.testing.assert_close(cache["L1.resid_pre"], r1, atol=0, rtol=0)
    torch.testing.assert_close(cache["L1.k"], keys.reshape(3, POS, N_HEADS, D_HEAD), atol=0, rtol=0)
    with pytest.raises(InterventionError, match="observable"):
        cache_activations(model, clean, "L0.pattern")
    model.config._attn_implementation, old = "eager", model.config._attn_implementation
    try:
        with torch.no_grad():
            want = model(clean, output_attentions=True).attentions[1]
    finally:
        model.config._attn_implementation = old
    with observable(model):
        got = cache_activations(model, clean, "L1.pattern")["L1.pattern"]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_cache_bad_sites(tiny_model, pair):
    """Malformed site names, unknown kinds and out-of-range layers raise ValueError naming valid forms."""
    clean, _ = pair
    for bad in ("L0.bogus", "blocks.0.hook_z", "L0head_out"):
        with pytest.raises(ValueError, match="L<layer>.<kind>"):
            cache_activations(tiny_model, clean, [bad])
    with pytest.raises(ValueError, match="layers 0-1"):
        cache_activations(tiny_model, clean, ["L2.resid_pre"])
    with pytest.raises(ValueError, match="no sites"):
        cache_activations(tiny_model, clean, [])


# ----------------------------------------------------------------------------- refused before the runs

@pytest.fixture
def forwards(tiny_model):
    """Counts forward calls of ``tiny_model`` (a plain forward pre-hook on it)."""
    calls = []
    handle = tiny_model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    yield calls
    handle.remove()


def test_logit_diff_pos_takes_a_numpy_integer_and_refuses_several_positions(tiny_model, pair, forwards):
    """A numpy integer pos is that int position; a list (or another non-int) is refused before any forward
    as not one position, saying how to measure several (before: both were reported "out of range")."""
    import numpy as np

    clean, corrupted = pair
    for pos in ([1, 2], (3,), 2.0, np.array([1])):
        forwards.clear()
        match = rf"pos={re.escape(repr(pos))} is not one position: pass an int in \[-6, 6\) \(for several positions, "
        with pytest.raises(ValueError, match=match + "measure each with its own logit_diff"):
            patch_heads(tiny_model, clean, corrupted, logit_diff(1, 2, pos=pos), progress=False)
        assert forwards == []
    for pos in (np.int64(2), np.int32(-1)):
        assert logit_diff(1, 2, pos=pos).pos == int(pos) and type(logit_diff(1, 2, pos=pos).pos) is int
        torch.testing.assert_close(patch_heads(tiny_model, clean, corrupted, logit_diff(1, 2, pos=pos), progress=False),
                                   patch_heads(tiny_model, clean, corrupted, logit_diff(1, 2, pos=int(pos)),
                                               progress=False), atol=0, rtol=0)


def test_logit_diff_pos_takes_a_0d_integer_tensor(tiny_model, pair, forwards):
    """A 0-d integer tensor pos (e.g. an argmax) is that int position, as a numpy integer is (it was refused
    as not one position); a 0-d bool or float tensor and a 1-d tensor are still refused before any forward."""
    clean, corrupted = pair
    logits = torch.randn(3, POS, 50, generator=torch.Generator().manual_seed(0))
    for pos in (torch.tensor(2), torch.tensor(-1, dtype=torch.int32), torch.tensor(3, dtype=torch.uint8)):
        metric = logit_diff(1, 2, pos=pos)
        assert metric.pos == int(pos) and type(metric.pos) is int
        torch.testing.assert_close(metric(logits, None), logits[:, int(pos), 1] - logits[:, int(pos), 2],
                                   atol=0, rtol=0)
        torch.testing.assert_close(patch_heads(tiny_model, clean, corrupted, metric, progress=False),
                                   patch_heads(tiny_model, clean, corrupted, logit_diff(1, 2, pos=int(pos)),
                                               progress=False), atol=0, rtol=0)
    for pos, match in ((torch.tensor(True), r"pos=tensor\(True\) is a bool, not a position"),
                       (torch.tensor(2.0), r"pos=tensor\(2\.\) is not one position"),
                       (torch.tensor([2]), r"pos=tensor\(\[2\]\) is not one position")):
        forwards.clear()
        with pytest.raises(ValueError, match=match):
            patch_heads(tiny_model, clean, corrupted, logit_diff(1, 2, pos=pos), progress=False)
        assert forwards == []


def test_second_copy_loss_length_is_checked_as_every_count_is():
    """second_copy_loss takes a numpy integer length (it was refused), giving the hand loss of the second copy,
    and refuses a bool (an int subclass) and lengths below 2 with the library's count message and its reason."""
    import numpy as np

    tokens = torch.tensor([[0, 5, 6, 7, 5, 6, 7]])  # BOS + A + A, length 3
    logits = torch.randn(1, 7, 10, generator=torch.Generator().manual_seed(0))
    hand = -(logits[0, 4].log_softmax(-1)[6] + logits[0, 5].log_softmax(-1)[7]) / 2  # tokens 6, 7 of the copy
    torch.testing.assert_close(second_copy_loss(np.int64(3))(logits, tokens), hand[None], atol=1e-6, rtol=0)
    for bad in (True, 1, 3.0):
        with pytest.raises(ValueError, match=rf"length={bad!r} must be an integer >= 2: the number of tokens repeated"):
            second_copy_loss(bad)


def test_metric_of_the_wrong_shape_refused_before_any_patched_run(tiny_model, pair, forwards):
    """A metric of one's own that returns the wrong shape is refused, naming the expected (batch,)
    shape, after the source run alone (one forward): it was refused only after the first pass of
    patched runs (path_patch: after its target and step-1 runs too)."""
    clean, corrupted = pair
    wrong = lambda logits, tokens: logits[:, -1]  # noqa: E731  (batch, vocab)
    for call in (lambda: patch_heads(tiny_model, clean, corrupted, wrong),
                 lambda: patch_heads(tiny_model, clean, corrupted, wrong, by="head_pos"),
                 lambda: patch_residual(tiny_model, clean, corrupted, wrong),
                 lambda: patch_patterns(tiny_model, clean, corrupted, wrong),
                 lambda: path_patch(tiny_model, clean, corrupted, wrong, "L0H0", "L1H0")):
        forwards.clear()
        with pytest.raises(ValueError, match=r"returned \(3, 50\): .*\(batch,\) tensor \(batch=3\)"):
            call()
        assert len(forwards) == 1


def test_padded_batch_bad_input_refused_before_any_run(tiny_model, pair, forwards):
    """On a padded batch a mask of the wrong shape, a metric that cannot be given the mask, a row too
    short for mean_loss_metric and a logit_diff position outside a row's real tokens raise ValueError
    naming the fix before any forward; a scalar metric, which cannot leave out the rows a one-position
    patch finds padding in, after the source run alone."""
    clean, corrupted = pair  # (3, 6)
    mask = torch.ones(3, POS, dtype=torch.long)
    mask[0, :2] = 0  # row 0: 4 real tokens
    short = mask.clone()
    short[1, :5] = 0  # row 1: one real token

    def calls(metric, m):
        return (lambda: patch_heads(tiny_model, clean, corrupted, metric, attention_mask=m),
                lambda: patch_residual(tiny_model, clean, corrupted, metric, attention_mask=m),
                lambda: path_patch(tiny_model, clean, corrupted, metric, "L0H0", "L1H0", attention_mask=m))

    cases = [(mean_loss_metric, mask[:, 1:], "attention_mask must be a tensor of the tokens' shape"),
             (logit_diff(1, 2), mask.tolist(), r"tokens' shape \(3, 6\), got list"),
             (lambda logits, tokens: logits[:, -1, 0], mask, "def metric\\(logits, tokens, attention_mask=None\\)"),
             (mean_loss_metric, short, "attention_mask row 1 has 1 real token"),
             (logit_diff(1, 2, pos=4), mask, "pos=4 is out of range for row 0, which has 4 real tokens")]
    for metric, m, match in cases:
        for call in calls(metric, m):
            forwards.clear()
            with pytest.raises(ValueError, match=match):
                call()
            assert forwards == []
    scalar = lambda logits, tokens, attention_mask=None: mean_loss_metric(logits, tokens, attention_mask).mean()  # noqa: E731
    for call in (lambda: patch_heads(tiny_model, clean, corrupted, scalar, by="head_pos", attention_mask=mask),
                 lambda: patch_residual(tiny_model, clean, corrupted, scalar, attention_mask=mask)):
        forwards.clear()
        with pytest.raises(ValueError, match="one value per row"):
            call()
        assert len(forwards) == 1
    # a scalar is fine where every patch covers every row, and equals the per-row metric's mean there
    torch.testing.assert_close(patch_heads(tiny_model, clean, corrupted, scalar, attention_mask=mask),
                               patch_heads(tiny_model, clean, corrupted, mean_loss_metric, attention_mask=mask),
                               atol=1e-6, rtol=0)
