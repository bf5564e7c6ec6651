"""Independent re-implementations used as oracles in tests (and benchmarks).

``to_hooked_transformer`` rebuilds our attention-only model in TransformerLens from the exact
computation documented in ``interventions/zoo/model.py``, copying the weights; it shares no code with
our forward pass."""

from __future__ import annotations

import torch


def to_hooked_transformer(model):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = model.config
    tl_cfg = HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, n_ctx=c.n_ctx, d_head=c.d_head, n_heads=c.n_heads,
        d_vocab=c.vocab_size, d_vocab_out=c.vocab_size, attn_only=c.d_mlp is None, d_mlp=c.d_mlp,
        act_fn="gelu", normalization_type="LN", positional_embedding_type=c.positional,
        rotary_dim=c.d_head if c.positional == "rotary" else None, rotary_base=int(c.rotary_base),
        eps=c.layer_norm_eps, default_prepend_bos=False, device="cpu", dtype=torch.float32)
    tl = HookedTransformer(tl_cfg)
    H, dh, D = c.n_heads, c.d_head, c.d_model
    sd = {"embed.W_E": model.transformer.wte.weight, "ln_final.w": model.transformer.ln_f.weight,
          "ln_final.b": model.transformer.ln_f.bias, "unembed.W_U": model.lm_head.weight.T,
          "unembed.b_U": torch.zeros(c.vocab_size)}
    if c.positional != "rotary":
        sd["pos_embed.W_pos"] = model.transformer.wpe.weight
    for i, block in enumerate(model.transformer.h):
        a, p = block.attn, f"blocks.{i}."
        sd[p + "ln1.w"], sd[p + "ln1.b"] = block.ln_1.weight, block.ln_1.bias
        for name, proj in (("Q", a.q_proj), ("K", a.k_proj), ("V", a.v_proj)):
            sd[p + f"attn.W_{name}"] = proj.weight.T.reshape(D, H, dh).permute(1, 0, 2)
            sd[p + f"attn.b_{name}"] = proj.bias.reshape(H, dh)
        sd[p + "attn.W_O"] = a.c_proj.weight.T.reshape(H, dh, D)
        sd[p + "attn.b_O"] = a.c_proj.bias
        if c.d_mlp is not None:
            sd[p + "ln2.w"], sd[p + "ln2.b"] = block.ln_2.weight, block.ln_2.bias
            sd[p + "mlp.W_in"], sd[p + "mlp.b_in"] = block.mlp.c_fc.weight.T, block.mlp.c_fc.bias
            sd[p + "mlp.W_out"], sd[p + "mlp.b_out"] = block.mlp.c_proj.weight.T, block.mlp.c_proj.bias
    missing, unexpected = tl.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    real_missing = [k for k in missing if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))]
    assert not real_missing and not unexpected, (real_missing, unexpected)
    return tl.eval()


@torch.no_grad()
def inputs_of(model, modules, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """The first input of each of ``modules`` (by index) in one forward of ``model`` on ``tokens``,
    recorded with plain PyTorch forward pre-hooks (e.g. every layer's per-head output ``z``: the
    output projection's input, (batch, pos, n_heads * d_head))."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].clone()))
             for i, m in enumerate(modules)]
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return seen
