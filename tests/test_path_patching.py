"""Path patching against a plain-torch implementation (forward hooks only) on tiny models, and on the
hand-built two-layer induction circuit of tests/test_scores.py: the previous-token head reaches the
induction head through its keys (K-composition), not its queries or values."""

import pytest
import torch

from interventions import path_patch
from interventions.analysis.scores import repeated_random_tokens

from .test_ablation import VOCAB, build
from .test_engine import N_HEADS, N_KV, PATHS, _qkv
from .test_scores import BOS, POOL, circuit_model


def _metric(logits, tokens):
    """Mean next-token loss of each sequence (a function of the measured run's tokens)."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1).mean(-1)


@torch.no_grad()
def _oracle(arch, model, target, source, sender, receiver, kind):
    """Path patching with plain forward hooks: run 1 freezes every head's output (the o_proj input)
    at its target-run value except the sender's, set to its source-run value, and records the
    receiver's q/k/v (projection output, viewed per head by hand); run 2 patches only that."""
    p = PATHS[arch]
    n_layers = 2
    o_projs = [model.get_submodule(p["o"].format(l)) for l in range(n_layers)]

    def z_of(tokens):
        rec = {}
        hs = [m.register_forward_pre_hook(lambda mod, args, l=l: rec.__setitem__(l, args[0].clone()))
              for l, m in enumerate(o_projs)]
        model(tokens)
        for h in hs:
            h.remove()
        return rec

    tz, sz = z_of(target), z_of(source)
    sl = slice(sender[1] * 8, (sender[1] + 1) * 8)

    def freeze(l):
        def hook(mod, args):
            z = tz[l].clone()
            if l == sender[0]:
                z[..., sl] = sz[l][..., sl]
            return (z,)
        return hook

    qkv = p["qkv"] if isinstance(p["qkv"], tuple) else (p["qkv"],)
    idx = 0 if len(qkv) == 1 else "qkv".index(kind)
    proj = model.get_submodule(qkv[idx].format(receiver[0]))
    head = receiver[1] if kind == "q" else receiver[1] // (N_HEADS // N_KV.get(arch, N_HEADS))
    recorded = {}

    def record(mod, args, out):
        recorded["x"] = _qkv(arch, model, receiver[0], [out] * 3, kind)[:, :, head].clone()

    hs = [o_projs[l].register_forward_pre_hook(freeze(l)) for l in range(receiver[0])]
    hs.append(proj.register_forward_hook(record))
    model(target)
    for h in hs:
        h.remove()

    def patch(mod, args, out):
        out = out.clone()
        _qkv(arch, model, receiver[0], [out] * 3, kind)[:, :, head] = recorded["x"]
        return out

    h = proj.register_forward_hook(patch)
    logits = model(target).logits
    h.remove()
    return _metric(logits, target).mean()


@pytest.mark.parametrize("arch", ["attn_only", "gpt2", "llama"])
@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_path_patch_matches_plain_torch(arch, kind):
    """Every sender (layer 0) x receiver (layer 1) entry equals the hook-only implementation to 1e-5
    (Llama: grouped-query attention, k/v receivers share a kv head); some path matters."""
    model = build(arch)
    g = torch.Generator().manual_seed(3)
    clean, corrupted = torch.randint(0, VOCAB, (2, 9), generator=g), torch.randint(0, VOCAB, (2, 9), generator=g)
    senders, receivers = ["L0H0", "L0H2", "L0H3"], ["L1H1", "L1H3"]
    got = path_patch(model, clean, corrupted, _metric, senders, receivers, receiver_input=kind, patches_per_pass=4)
    assert got.shape == (3, 2)
    for i, s in enumerate([(0, 0), (0, 2), (0, 3)]):
        for j, r in enumerate([(1, 1), (1, 3)]):
            want = _oracle(arch, model, corrupted, clean, s, r, kind)
            torch.testing.assert_close(got[i, j], want, atol=1e-5, rtol=0)
    base = _metric(model(corrupted).logits, corrupted).mean()
    assert (got - base).abs().max() > 1e-5


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
