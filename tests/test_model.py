"""The attention-only model: TransformerLens parity, eager = SDPA, save/load, padding, bad config."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from interventions import AttnOnlyConfig, AttnOnlyForCausalLM

from .oracle import to_hooked_transformer


def _randomise(model, seed=0):
    """Non-trivial LayerNorm and bias values so parity tests cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("positional", ["shortformer", "standard", "rotary"])
@pytest.mark.parametrize("d_mlp", [None, 48])
@pytest.mark.parametrize("smear", [False, True])
def test_matches_transformer_lens(positional, d_mlp, smear):
    """Logits equal a HookedTransformer rebuilt from the documented computation (max abs diff < 1e-4).

    With smeared keys the TL model gets the smear as a hook on its keys (hook_k before rotation is
    not the right place for rotary, so rotary+smear uses hook_rot_k)."""
    torch.manual_seed(0)
    cfg = AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=24, vocab_size=40, positional=positional,
                         d_mlp=d_mlp, smear_keys=smear)
    model = _randomise(AttnOnlyForCausalLM(cfg).eval())
    tl = to_hooked_transformer(model)
    tokens = torch.randint(0, 40, (3, 24))
    hooks = []
    if smear:
        def smear_hook(k, hook):  # k: (batch, pos, head, d_head)
            layer = int(hook.name.split(".")[1])
            s = torch.sigmoid(model.transformer.h[layer].attn.smear.alpha)[None, None, :, None]
            prev = torch.cat([k[:, :1], k[:, :-1]], dim=1)
            return s * k + (1 - s) * prev
        site = "attn.hook_rot_k" if positional == "rotary" else "attn.hook_k"
        hooks = [(f"blocks.{i}.{site}", smear_hook) for i in range(2)]
    with torch.no_grad():
        ours = model(tokens).logits
        theirs = tl.run_with_hooks(tokens, fwd_hooks=hooks)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("positional", ["shortformer", "rotary"])
def test_eager_equals_sdpa(positional, tiny_model):
    """The observable (eager) path and the fast (SDPA) path give the same logits; patterns sum to 1."""
    cfg = AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=32, vocab_size=50, positional=positional)
    model = _randomise(AttnOnlyForCausalLM(cfg).eval())
    x = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        fast = model(x).logits
        out = model(x, output_attentions=True)
    assert torch.allclose(fast, out.logits, atol=1e-5)
    pattern = out.attentions[0]
    assert pattern.shape == (2, 4, 20, 20)
    assert torch.allclose(pattern.sum(-1), torch.ones(2, 4, 20), atol=1e-5)
    assert pattern.triu(1).abs().max() == 0  # causal


def test_save_and_auto_load(tmp_path, tiny_model):
    """save_pretrained writes safetensors; AutoModelForCausalLM loads it without trust_remote_code."""
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, AttnOnlyForCausalLM)
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, tiny_model(x).logits)


@pytest.mark.parametrize("positional", ["shortformer", "standard", "rotary"])
def test_left_padding_matches_unpadded(positional):
    """A left-padded batch gives, at the real tokens, the logits of the unpadded sequences."""
    cfg = AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=16, vocab_size=30, positional=positional)
    model = _randomise(AttnOnlyForCausalLM(cfg).eval())
    a, b = torch.randint(0, 30, (1, 10)), torch.randint(0, 30, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        for eager in (False, True):
            out = model(batch, attention_mask=mask, output_attentions=eager).logits
            assert torch.allclose(out[0], model(a).logits[0], atol=1e-5)
            assert torch.allclose(out[1, 4:], model(b).logits[0], atol=1e-5)


def test_loss_matches_manual(tiny_model):
    """The model's own loss (labels=) equals a hand-computed mean next-token cross-entropy."""
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        out = tiny_model(x, labels=x)
        logp = out.logits.log_softmax(-1)
        manual = -logp[:, :-1].gather(-1, x[:, 1:, None]).mean()
    assert abs(out.loss.item() - manual.item()) < 1e-5


@pytest.mark.parametrize("kwargs, fix", [
    (dict(d_model=30, n_heads=4), "divisible"),
    (dict(positional="alibi"), "choose one of"),
    (dict(n_layers=0), "positive integer"),
    (dict(d_mlp=-3), "d_mlp"),
    (dict(positional="rotary", d_model=12, n_heads=4), "even d_head"),
    (dict(d_head=0), "d_head=0 must be a positive integer"),
    (dict(d_head=-4), "d_head=-4 must be a positive integer"),
    (dict(d_head=8.0), "d_head=8.0 must be a positive integer"),
    (dict(n_heads=True, d_model=8), "n_heads=True must be a positive integer"),
    (dict(smear_keys="no"), "smear_keys='no' must be True or False"),
    (dict(positional="rotary", rotary_base=0), "rotary_base=0 must be a finite number > 0"),
    (dict(layer_norm_eps=-1e-5), "layer_norm_eps=-1e-05 must be a finite number > 0"),
    (dict(init_range=float("nan")), "init_range=nan must be a finite number >= 0"),
])
def test_bad_config(kwargs, fix):
    """Bad hyper-parameters raise ValueError naming the problem (d_head=0 used to build a model with no
    attention, smear_keys="no" a smeared one, rotary_base=0 NaN positions)."""
    with pytest.raises(ValueError, match=fix):
        AttnOnlyConfig(**kwargs)


def test_config_sizes_are_checked_as_every_count_is():
    """Sizes take numpy integers, stored as ints (the config saves as JSON), and d_mlp=True is refused (it
    passed as a width of 1, a bool being an int) with the library's count message."""
    import json

    import numpy as np

    cfg = AttnOnlyConfig(n_layers=np.int64(1), n_heads=np.int32(2), d_model=np.int64(8), d_head=np.int64(4),
                         n_ctx=np.int64(16), vocab_size=np.int64(10), d_mlp=np.int64(12))
    sizes = (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.n_ctx, cfg.vocab_size, cfg.d_mlp)
    assert sizes == (1, 2, 8, 4, 16, 10, 12) and all(type(v) is int for v in sizes)
    assert json.loads(cfg.to_json_string())["d_mlp"] == 12
    for kw, match in ((dict(d_mlp=True), "d_mlp=True must be a positive integer or None: None is attention-only"),
                      (dict(d_mlp=0), "d_mlp=0 must be a positive integer or None"),
                      (dict(d_head=True), "d_head=True must be a positive integer or None")):
        with pytest.raises(ValueError, match=match):
            AttnOnlyConfig(**kw)


def test_hf_alias_names_set_the_field_and_d_head():
    """HF's names (hidden_size, num_attention_heads, ...) set our fields before d_head is derived: d_head is
    d_model // n_heads of the values used (it used to come from the defaults: hidden_size=64 gave d_head 32)."""
    cfg = AttnOnlyConfig(hidden_size=64, num_attention_heads=8, num_hidden_layers=3, max_position_embeddings=16)
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.n_ctx, cfg.d_head) == (64, 8, 3, 16, 8)
    assert (cfg.hidden_size, cfg.num_attention_heads) == (64, 8)
    with pytest.raises(ValueError, match="not divisible"):
        AttnOnlyConfig(hidden_size=30, n_heads=4)


@pytest.mark.parametrize("positional", ["shortformer", "standard", "rotary"])
@pytest.mark.parametrize("eager", [False, True])
def test_bfloat16_matches_float32(positional, eager):
    """A bf16 copy (smeared keys, left padding) runs and gives the float32 logits to bf16 precision, on both
    attention paths (rotary used to promote queries and keys to float32: SDPA / matmul dtype error)."""
    torch.manual_seed(0)
    model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=16, vocab_size=50,
                                               positional=positional, smear_keys=True, d_mlp=32)).eval()
    _randomise(model)
    half = AttnOnlyForCausalLM(model.config).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    x = torch.randint(0, 50, (2, 10))
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        want = model(x, attention_mask=mask, output_attentions=eager).logits
        got = half(x, attention_mask=mask, output_attentions=eager).logits
    assert got.dtype == torch.bfloat16
    err = (got.float() - want)[mask.bool()].abs().max().item()
    assert err < 0.05 * want.abs().max().item(), err


@pytest.mark.parametrize("bad", [[0, 1, 2, 40], [-1, 0, 1, 2]])
def test_position_ids_outside_learned_positions(tiny_model, bad):
    """Position ids outside 0..n_ctx-1 of a learned-position model raise a ValueError naming the range
    (they used to give a bare IndexError from the embedding)."""
    assert tiny_model.config.positional != "rotary"
    with pytest.raises(ValueError, match=r"learned positions cover 0\.\.31"):
        tiny_model(torch.zeros(1, 4, dtype=torch.long), position_ids=torch.tensor([bad]))


def test_too_long_sequence(tiny_model):
    """A sequence longer than n_ctx raises and says how to fix it."""
    with pytest.raises(ValueError, match="truncate"):
        tiny_model(torch.zeros(1, 40, dtype=torch.long))


@pytest.mark.parametrize("use_cache", [None, True, False])
def test_generate_matches_greedy_loop(use_cache):
    """``generate`` (the model has no KV cache) gives the tokens of a greedy loop over full forward passes,
    also on a left-padded batch: HF's default would feed only the newest token after the first step."""
    torch.manual_seed(0)
    model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=64, vocab_size=50,
                                               init_range=0.3)).eval()
    a, b = torch.randint(1, 50, (1, 10)), torch.randint(1, 50, (1, 7))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kw = {} if use_cache is None else {"use_cache": use_cache}
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw)
    for row, seq, start in ((0, a, 0), (1, b, 3)):
        y = seq.clone()
        with torch.no_grad():
            for _ in range(6):
                y = torch.cat([y, model(y).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert out[row, start:].tolist() == y[0].tolist(), (row, use_cache)
