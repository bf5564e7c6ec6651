"""Smeared keys: the KeySmear formula, the ``smear_keys`` edit on each architecture, and the paper's claim
that a 1-layer smeared-key model forms an induction head where a vanilla one does not."""

import contextlib
import copy
import time

import pytest
import torch
from transformers import (AttentionInterface, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from interventions import AttnOnlyConfig, AttnOnlyForCausalLM, ZeroAblation, run_with_ablations
from interventions.engine.adapters import get_adapter
from interventions.zoo.smear import KeySmear, get_alphas, set_alphas, smear_keys, smear_modules

VOCAB = 50
COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
# initializer_range 0.2 (not 0.02): larger weights make the smear's effect on logits clearly visible.


def build(arch: str):
    """A tiny random model of ``arch`` (eval mode, seeded)."""
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32,
                                          initializer_range=0.2, **COMMON)).eval()
    if arch == "gpt_neox":  # partial rotary: only the first half of each head's features rotate
        return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                                intermediate_size=64, max_position_embeddings=32, rotary_pct=0.5,
                                                initializer_range=0.2, **COMMON)).eval()
    if arch == "llama_gqa":
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                            num_hidden_layers=2, intermediate_size=64, max_position_embeddings=32,
                                            initializer_range=0.2, **COMMON)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                            num_hidden_layers=2, intermediate_size=64, max_position_embeddings=32,
                                            initializer_range=0.2, **COMMON)).eval()
    if arch == "attn_only":
        model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=32, vocab_size=VOCAB,
                                                   positional="rotary", init_range=0.2)).eval()
        return model
    raise KeyError(arch)


ARCHS = ["gpt2", "gpt_neox", "llama_gqa", "qwen2", "attn_only"]


def tokens(batch=3, pos=16, seed=1):
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


def loop_smear(k: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The paper's formula, one position and head at a time. k: (batch, head, pos, d_head)."""
    out = k.clone()
    for h in range(k.shape[1]):
        s = 1 / (1 + torch.exp(-alpha[h]))
        for j in range(1, k.shape[2]):
            out[:, h, j] = s * k[:, h, j] + (1 - s) * k[:, h, j - 1]
    return out


# ----------------------------------------------------------------------------- the formula

def test_keysmear_matches_loop():
    """KeySmear(k) equals k'_j = s k_j + (1 - s) k_{j-1} computed by a loop; position 0 unchanged."""
    torch.manual_seed(0)
    smear = KeySmear(n_heads=3)
    with torch.no_grad():
        smear.alpha.copy_(torch.tensor([-1.5, 0.3, 2.0]))
    k = torch.randn(2, 3, 7, 5)
    with torch.no_grad():
        out = smear(k)
    assert torch.allclose(out, loop_smear(k, smear.alpha.detach()), atol=1e-6)
    assert torch.equal(out[:, :, 0], k[:, :, 0])


# ----------------------------------------------------------------------------- the edit on each architecture

@pytest.mark.parametrize("arch", ARCHS)
def test_identity_default_and_zero_alpha(arch):
    """sigmoid(alpha) = 1 reproduces the original logits (< 1e-5); the default init changes them a little
    (nonzero, and less than alpha = 0 does); alpha = 0 changes them clearly."""
    model = build(arch)
    x = tokens()
    base = logits(model, x)
    edited = smear_keys(model)
    a = get_adapter(model)
    assert get_alphas(edited).shape == (a.n_layers, a.n_kv_heads)
    diff_default = (logits(edited, x) - base).abs().max().item()
    set_alphas(edited, 100.0)
    assert torch.sigmoid(torch.tensor(100.0)).item() == 1.0
    assert (logits(edited, x) - base).abs().max().item() < 1e-5
    set_alphas(edited, 0.0)
    diff_zero = (logits(edited, x) - base).abs().max().item()
    assert 0 < diff_default < diff_zero / 10
    assert diff_zero > 0.1


def test_gqa_one_alpha_per_kv_head():
    """With grouped-query attention there is one alpha per key/value head (not per query head)."""
    edited = smear_keys(build("llama_gqa"))
    assert get_alphas(edited).shape == (2, 2)
    assert [m.alpha.shape for m in smear_modules(edited)] == [torch.Size([2])] * 2


class CaptureKeys:
    """An attention function that records the keys attention actually uses (after rotary), then
    runs eager attention."""

    def __init__(self):
        self.keys = []

    def __call__(self, module, query, key, value, attention_mask, **kw):
        from interventions.engine.adapters import observable_attention  # plain eager attention, any arch

        self.keys.append(key.detach().clone())  # (batch, kv_head, pos, d_head)
        return observable_attention(module, query, key, value, attention_mask, **kw)


def capture_keys(model, x, **kw):
    capture = CaptureKeys()
    AttentionInterface.register("smear_test_capture", capture)
    model.config._attn_implementation = "smear_test_capture"
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "smear_test_capture"
    with torch.no_grad():
        out = model(x, **kw).logits
    return capture.keys, out


def test_gpt2_keys_by_hand():
    """Layer-0 keys of an edited GPT-2, captured where attention uses them, equal keys computed by hand from
    c_attn's weights (columns d_model:2 d_model of the Conv1D) and smeared by a loop."""
    model = build("gpt2")
    edited = smear_keys(model)
    alphas = torch.tensor([[-2.0, -0.5, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0]])
    set_alphas(edited, alphas)
    x = tokens(batch=2, pos=9)
    keys, _ = capture_keys(edited, x)
    d, h = 32, 4
    with torch.no_grad():
        tr = model.transformer
        resid = tr.wte(x) + tr.wpe(torch.arange(x.shape[1]))[None]  # (batch, pos, d_model)
        a = tr.h[0].ln_1(resid)
        w, b = tr.h[0].attn.c_attn.weight, tr.h[0].attn.c_attn.bias  # Conv1D: (d_model, 3 d_model)
        k = a @ w[:, d:2 * d] + b[d:2 * d]  # (batch, pos, d_model)
        k = k.view(2, 9, h, d // h).transpose(1, 2)  # (batch, head, pos, d_head)
    expected = loop_smear(k, alphas[0])
    assert (keys[0] - expected).abs().max().item() < 1e-5
    assert (keys[0] - k).abs().max().item() > 1e-2  # the smear did something


@pytest.mark.parametrize("arch", ["gpt_neox", "llama_gqa"])
@pytest.mark.parametrize("positions", ["default", "gapped"])
def test_rotary_smear_is_after_rotation(arch, positions):
    """On rotary models the keys attention uses are the *rotated* original keys smeared by the formula
    (k'_j = s R_j k_j + (1 - s) R_{j-1} k_{j-1}), also when position ids are not consecutive."""
    model = build(arch)
    edited = smear_keys(model)
    n_kv = get_adapter(model).n_kv_heads
    alphas = torch.linspace(-2, 2, 2 * n_kv).view(2, n_kv)
    set_alphas(edited, alphas)
    x = tokens(batch=2, pos=10)
    kw = {} if positions == "default" else {"position_ids": (torch.arange(10) * 2 + 3)[None].expand(2, 10)}
    plain, _ = capture_keys(copy.deepcopy(model), x, **kw)
    smeared, _ = capture_keys(edited, x, **kw)
    # Layer 0 sees the same input in both models, so its keys compare directly.
    expected = loop_smear(plain[0], alphas[0])
    assert (smeared[0] - expected).abs().max().item() < 1e-5
    assert (smeared[0] - plain[0]).abs().max().item() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_alpha(arch):
    """loss.backward() gives every alpha of every layer a nonzero gradient; the alphas are trainable."""
    edited = smear_keys(build(arch))
    set_alphas(edited, 0.0)  # sigmoid'(0) = 1/4: a gradient well away from float noise
    x = tokens()
    loss = edited(x, labels=x).loss
    loss.backward()
    for m in smear_modules(edited):
        assert m.alpha.requires_grad and m.alpha.grad is not None
        assert (m.alpha.grad.abs() > 0).all()
    names = [n for n, _ in edited.named_parameters() if n.endswith("alpha")]
    assert len(names) == 2


def test_default_init_gradient_nonzero():
    """At the default init (sigmoid(6)) the alphas still get a nonzero gradient."""
    edited = smear_keys(build("llama_gqa"))
    x = tokens()
    edited(x, labels=x).loss.backward()
    assert all((m.alpha.grad.abs() > 0).all() for m in smear_modules(edited))


# ----------------------------------------------------------------------------- purity, state, errors

@pytest.mark.parametrize("arch", ARCHS)
def test_callers_model_untouched(arch):
    """smear_keys leaves the caller's model as it was: same state dict, no new modules or hooks, same logits."""
    model = build(arch)
    x = tokens()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model, x)
    edited = smear_keys(model, init_alpha=0.0)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not smear_modules(model) and not getattr(model.config, "smear_keys", False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(logits(model, x), base)
    assert not torch.allclose(logits(edited, x), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip(arch, tmp_path):
    """The alphas are in state_dict; saving it and loading into a fresh smear_keys(original) gives the same logits."""
    model = build(arch)
    edited = smear_keys(model)
    set_alphas(edited, torch.randn(get_alphas(edited).shape, generator=torch.Generator().manual_seed(3)))
    sd = edited.state_dict()
    assert sum(k.endswith("alpha") for k in sd) == 2
    torch.save(sd, tmp_path / "smeared.pt")
    fresh = smear_keys(model)
    fresh.load_state_dict(torch.load(tmp_path / "smeared.pt"))
    x = tokens()
    assert torch.equal(logits(fresh, x), logits(edited, x))
    assert torch.equal(get_alphas(fresh), get_alphas(edited))


def test_deepcopy_of_edited_model_is_independent():
    """A deep copy of an edited model smears with its own alphas (its hooks point at the copied modules)."""
    edited = smear_keys(build("gpt_neox"))
    x = tokens()
    before = logits(edited, x)
    clone = copy.deepcopy(edited)
    set_alphas(clone, 0.0)
    assert torch.equal(logits(edited, x), before)
    reference = smear_keys(build("gpt_neox"), init_alpha=0.0)
    assert torch.allclose(logits(clone, x), logits(reference, x), atol=1e-6)


def test_attn_only_edit_is_the_models_own_variant(tmp_path):
    """smear_keys on our model sets config.smear_keys, adds KeySmear at init_alpha, copies the other weights,
    and the result saves and loads with save_pretrained / from_pretrained."""
    from transformers import AutoModelForCausalLM

    model = build("attn_only")
    edited = smear_keys(model, init_alpha=1.5)
    assert edited.config.smear_keys and not model.config.smear_keys
    assert torch.equal(get_alphas(edited), torch.full((2, 4), 1.5))
    sd, osd = edited.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in osd.items())
    edited.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = tokens()
    assert torch.equal(logits(loaded, x), logits(edited, x))


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama_gqa"])
def test_load_model_of_a_saved_smeared_hf_model_keeps_the_smear(arch, tmp_path):
    """A smeared HF model saved with save_pretrained loads (``load_model``, as ``survey`` does) smeared, with
    its alphas: the edited model's logits, not the plain model's (from_pretrained alone drops the alphas)."""
    from interventions.zoo.train import load_model

    model = build(arch)
    edited = smear_keys(model, init_alpha=-2.0)
    edited.save_pretrained(tmp_path / "m")
    x = tokens()
    assert not torch.allclose(logits(edited, x), logits(model, x), atol=1e-3)
    loaded = load_model(tmp_path / "m")
    assert torch.equal(get_alphas(loaded), get_alphas(edited))
    assert torch.allclose(logits(loaded, x), logits(edited, x), atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "attn_only"])
def test_already_smeared_raises(arch):
    """Smearing a smeared model raises a ValueError pointing at set_alphas; so does a model built smeared."""
    edited = smear_keys(build(arch))
    with pytest.raises(ValueError, match="already has smeared keys.*set_alphas"):
        smear_keys(edited)
    if arch == "attn_only":
        native = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, smear_keys=True))
        with pytest.raises(ValueError, match="already has smeared keys"):
            smear_keys(native)


def test_unsupported_architecture_raises():
    """An architecture without an adapter raises a ValueError that lists the supported ones."""
    from transformers import GPTJConfig, GPTJForCausalLM

    model = GPTJForCausalLM(GPTJConfig(n_layer=1, n_head=2, n_embd=16, rotary_dim=4, vocab_size=VOCAB,
                                       n_positions=16))
    with pytest.raises(ValueError, match="unsupported architecture 'gptj'.*gpt2.*llama"):
        smear_keys(model)


def test_wrong_alpha_shape_raises():
    """set_alphas and load_state_dict reject alphas of the wrong shape (e.g. one per query head on a GQA
    model) with a ValueError naming the expected shape."""
    edited = smear_keys(build("llama_gqa"))
    with pytest.raises(ValueError, match=r"\(n_layers, n_kv_heads\) = \(2, 2\)"):
        set_alphas(edited, torch.zeros(2, 4))
    sd = edited.state_dict()
    key = next(k for k in sd if k.endswith("key_smear.alpha"))
    sd[key] = torch.zeros(4)
    with pytest.raises(ValueError, match="same number of key/value heads"):
        edited.load_state_dict(sd)
    with pytest.raises(ValueError, match="no smeared keys.*smear_keys"):
        set_alphas(build("gpt2"), 0.0)


def test_nan_alphas_raise_and_change_nothing():
    """set_alphas and smear_keys reject NaN alphas (they made every logit NaN) and leave the alphas as they were;
    +-inf are allowed (exact no-op / the previous key)."""
    edited = smear_keys(build("gpt2"))
    before = get_alphas(edited).clone()
    bad = before.clone()
    bad[1, 2] = float("nan")
    for alphas in (bad, float("nan")):
        with pytest.raises(ValueError, match="NaN"):
            set_alphas(edited, alphas)
        assert torch.equal(get_alphas(edited), before)
    with pytest.raises(ValueError, match="init_alpha=nan"):
        smear_keys(build("gpt2"), init_alpha=float("nan"))
    set_alphas(edited, float("inf"))
    x = tokens()
    assert torch.allclose(logits(edited, x), logits(build("gpt2"), x), atol=1e-5)


def test_kv_cache_decoding_raises():
    """A forward pass that continues a non-empty KV cache raises (the smear needs the previous raw key);
    a single full-sequence pass with use_cache=True is fine."""
    edited = smear_keys(build("llama_gqa"))
    x = tokens(batch=1, pos=8)
    with torch.no_grad():
        out = edited(x[:, :7], use_cache=True)
        with pytest.raises(ValueError, match="use_cache=False"):
            edited(x[:, 7:], past_key_values=out.past_key_values)


# ----------------------------------------------------------------------------- toolkit

@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama_gqa", "attn_only"])
def test_run_with_ablations_on_smeared_model(arch):
    """nnsight traces run the smear: no ablation reproduces the edited model's logits, and ZeroAblation("L0H1")
    equals zeroing head 1's slice of the o_proj input with a plain torch hook."""
    model = build(arch)
    edited = smear_keys(model, init_alpha=0.0)
    x = tokens()
    expected = logits(edited, x)
    assert torch.allclose(run_with_ablations(edited, x, []), expected, atol=1e-5)
    a = get_adapter(edited)

    def zero_head(module, args):
        z = args[0].clone()
        z[..., a.head_slice(1)] = 0
        return (z,)

    handle = a.module(edited, 0, "o_proj").register_forward_pre_hook(zero_head)
    ablated_by_hand = logits(edited, x)
    handle.remove()
    ablated = run_with_ablations(edited, x, ZeroAblation("L0H1"))
    assert torch.allclose(ablated, ablated_by_hand, atol=1e-5)
    assert not torch.allclose(ablated, expected, atol=1e-3)


# ----------------------------------------------------------------------------- the paper's claim

def induction_score(model, half: int = 32, n: int = 32, seed: int = 123) -> torch.Tensor:
    """TransformerLens-style induction score of each layer-0 head: random tokens of length ``half`` repeated
    twice; mean attention from position i of the second copy to i - half + 1 (the token after the earlier
    occurrence). Returns (head,)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, model.config.vocab_size, (n, half), generator=g)
    x = torch.cat([seg, seg], dim=1)  # (batch, 2 half)
    with torch.no_grad():
        pattern = model(x, output_attentions=True).attentions[0]  # (batch, head, q_pos, k_pos)
    q = torch.arange(half, 2 * half)
    return pattern[:, :, q, q - half + 1].mean(dim=(0, 2))


def test_one_layer_smeared_model_forms_induction_head(tmp_path, monkeypatch):
    """Trained on repeated random tokens (preset "tiny" at 1 layer, 1M tokens, lr 1e-2), a 1-layer smeared-key
    model has a head with induction score > 0.4; the same model without smearing stays < 0.4 and far lower
    (Argument 2). Measured on the 2-core CPU, one thread: about 3-4 s per run; best-head scores 0.62
    (smeared; heads 0.62 and 0.46) and 0.05 (vanilla)."""
    from experiments.presets import get_preset
    from interventions.zoo.train import TrainConfig, load_model, train

    monkeypatch.setenv("INTERVENTIONS_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from 2 threads and loses a lot on a busy machine
    scores, seconds = {}, {}
    try:
        for smear in (True, False):
            cfg = get_preset("tiny")
            cfg["model"].update(n_layers=1, smear_keys=smear)
            cfg.update(tokens=1_000_000)
            start = time.perf_counter()
            ckpt = train(TrainConfig.from_dict(cfg), tmp_path / f"smear-{smear}", progress=False)
            seconds[smear] = time.perf_counter() - start
            scores[smear] = induction_score(load_model(ckpt)).max().item()
    finally:
        torch.set_num_threads(threads)
    print(f"induction score: smeared {scores[True]:.3f} ({seconds[True]:.1f} s), "
          f"vanilla {scores[False]:.3f} ({seconds[False]:.1f} s)")
    assert scores[True] > 0.4
    assert scores[False] < 0.4
    assert scores[True] - scores[False] > 0.3


# ----------------------------------------------------------------------------- padding

@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_matches_unpadded(arch):
    """A left-padded batch of a smeared model gives, at the real tokens, the logits of the unpadded
    sequence, on both attention paths (SDPA, and the eager path ``observable`` switches to): the first real
    token's key is the first key (the paper leaves it unmixed), never mixed with a pad token's key."""
    from interventions import observable

    edited = smear_keys(build(arch))
    set_alphas(edited, 0.0)  # an even mix: a pad key mixed in would move the logits visibly
    a, b = tokens(batch=1, pos=10, seed=2), tokens(batch=1, pos=6, seed=3)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    want_a, want_b = logits(edited, a)[0], logits(edited, b)[0]
    for path in ("sdpa", "observable"):
        ctx = observable(edited) if path == "observable" else contextlib.nullcontext()
        with ctx:
            out = logits(edited, batch, attention_mask=mask, position_ids=position_ids)
        assert torch.allclose(out[0], want_a, atol=1e-5), path
        assert torch.allclose(out[1, 4:], want_b, atol=1e-5), (path, (out[1, 4:] - want_b).abs().max())


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_static_cache_with_a_mask_raises(arch):
    """A StaticCache gives the attention mask max_cache_len key columns, not this call's pos: reading padding
    from its last pos columns silently switched the smear off (eager: the plain model's logits, diff 3.3) or
    mixed pad keys in. It raises; without a mask (SDPA, no padding) the smeared logits are unchanged."""
    from transformers import StaticCache

    from interventions import observable

    edited = smear_keys(build(arch))
    set_alphas(edited, 0.0)
    x = tokens(batch=2, pos=8)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        with observable(edited), pytest.raises(ValueError, match="key columns for 8 tokens.*use_cache=False"):
            edited(x, past_key_values=StaticCache(config=edited.config, max_cache_len=32), use_cache=True)
        with pytest.raises(ValueError, match="key columns for 8 tokens.*use_cache=False"):
            edited(x, attention_mask=mask, past_key_values=StaticCache(config=edited.config, max_cache_len=32),
                   use_cache=True)
        out = edited(x, past_key_values=StaticCache(config=edited.config, max_cache_len=32), use_cache=True).logits
    assert torch.equal(out, logits(edited, x))


@pytest.mark.parametrize("alpha", [6.0, 6.5, -6.0])
def test_bf16_keys_are_the_formula_rounded_once(alpha):
    """In bf16 the smeared keys are the float64 formula rounded to bf16 (KeySmear on random keys, and an edited
    GPT-2's layer-0 keys against its plain bf16 keys smeared by the loop). Mixing in bf16 rounded s itself: at
    alpha = 6 (the edit's init) 62% of the keys were off, by up to 2.7x the rounding error, and at 6.5 s rounded
    to 1: the edited GPT-2's keys were bit-identical to the plain model's (no smear at all)."""
    torch.manual_seed(0)
    smear = KeySmear(n_heads=4, init_alpha=alpha).to(torch.bfloat16)
    k = torch.randn(2, 4, 64, 16).to(torch.bfloat16)
    with torch.no_grad():
        out = smear(k)
    exact = loop_smear(k.double(), torch.full((4,), alpha, dtype=torch.float64))
    assert (out != exact.to(torch.bfloat16)).float().mean() < 1e-3  # a rare tie may round the other way
    assert (out.double() - exact).abs().max() <= (exact.to(torch.bfloat16).double() - exact).abs().max()

    model = build("gpt2").to(torch.bfloat16)
    edited = smear_keys(model, init_alpha=alpha)
    x = tokens(batch=2, pos=16)
    plain, _ = capture_keys(copy.deepcopy(model), x)
    smeared, _ = capture_keys(edited, x)
    exact = loop_smear(plain[0].double(), torch.full((4,), alpha, dtype=torch.float64))
    assert not torch.equal(smeared[0], plain[0])
    assert (smeared[0].double() - exact).abs().max() <= (exact.to(torch.bfloat16).double() - exact).abs().max()
