"""Path patching against a plain-torch implementation (forward hooks only) on tiny models, and on the
hand-built two-layer induction circuit of tests/test_scores.py: the previous-token head reaches the
induction head through its keys (K-composition), not its queries or values."""

import copy

import pytest
import torch

from interventions import mean_loss_metric, path_patch
from interventions.analysis.scores import repeated_random_tokens

from .oracle import inputs_of
from .test_ablation import VOCAB, build
from .test_engine import D_HEAD, PATHS
from .test_padding import padded_pairs, row_only
from .test_scores import BOS, POOL, circuit_model


def _metric(logits, tokens):
    """Mean next-token loss of each sequence (a function of the measured run's tokens)."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1).mean(-1)


def _build3(arch: str, n_kv: int | None = None, seed: int = 0):
    """A tiny random 3-layer GPT-2 or Llama (4 heads of 8; Llama with ``n_kv`` key/value heads), with
    weights large enough that paths, through the layer-1 heads too, move the loss."""
    import transformers as T

    torch.manual_seed(seed)
    if arch == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64))
    else:
        model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                                 num_attention_heads=4, num_key_value_heads=n_kv,
                                                 intermediate_size=64, max_position_embeddings=64))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(0.6 * torch.randn(p.shape, generator=g))
            elif "bias" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # norm gains
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


def _without_gqa(model):
    """Weight surgery: the same function as a Llama with grouped-query attention, with one key/value
    head per query head (each k_proj / v_proj head copied to every query head of its group)."""
    import transformers as T

    cfg = copy.deepcopy(model.config)
    n_kv, cfg.num_key_value_heads = cfg.num_key_value_heads, cfg.num_attention_heads
    group = cfg.num_attention_heads // n_kv
    state = {k: (v.view(n_kv, D_HEAD, -1).repeat_interleave(group, 0).flatten(0, 1)
                 if k.endswith(("k_proj.weight", "v_proj.weight")) else v) for k, v in model.state_dict().items()}
    mha = T.LlamaForCausalLM(cfg).eval()
    mha.load_state_dict(state)
    return mha


def _projection(model, layer, kind, head):
    """The module whose output holds ``head``'s q, k or v (k/v: a key/value head), and its columns."""
    arch = model.config.model_type
    qkv = PATHS[arch]["qkv"]
    if isinstance(qkv, str):  # GPT-2's fused c_attn: q | k | v
        off = "qkv".index(kind) * 32 + head * D_HEAD
        return model.get_submodule(qkv.format(layer)), slice(off, off + D_HEAD)
    return model.get_submodule(qkv["qkv".index(kind)].format(layer)), slice(head * D_HEAD, (head + 1) * D_HEAD)


@torch.no_grad()
def _oracle(model, target, source, sender, receiver, kind):
    """Path patching with plain forward hooks: run 1 freezes every head's output (the o_proj input)
    below the receiver's layer at its target-run value except the sender's, set to its source-run
    value, and records the receiver's q/k/v (projection output columns, by hand); run 2 patches only
    that (under grouped-query attention: the key/value head, with the group's other query heads'
    outputs kept at their target-run values, so only the receiver reads the patched keys/values)."""
    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    o_projs = [model.get_submodule(PATHS[cfg.model_type]["o"].format(l)) for l in range(n_layers)]
    cols = lambda h: slice(h * D_HEAD, (h + 1) * D_HEAD)  # noqa: E731  head h's columns of z

    tz, sz = inputs_of(model, o_projs, target), inputs_of(model, o_projs, source)

    def freeze(l):
        def hook(mod, args):
            z = tz[l].clone()
            if l == sender[0]:
                z[..., cols(sender[1])] = sz[l][..., cols(sender[1])]
            return (z,)
        return hook

    group = n_heads // n_kv
    head = receiver[1] if kind == "q" else receiver[1] // group
    proj, c = _projection(model, receiver[0], kind, head)
    recorded = {}
    hs = [o_projs[l].register_forward_pre_hook(freeze(l)) for l in range(receiver[0])]
    hs.append(proj.register_forward_hook(lambda mod, args, out: recorded.__setitem__("x", out[..., c].clone())))
    model(target)
    for h in hs:
        h.remove()

    def patch(mod, args, out):
        out = out.clone()
        out[..., c] = recorded["x"]
        return out

    def keep_group(mod, args):  # the other query heads of the receiver's group: target-run outputs
        z = args[0].clone()
        for h in range(head * group, (head + 1) * group):
            if h != receiver[1]:
                z[..., cols(h)] = tz[receiver[0]][..., cols(h)]
        return (z,)

    hs = [proj.register_forward_hook(patch)]
    if kind != "q" and group > 1:
        hs.append(o_projs[receiver[0]].register_forward_pre_hook(keep_group))
    logits = model(target).logits
    for h in hs:
        h.remove()
    return _metric(logits, target).mean()


@pytest.mark.parametrize("arch", ["attn_only", "gpt2", "llama"])
@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_path_patch_matches_plain_torch(arch, kind):
    """Every sender (layer 0) x receiver (layer 1) entry equals the hook-only implementation to 1e-5
    (Llama: grouped-query attention); some path matters."""
    model = build(arch)
    g = torch.Generator().manual_seed(3)
    clean, corrupted = torch.randint(0, VOCAB, (2, 9), generator=g), torch.randint(0, VOCAB, (2, 9), generator=g)
    senders, receivers = ["L0H0", "L0H2", "L0H3"], ["L1H1", "L1H3"]
    got = path_patch(model, clean, corrupted, _metric, senders, receivers, receiver_input=kind, patches_per_pass=4)
    assert got.shape == (3, 2)
    for i, s in enumerate([(0, 0), (0, 2), (0, 3)]):
        for j, r in enumerate([(1, 1), (1, 3)]):
            want = _oracle(model, corrupted, clean, s, r, kind)
            torch.testing.assert_close(got[i, j], want, atol=1e-5, rtol=0)
    base = _metric(model(corrupted).logits, corrupted).mean()
    assert (got - base).abs().max() > 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_path_patch_three_layers_matches_plain_torch(arch, kind):
    """Three layers, so heads between sender and receiver exist and must be frozen (with two layers
    freezing is vacuous) and the MLPs between are recomputed: senders in layers 0 and 1, receivers in
    layers 1 and 2 (step 2 then starts from layer 1), both directions, equal to the hook-only
    implementation to 1e-5 and independent of patches_per_pass."""
    model = _build3(arch, n_kv=2)
    g = torch.Generator().manual_seed(4)
    clean, corrupted = torch.randint(0, VOCAB, (2, 9), generator=g), torch.randint(0, VOCAB, (2, 9), generator=g)
    for direction, target, source in (("clean_to_corrupted", corrupted, clean), ("corrupted_to_clean", clean, corrupted)):
        for senders, receivers in (([(0, 0), (0, 3)], [(2, 1), (2, 0), (1, 3)]), ([(1, 2)], [(2, 2), (2, 3)])):
            got = path_patch(model, clean, corrupted, _metric, senders, receivers, receiver_input=kind,
                             direction=direction, patches_per_pass=3)
            one = path_patch(model, clean, corrupted, _metric, senders, receivers, receiver_input=kind,
                             direction=direction, patches_per_pass=1)
            want = torch.tensor([[_oracle(model, target, source, s, r, kind) for r in receivers] for s in senders])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(one, got, atol=1e-6, rtol=0)
            with torch.no_grad():
                base = _metric(model(target).logits, target).mean()
            assert (got - base).abs().max() > 1e-3  # some path moves the loss (100x the tolerance)


@pytest.mark.parametrize("kind", ["k", "v"])
def test_path_patch_gqa_ends_in_one_query_head(kind):
    """Under grouped-query attention a k/v path ends in the receiver alone, not in every query head of
    its key/value head's group: equal (1e-5) to the hook-only implementation on the same function
    without grouped-query attention (weight surgery: one key/value head per query head), and query
    heads of one group get different entries. (It patched the shared key/value head, so both heads
    of a group got the group's entry, off by up to 0.4 nats.)"""
    model = _build3("llama", n_kv=2)
    mha = _without_gqa(model)
    g = torch.Generator().manual_seed(5)
    clean, corrupted = torch.randint(0, VOCAB, (2, 9), generator=g), torch.randint(0, VOCAB, (2, 9), generator=g)
    torch.testing.assert_close(mha(clean).logits, model(clean).logits, atol=1e-5, rtol=0)
    senders, receivers = [(0, 0), (0, 3)], [(2, 0), (2, 1), (1, 2), (1, 3)]  # two groups of two
    got = path_patch(model, clean, corrupted, _metric, senders, receivers, receiver_input=kind)
    want = torch.tensor([[_oracle(mha, corrupted, clean, s, r, kind) for r in receivers] for s in senders])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got[:, 0] - got[:, 1]).abs().min() > 1e-3 and (got[:, 2] - got[:, 3]).abs().min() > 1e-3


@pytest.mark.parametrize("arch", ["attn_only", "gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_path_patch_padded_matches_unpadded_prompts(arch, side):
    """On a padded batch (one mask for clean and corrupted; padding ids differ between the runs) every
    entry, for q, k and v, equals (1e-5) the mean over the prompt pairs run unpadded one at a time with
    mean_loss_metric, and each prompt's own result through a metric of its row only: two layers (our
    model), three layers with a receiver above the first (GPT-2, Llama-GQA: step 2 starts at layer 1)."""
    model = build(arch) if arch == "attn_only" else _build3(arch, n_kv=2)
    senders, receivers = (([(0, 0), (0, 2)], [(1, 1), (1, 3)]) if arch == "attn_only"
                          else ([(0, 0), (0, 3)], [(2, 1), (1, 3)]))
    g = torch.Generator().manual_seed(8)
    prompts = [tuple(torch.randint(0, VOCAB, (1, n), generator=g) for _ in range(2)) for n in (9, 5, 7)]
    clean, corrupted, mask = padded_pairs(prompts, side, width=10, vocab=VOCAB)
    for kind in "qkv":
        def run(c, k, metric, **kwargs):
            return path_patch(model, c, k, metric, senders, receivers, receiver_input=kind, patches_per_pass=3, **kwargs)

        alone = [run(c, k, mean_loss_metric) for c, k in prompts]
        torch.testing.assert_close(run(clean, corrupted, mean_loss_metric, attention_mask=mask),
                                   torch.stack(alone).mean(0), atol=1e-5, rtol=0)
        for i in range(len(prompts)):
            torch.testing.assert_close(run(clean, corrupted, row_only(i, 3), attention_mask=mask), alone[i],
                                       atol=1e-5, rtol=0)
        with torch.no_grad():
            base = _metric(model(prompts[0][1]).logits, prompts[0][1])
        assert (alone[0] - base).abs().max() > 1e-4  # some path moves the loss



@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_path_patch_padded_noising_senders_in_two_layers(arch):
    """direction="corrupted_to_clean" on a left-padded batch, senders in layers 0 and 1 and receivers in
    layer 2 (step 2 skips two layers: the prefix is the masked target run's), 2 patches per pass (blocks
    of repeated rows and mask), logit_diff at a pos >= 0 (each row's real tokens) and a mask-aware metric
    of one's own: every entry equals the mean over the prompt pairs run unpadded one at a time (1e-5)."""
    from .test_padding import last_logsumexp
    from interventions.primitives.patching import logit_diff

    model = _build3(arch, n_kv=2)
    senders, receivers = [(0, 1), (1, 2), (0, 2)], [(2, 0), (2, 3)]
    g = torch.Generator().manual_seed(9)
    prompts = [tuple(torch.randint(0, VOCAB, (1, n), generator=g) for _ in range(2)) for n in (8, 5, 6)]
    clean, corrupted, mask = padded_pairs(prompts, "left", width=9, vocab=VOCAB)
    correct, wrong = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    metrics = [(logit_diff(correct, wrong, pos=1), lambda i: logit_diff(correct[i], wrong[i], pos=1)),
               (last_logsumexp, lambda i: last_logsumexp)]
    for kind in "kv":
        for metric, alone_metric in metrics:
            got = path_patch(model, clean, corrupted, metric, senders, receivers, receiver_input=kind,
                             direction="corrupted_to_clean", patches_per_pass=2, attention_mask=mask)
            alone = torch.stack([path_patch(model, c, k, alone_metric(i), senders, receivers, receiver_input=kind,
                                            direction="corrupted_to_clean") for i, (c, k) in enumerate(prompts)])
            torch.testing.assert_close(got, alone.mean(0), atol=1e-5, rtol=0)
            assert got.std() > 1e-3  # the paths differ

def test_circuit_k_composition_by_path_patching():
    """On repeated random tokens, replacing the previous-token head's output on the path into the
    induction head's *keys* by its output on unrepeated tokens destroys induction (second-copy loss
    rises by nats); the same patch into its queries or values changes the loss by orders of magnitude
    less, and a head with no output (L0H1) changes nothing."""
    model = circuit_model(2)
    clean = repeated_random_tokens(POOL, 20, 2, 3, BOS, seed=0)  # (3, 41): BOS + 20 tokens, twice
    corrupted = torch.cat([clean[:, :1], repeated_random_tokens(POOL, 20, 2, 3, BOS, seed=1)[:, 1:21],
                           clean[:, 21:]], dim=1)  # first copy replaced: nothing to induct from

    def second_copy_loss(logits, tokens):
        logp = logits[:, 21:-1].float().log_softmax(-1)
        return -logp.gather(-1, tokens[:, 22:, None]).squeeze(-1).mean(-1)

    base = second_copy_loss(model(clean).logits, clean).mean()
    effects = {}
    for kind in "qkv":
        out = path_patch(model, clean, corrupted, second_copy_loss, ["L0H0", "L0H1"], ["L1H0"], receiver_input=kind,
                         direction="corrupted_to_clean")
        effects[kind] = (out[:, 0] - base).tolist()
    assert effects["k"][0] > 1.0  # nats
    assert abs(effects["q"][0]) < 0.01 * effects["k"][0] and abs(effects["v"][0]) < 0.01 * effects["k"][0]
    assert all(abs(effects[k][1]) < 1e-6 for k in "qkv")


def test_path_patch_bad_input():
    """A receiver not after its sender, an unknown receiver input and a one-argument metric raise
    ValueError naming the fix."""
    model = build("attn_only")
    t = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(ValueError, match="later layer"):
        path_patch(model, t, t, _metric, "L1H0", "L1H1")
    with pytest.raises(ValueError, match="'q', 'k' or 'v'"):
        path_patch(model, t, t, _metric, "L0H0", "L1H1", receiver_input="z")
    with pytest.raises(ValueError, match="\\(logits, tokens\\)"):
        path_patch(model, t, t, lambda logits: logits[:, -1, 0], "L0H0", "L1H1")
    with pytest.raises(ValueError, match="heads 0-3"):
        path_patch(model, t, t, _metric, "L0H0", "L1H7")


def test_second_copy_loss_by_hand_and_on_padded_rows():
    """second_copy_loss(L) is the mean loss of the last L - 1 tokens (the second copy from its second
    token on), by log-softmax by hand, with or without BOS; on a left- or right-padded batch each row's
    value is its unpadded one; a length or prompt that cannot hold two copies is refused naming the fix."""
    from interventions.primitives.patching import second_copy_loss

    model = circuit_model(2)
    clean = repeated_random_tokens(POOL, 20, 2, 3, BOS, seed=0)  # (3, 41): BOS + 20 tokens, twice
    with torch.no_grad():
        logits = model(clean).logits
    logp = logits[:, 21:-1].double().log_softmax(-1)
    hand = -logp.gather(-1, clean[:, 22:, None]).squeeze(-1).mean(-1)
    assert torch.allclose(second_copy_loss(20)(logits, clean).double(), hand, atol=1e-6)
    no_bos = clean[:, 1:]  # A + A
    with torch.no_grad():
        logits_nb = model(no_bos).logits
    logp = logits_nb[:, 20:-1].double().log_softmax(-1)
    hand = -logp.gather(-1, no_bos[:, 21:, None]).squeeze(-1).mean(-1)
    assert torch.allclose(second_copy_loss(20)(logits_nb, no_bos).double(), hand, atol=1e-6)
    # padding: row 0 shifted right by 3 (left padding), row 1 left by 0 with 3 pad columns after (right padding)
    pad = torch.zeros(2, 44, dtype=torch.long)
    mask = torch.zeros(2, 44, dtype=torch.long)
    pad[0, 3:], mask[0, 3:] = clean[0], 1
    pad[1, :41], mask[1, :41] = clean[1], 1
    with torch.no_grad():
        padded = torch.zeros(2, 44, logits.shape[-1])
        padded[0, 3:], padded[1, :41] = logits[0], logits[1]
    got = second_copy_loss(20)(padded, pad, attention_mask=mask)
    assert torch.allclose(got, second_copy_loss(20)(logits, clean)[:2], atol=1e-6)
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="integer >= 2"):
            second_copy_loss(bad)
    with pytest.raises(ValueError, match="length of the repeated"):
        second_copy_loss(21)(logits, clean)
    with pytest.raises(ValueError, match="tokens of the run"):
        second_copy_loss(20)(logits, clean[:, :-1])


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_path_patch_reduce_false_equals_one_call_per_prompt(kind):
    """path_patch(reduce=False) gives (senders, receivers, batch): each prompt's entry is what a call on
    that prompt alone gives (built-in and own metrics), and their mean the reduced result."""
    from interventions.primitives.patching import logit_diff, second_copy_loss

    model = circuit_model(2)
    clean = repeated_random_tokens(POOL, 20, 2, 4, BOS, seed=0)
    resampled = repeated_random_tokens(POOL, 20, 2, 4, BOS, seed=1)
    metrics = {"second copy": lambda rows: second_copy_loss(20), "mean loss": lambda rows: mean_loss_metric,
               "logit diff": lambda rows: logit_diff(clean[rows, -1], resampled[rows, -1])}  # ids for those rows
    for name, metric_for in metrics.items():
        metric = metric_for(slice(None))
        out = path_patch(model, clean, resampled, metric, ["L0H0", "L0H1"], ["L1H0", "L1H1"], receiver_input=kind,
                         direction="corrupted_to_clean", reduce=False)
        assert out.shape == (2, 2, 4)
        for i in range(4):
            one = path_patch(model, clean[i:i + 1], resampled[i:i + 1], metric_for(slice(i, i + 1)), ["L0H0", "L0H1"],
                             ["L1H0", "L1H1"], receiver_input=kind, direction="corrupted_to_clean")
            assert torch.allclose(out[..., i], one, atol=1e-5), (name, i)
        mean = path_patch(model, clean, resampled, metric, ["L0H0", "L0H1"], ["L1H0", "L1H1"], receiver_input=kind,
                          direction="corrupted_to_clean")
        assert torch.allclose(out.mean(-1), mean, atol=1e-5)


def test_path_patch_reduce_false_refuses_a_scalar_metric():
    """A metric that returns one number for the batch cannot be split by prompt: reduce=False refuses it
    before any patched run, naming both fixes; reduce must be a bool."""
    model = circuit_model(2)
    t = repeated_random_tokens(POOL, 5, 2, 2, BOS, seed=0)
    with pytest.raises(ValueError, match=r"return a \(batch,\) tensor.*reduce=True"):
        path_patch(model, t, t.flip(0), lambda logits, tokens: _metric(logits, tokens).mean(), "L0H0", "L1H0",
                   reduce=False)
    with pytest.raises(ValueError, match="reduce="):
        path_patch(model, t, t.flip(0), mean_loss_metric, "L0H0", "L1H0", reduce="none")
