"""The small-model family of Olsson et al. (2022) as a Hugging Face causal LM.

The exact computation, for tokens t (batch, pos), so that a ``HookedTransformer`` with
``HookedTransformerConfig(attn_only=d_mlp is None, normalization_type="LN",
positional_embedding_type=positional, act_fn="gelu", d_vocab_out=vocab_size)`` rebuilds it
(``tests/test_model.py`` does exactly that and compares logits)::

    x = W_E[t]                                   (+ W_pos[p] when positional == "standard")
    for each layer:
        a  = LN_1(x)                             LayerNorm, eps = layer_norm_eps
        qk = a + W_pos[p]  if "shortformer"      (positions enter queries and keys only)
             a             otherwise
        q, k, v = qk W_Q + b_Q,  qk W_K + b_K,  a W_V + b_V            (batch, head, pos, d_head)
        if "rotary": q, k = rope(q), rope(k)      GPT-NeoX half rotation, base 10000, all of d_head
        if smear_keys: k_j = s_h k_j + (1 - s_h) k_{j-1}, s_h = sigmoid(alpha_h)  (see smear.py)
        pattern = softmax(q k^T / sqrt(d_head) + causal mask)        (batch, head, q_pos, k_pos)
        z = pattern v                                                (batch, pos, head, d_head)
        x = x + concat_heads(z) W_O + b_O
        if d_mlp: x = x + gelu(LN_2(x) W_in + b_in) W_out + b_out
    logits = LN_f(x) W_U                          untied unembedding, no bias

Module names follow HF GPT-2 where that fits (``transformer.h[i].attn.c_proj``,
``transformer.ln_f``, ``lm_head``); queries, keys and values have separate projections
(``q_proj``/``k_proj``/``v_proj``) so each is a site of its own. The per-head output site is the
input of ``attn.c_proj`` (batch, pos, head * d_head). ``attn.hook_pattern`` is an identity module
whose output is the attention pattern; it runs only on the eager path (``attn_implementation=
"eager"``, or any call with ``output_attentions=True``). The default path uses PyTorch SDPA.

Example:
    >>> cfg = AttnOnlyConfig(n_layers=2, n_heads=4, d_model=64, n_ctx=32, vocab_size=100)
    >>> model = AttnOnlyForCausalLM(cfg).eval()
    >>> model(torch.zeros(1, 8, dtype=torch.long)).logits.shape
    torch.Size([1, 8, 100])
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from ..engine.tracing import check_positive

Positional = Literal["shortformer", "standard", "rotary"]
POSITIONAL_KINDS = ("shortformer", "standard", "rotary")


class AttnOnlyConfig(PretrainedConfig):
    """Hyper-parameters of the attention-only (or with-MLP) model.

    Args:
        n_layers, n_heads, d_model: depth, heads per layer, residual width.
        d_head: per-head width; default d_model // n_heads.
        n_ctx: context length (largest sequence the model accepts).
        vocab_size: number of token ids.
        positional: "shortformer" (learned positions added to query/key inputs only; the
            paper's small models, default), "standard" (added to the residual stream), "rotary".
        d_mlp: None for attention-only; a width gives the paper's "with MLP" family.
        smear_keys: the smeared-key variant (Argument 2); see ``interventions.zoo.smear``.
        layer_norm_eps: LayerNorm epsilon (1e-5, as GPT-2 and TransformerLens).
        init_range: std of the normal weight init (0.02, as GPT-2).
    """

    model_type = "attn_only"
    # Names HF utilities look for, read from (and written to) ours, as GPT2Config does.
    attribute_map = {"num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "hidden_size": "d_model",
                     "max_position_embeddings": "n_ctx"}

    def __init__(
        self,
        n_layers: int = 2,
        n_heads: int = 4,
        d_model: int = 128,
        d_head: int | None = None,
        n_ctx: int = 256,
        vocab_size: int = 260,
        positional: str = "shortformer",
        d_mlp: int | None = None,
        smear_keys: bool = False,
        layer_norm_eps: float = 1e-5,
        init_range: float = 0.02,
        rotary_base: float = 10000.0,
        **kwargs,
    ):
        # HF's names for our fields (attribute_map) would be set after d_head is derived from the default
        # d_model / n_heads; take them here so d_head follows the value that is actually used.
        ours = dict(n_layers=n_layers, n_heads=n_heads, d_model=d_model, n_ctx=n_ctx)
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                ours[name] = kwargs.pop(alias)
        n_layers, n_heads, d_model, n_ctx = ours["n_layers"], ours["n_heads"], ours["d_model"], ours["n_ctx"]
        if positional not in POSITIONAL_KINDS:
            raise ValueError(f"positional={positional!r} is unknown: choose one of {POSITIONAL_KINDS}")
        n_layers, n_heads, d_model, n_ctx, vocab_size = (  # ints (a numpy integer would not save as JSON)
            check_positive(value, name) for name, value in (("n_layers", n_layers), ("n_heads", n_heads),
                                                              ("d_model", d_model), ("n_ctx", n_ctx),
                                                              ("vocab_size", vocab_size)))
        d_head = check_positive(d_head, "d_head", allow_none=True, why="None is d_model / n_heads")
        if not isinstance(smear_keys, bool):
            raise ValueError(f"smear_keys={smear_keys!r} must be True or False")
        for name, value, zero_ok in (("layer_norm_eps", layer_norm_eps, False), ("rotary_base", rotary_base, False),
                                     ("init_range", init_range, True)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < 0 or (value == 0 and not zero_ok):
                raise ValueError(f"{name}={value!r} must be a finite number {'>= 0' if zero_ok else '> 0'}")
        if d_head is None:
            if d_model % n_heads:
                raise ValueError(
                    f"d_model={d_model} is not divisible by n_heads={n_heads}: pick d_model a "
                    f"multiple of n_heads, or pass d_head explicitly")
            d_head = d_model // n_heads
        if positional == "rotary" and d_head % 2:
            raise ValueError(f"rotary positions need an even d_head, got {d_head}")
        d_mlp = check_positive(d_mlp, "d_mlp", allow_none=True, why="None is attention-only")
        self.n_layers, self.n_heads, self.d_model, self.d_head = n_layers, n_heads, d_model, d_head
        self.n_ctx, self.positional, self.d_mlp = n_ctx, positional, d_mlp
        self.smear_keys, self.layer_norm_eps, self.init_range = smear_keys, layer_norm_eps, init_range
        self.rotary_base = rotary_base
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(vocab_size=vocab_size, **kwargs)



def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotation helper: (x1, x2) -> (-x2, x1) on the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(positions: torch.Tensor, d_head: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (pos, d_head) or (batch, pos, d_head) for the given positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, d_head, 2, dtype=torch.float64, device=positions.device) / d_head))
    freqs = positions.to(torch.float64)[..., None] * inv_freq  # (..., pos, d_head/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


class Attention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections."""

    def __init__(self, config: AttnOnlyConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_heads, self.d_head = config.n_heads, config.d_head
        inner = config.n_heads * config.d_head
        self.q_proj = nn.Linear(config.d_model, inner)
        self.k_proj = nn.Linear(config.d_model, inner)
        self.v_proj = nn.Linear(config.d_model, inner)
        # The smeared-key variant lives in its own module (interventions/zoo/smear.py); None = vanilla.
        self.smear = None
        if config.smear_keys:
            from .smear import KeySmear

            self.smear = KeySmear(config.n_heads)
        self.hook_pattern = nn.Identity()  # output: pattern (batch, head, q_pos, k_pos); eager only
        self.c_proj = nn.Linear(inner, config.d_model)  # input: per-head outputs z (batch, pos, head*d_head)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, pos, _ = x.shape
        return x.view(batch, pos, self.n_heads, self.d_head).transpose(1, 2)  # (batch, head, pos, d_head)

    def forward(self, a: torch.Tensor, qk_in: torch.Tensor, mask: torch.Tensor | None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None, eager: bool) -> torch.Tensor:
        q = self.split_heads(self.q_proj(qk_in))  # (batch, head, pos, d_head)
        k = self.split_heads(self.k_proj(qk_in))
        v = self.split_heads(self.v_proj(a))
        if rotary is not None:
            cos, sin = rotary[0].to(q.dtype), rotary[1].to(q.dtype)  # float32 tables: keep a bf16 model bf16
            if cos.dim() == 3:  # per-batch positions: (batch, pos, d_head) -> (batch, 1, pos, d_head)
                cos, sin = cos[:, None], sin[:, None]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if self.smear is not None:  # after the rotation, so the smear mixes the keys attention uses
            k = self.smear(k, mask=mask)  # pad keys never mixed in
        if eager:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)  # (batch, head, q_pos, k_pos)
            pos = q.shape[-2]
            if mask is None:
                causal = torch.ones(pos, pos, dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            z = pattern @ v  # (batch, head, pos, d_head)
        else:
            pattern = None
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        batch, _, pos, _ = z.shape
        z = z.transpose(1, 2).reshape(batch, pos, self.n_heads * self.d_head)  # (batch, pos, head*d_head)
        return self.c_proj(z), pattern


class MLP(nn.Module):
    def __init__(self, config: AttnOnlyConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_mlp)
        self.act = nn.GELU()
        self.c_proj = nn.Linear(config.d_mlp, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm block: attention, then (optionally) an MLP."""

    def __init__(self, config: AttnOnlyConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = Attention(config, layer_idx)
        if config.d_mlp is not None:
            self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
            self.mlp = MLP(config)

    def forward(self, x, pos_emb, mask, rotary, eager):
        a = self.ln_1(x)
        qk_in = a + pos_emb if pos_emb is not None else a
        attn_out, pattern = self.attn(a, qk_in, mask, rotary, eager)
        x = x + attn_out
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.ln_2(x))
        return x, pattern


class AttnOnlyModel(nn.Module):
    """Embeddings, blocks and final LayerNorm (GPT-2's ``transformer``)."""

    def __init__(self, config: AttnOnlyConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        if config.positional != "rotary":
            self.wpe = nn.Embedding(config.n_ctx, config.d_model)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)


class AttnOnlyForCausalLM(PreTrainedModel, GenerationMixin):
    """Attention-only transformer LM (see the module docstring for the exact computation)."""

    config_class = AttnOnlyConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _no_split_modules = ["Block"]

    def __init__(self, config: AttnOnlyConfig):
        super().__init__(config)
        self.transformer = AttnOnlyModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters") and module.__class__.__name__ == "KeySmear":
            module.reset_parameters()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """The model keeps no KV cache, so every step of ``generate`` runs the whole sequence (HF's default
        would feed only the newest token once a cache is assumed, and the model would see one token);
        positions come from the mask, as in ``forward``. Independent of the transformers version."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """input_ids (batch, pos); attention_mask (batch, pos) with 1 = real token; labels as HF
        (shifted inside, -100 ignored). Returns logits (batch, pos, vocab) and optionally loss and
        attentions (one (batch, head, q_pos, k_pos) per layer)."""
        cfg = self.config
        batch, pos = input_ids.shape
        if pos > cfg.n_ctx:
            raise ValueError(f"sequence of {pos} tokens is longer than the model's context n_ctx={cfg.n_ctx}: "
                             f"truncate the input to {cfg.n_ctx} tokens")
        if position_ids is None:
            if attention_mask is not None and not bool(attention_mask.all()):
                # Left or right padding: count positions over real tokens only.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(pos, device=input_ids.device)[None].expand(batch, pos)
        elif cfg.positional != "rotary" and position_ids.numel() and (
                int(position_ids.min()) < 0 or int(position_ids.max()) >= cfg.n_ctx):
            raise ValueError(f"position_ids run from {int(position_ids.min())} to {int(position_ids.max())}, but the "
                             f"learned positions cover 0..{cfg.n_ctx - 1} (n_ctx={cfg.n_ctx}): pass position ids in "
                             "that range, or none (they follow the attention mask)")
        eager = bool(output_attentions) or getattr(cfg, "_attn_implementation", "sdpa") == "eager"

        x = self.transformer.wte(input_ids)  # (batch, pos, d_model)
        pos_emb, rotary = None, None
        if cfg.positional == "standard":
            x = x + self.transformer.wpe(position_ids)
        elif cfg.positional == "shortformer":
            pos_emb = self.transformer.wpe(position_ids)
        else:
            rotary = rotary_cos_sin(position_ids, cfg.d_head, cfg.rotary_base)

        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, k_pos)
            causal = torch.ones(pos, pos, dtype=torch.bool, device=input_ids.device).tril()
            allowed = causal & keep
            # A padded query sees nothing; let it see itself so softmax stays finite.
            allowed = allowed | torch.eye(pos, dtype=torch.bool, device=input_ids.device)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min)  # (batch, 1, q_pos, k_pos)

        patterns = []
        for block in self.transformer.h:
            x, pattern = block(x, pos_emb, mask, rotary, eager)
            patterns.append(pattern)
        logits = self.lm_head(self.transformer.ln_f(x))  # (batch, pos, vocab)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits,
                              attentions=tuple(patterns) if output_attentions else None)


def register() -> None:
    """Register with the Auto classes so ``AutoModelForCausalLM.from_pretrained(dir)`` loads a
    saved model without ``trust_remote_code``. Idempotent; called when ``interventions`` is
    imported (the one deliberate import-time effect: registration in HF's class registry)."""
    try:
        AutoConfig.register("attn_only", AttnOnlyConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(AttnOnlyConfig, AttnOnlyForCausalLM)
    except ValueError:
        pass


register()
