"""Smeared keys (Olsson et al. 2022, Argument 2), and ``smear_keys(model)`` to add them to a model.

For each head h a trainable scalar alpha_h; the key at position j becomes
``k'_j = sigmoid(alpha_h) * k_j + (1 - sigmoid(alpha_h)) * k_{j-1}``, and the first position's key
is left as it is. A one-layer model can then match "the token before this key" against the query:
an induction head in a single layer.

Initialisation:
  * training from scratch: alpha = 0 (sigmoid = 0.5, an even mix); gradient descent decides
    per head how much of the previous key to keep.
  * editing a trained model (``smear_keys(model)``): alpha = ``EDIT_INIT_ALPHA`` = 6
    (sigmoid = 0.9975), so the edited model first computes almost exactly what the original did
    and the alphas remain trainable (Adam rescales their small gradients).

``smear_keys(model)`` returns an edited deep copy of our ``attn_only`` model, GPT-2, GPT-NeoX /
Pythia, Llama, Qwen2 or Mistral (the caller's model is untouched):

  * ``attn_only``: the model's own variant (``config.smear_keys=True``, ``attn.smear``), smearing
    after the rotation when positions are rotary; it saves and loads with ``save_pretrained``.
  * HF models: each attention module gets a ``key_smear`` submodule (a ``KeySmear``: its ``alpha``,
    one per key/value head, is an ``nn.Parameter`` in ``state_dict`` as ``...attn.key_smear.alpha``)
    and a forward hook on the key-producing module (``adapters``' ``k_proj`` site) that smears the
    key part of its output, (batch, pos, features):

        GPT-2   c_attn      q | k | v along features; keys = [:, :, d_model:2 d_model] -> (batch, pos, head, d_head)
        NeoX    query_key_value   (batch, pos, head, 3 d_head), per head [q, k, v]; keys = [..., d_head:2 d_head]
        Llama   k_proj      (batch, pos, kv_head * d_head); one alpha per key/value head (grouped-query
                            attention: the query heads that share a key head share its alpha)

    The hooks are bound methods of the ``key_smear`` modules, so ``copy.deepcopy`` of an edited model
    carries working hooks. nnsight traces (``run_with_ablations``) run the smear. The ``k_proj`` site's
    output, read through nnsight, is the raw projection (before the smear), as in our own model, where
    ``k_proj`` also precedes rotary and smear; a value written there is smeared afterwards.

Rotary positions (NeoX, Llama family): the smear is **after the rotation**, as in our model and the
paper's sense (the keys attention compares with queries are mixed), although the hook runs on the
projection output, before HF applies rotary. Rotations compose, so with R_j the rotation at position j
(HF's cos/sin, ``rotate_half`` convention, possibly only the first ``rotary_dim`` features and scaled
by ``attention_scaling``), writing ``k~_j = s k_j + (1 - s) R_j^{-1} R_{j-1} k_{j-1}`` before the
rotation gives exactly ``R_j k~_j = s R_j k_j + (1 - s) R_{j-1} k_{j-1}`` after it. The hook reads
cos/sin from the ``position_embeddings`` the attention module is called with (a forward pre-hook
records them), so it is exact for any position ids and rope scaling; tests compare it with keys
captured after rotary. A smear before rotary would instead mix in the previous key rotated to the
*current* position, a different (relative-position-mixing) variant.

Padding and caches: "previous" means the previous column of the input, unless the attention mask
marks that column as padding: then the key is left as it is, as the first key is (the attention
module's ``attention_mask``, read by the pre-hook; our model's own mask). So with left padding the
first real token is the first key, and a padded batch gives the unpadded sequences' logits (a pad
key mixed in would change every later token, and differently on the SDPA and eager paths, whose pad
rows differ). The hook sees only the tokens of the current call, so
incremental decoding with a KV cache would treat each new token as "first"; it raises instead
(generate with ``use_cache=False``); so does a pre-allocated cache (``StaticCache``) whose attention mask
has more key columns than the call has tokens, as the padding in it cannot be located. ``save_pretrained`` on an edited HF model stores the alphas, but
``from_pretrained`` builds a plain model: ``load_model`` rebuilds it (``smear_keys(plain)``, then the alphas).

Example:
    >>> smear = KeySmear(n_heads=2)
    >>> k = torch.randn(1, 2, 5, 8)  # (batch, head, pos, d_head)
    >>> smear(k).shape
    torch.Size([1, 2, 5, 8])
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50))
    >>> edited = smear_keys(gpt2)
    >>> get_alphas(edited).shape  # (layer, kv_head)
    torch.Size([2, 4])
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

SCRATCH_INIT_ALPHA = 0.0
EDIT_INIT_ALPHA = 6.0

# Architectures ``smear_keys`` knows the key layout of (model_type -> layout of the key projection).
Layout = Literal["attn_only", "gpt2", "neox", "split"]
SMEAR_LAYOUTS: dict[str, Layout] = {"attn_only": "attn_only", "gpt2": "gpt2", "gpt_neox": "neox",
                                    "llama": "split", "qwen2": "split", "mistral": "split"}
_ROTARY = {"neox", "split"}  # layouts whose keys HF rotates after the projection


class KeySmear(nn.Module):
    """Mixes each key with the previous position's key, one learned weight per head."""

    def __init__(self, n_heads: int, init_alpha: float = SCRATCH_INIT_ALPHA):
        super().__init__()
        self.init_alpha = init_alpha
        self.alpha = nn.Parameter(torch.full((n_heads,), float(init_alpha)))  # (head,)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.init_alpha)

    def forward(self, k: torch.Tensor, prev: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """k: (batch, head, pos, d_head) -> smeared keys of the same shape; position 0 exactly unchanged.

        prev: what positions 1..pos-1 mix in, (batch, head, pos - 1, d_head); default k_{j-1}.
        mask: the call's attention mask (``previous_is_real``; None: no padding): a key whose previous
        column is padding is left unchanged, as the first key (left padding must not mix a pad key into
        the first real token)."""
        prev_real = previous_is_real(mask, k.shape[2])
        if k.shape[1] != self.alpha.shape[0]:
            raise ValueError(f"KeySmear has {self.alpha.shape[0]} heads but the keys have {k.shape[1]}")
        # Mixed in at least float32, then rounded once: in bf16, s itself would round to a multiple of 2^-8 near
        # 1 (sigmoid(6) -> 0.9961, so 1 - s = 0.0039 instead of 0.0025; sigmoid(6.5) -> 1, no smear at all).
        work = torch.promote_types(k.dtype, torch.float32)
        s = torch.sigmoid(self.alpha.to(work))[None, :, None, None]  # (1, head, 1, 1)
        if prev is None:
            prev = k[:, :, :-1]  # k_{j-1} for j >= 1
        mixed = (s * k[:, :, 1:].to(work) + (1 - s) * prev.to(work)).to(k.dtype)  # (batch, head, pos - 1, d_head)
        if prev_real is not None:
            mixed = torch.where(prev_real[:, None, :, None].to(k.device), mixed, k[:, :, 1:])
        # Position 0 is copied, not mixed with itself: s k + (1 - s) k can differ from k in the last bit.
        return torch.cat([k[:, :, :1], mixed], dim=2)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        alpha = state_dict.get(prefix + "alpha")
        if alpha is not None and tuple(alpha.shape) != tuple(self.alpha.shape):
            raise ValueError(
                f"{prefix}alpha in the state dict has shape {tuple(alpha.shape)} but this layer smears "
                f"{self.alpha.shape[0]} key heads: load a state dict saved from a model with the same "
                "config (the same number of key/value heads)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def previous_is_real(mask: torch.Tensor | None, pos: int) -> torch.Tensor | None:
    """From an attention mask, (batch, pos - 1) bool: whether query j (j >= 1) may attend to column j - 1,
    i.e. whether its previous column is a real token. None (no padding) when ``mask`` is None.

    mask: (batch, pos) 1 = real token; or 4-D (batch, 1, q_pos, k_pos), bool (True = attend) or additive
    float (0 = attend, a large negative number = masked), with its last ``pos`` rows and columns the
    current tokens."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask[:, -pos:-1].bool() if pos > 1 else mask[:, :0].bool()
    if mask.dim() != 4:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)}: smeared keys need a (batch, pos) or "
                         "(batch, 1, q_pos, k_pos) mask to find padding")
    m = mask[:, 0, -pos:, -pos:]  # (batch, q_pos, k_pos)
    j = torch.arange(1, pos, device=m.device)
    allowed = m[:, j, j - 1]  # (batch, pos - 1): query j -> key j - 1
    if allowed.dtype == torch.bool:
        return allowed
    return allowed > torch.finfo(allowed.dtype).min / 2


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF / GPT-NeoX rotation helper: (x1, x2) -> (-x2, x1) on the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ProjectionKeySmear(KeySmear):
    """``KeySmear`` for an HF attention module: smears the key part of its key projection's output.

    Installed by ``smear_keys`` as ``attn.key_smear``; ``attach`` registers its hooks. Its hooks are
    bound methods, so a deep copy of the model maps them to the copied modules."""

    def __init__(self, n_kv_heads: int, d_head: int, d_model: int, layout: Layout,
                 init_alpha: float = EDIT_INIT_ALPHA):
        super().__init__(n_kv_heads, init_alpha)
        if layout not in ("gpt2", "neox", "split"):
            raise ValueError(f"layout {layout!r} is not an HF key layout: use gpt2, neox or split")
        self.n_kv_heads, self.d_head, self.d_model, self.layout = n_kv_heads, d_head, d_model, layout
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) of the running call
        self._mask: torch.Tensor | None = None  # the running call's attention mask (padding)

    def extra_repr(self) -> str:
        return f"kv_heads={self.n_kv_heads}, d_head={self.d_head}, layout={self.layout!r}"

    def attach(self, attn: nn.Module, key_module: nn.Module) -> None:
        attn.register_forward_pre_hook(self._before_attention, with_kwargs=True)
        attn.register_forward_hook(self._after_attention)
        key_module.register_forward_hook(self._smear_projection)

    # -- hooks
    def _before_attention(self, attn, args, kwargs):
        cache = next((kwargs[n] for n in ("cache", "past_key_values", "layer_past") if kwargs.get(n) is not None),
                     None)
        if cache is not None and hasattr(cache, "get_seq_length"):
            layer = getattr(attn, "layer_idx", 0) or 0
            if cache.get_seq_length(layer) > 0:
                raise ValueError(
                    "smeared keys need the previous token's key, which a KV cache holds only after the "
                    "smear: run incremental decoding without a cache (model.generate(..., use_cache=False)) "
                    "or pass the whole sequence in one call")
        self._rotary = kwargs.get("position_embeddings")
        self._mask = kwargs.get("attention_mask")
        if self.layout in _ROTARY and self._rotary is None:
            raise ValueError(f"{type(attn).__name__} was called without position_embeddings (cos, sin): "
                             "smeared keys on rotary models need them; call the model, not the attention module")
        return None

    def _after_attention(self, attn, args, output):
        self._rotary = self._mask = None  # never reuse one call's positions or mask in another
        return None

    def _smear_projection(self, module, args, out: torch.Tensor) -> torch.Tensor:
        """out: the key-producing module's output (batch, pos, features) -> same, keys smeared."""
        batch, pos = out.shape[:2]
        if self._mask is not None and self._mask.shape[-1] != pos:
            # the cache is empty (_before_attention), so the mask covers more keys than this call's only when the
            # cache is pre-allocated (StaticCache): its columns are not this call's tokens, padding would be misread
            raise ValueError(
                f"the attention mask has {self._mask.shape[-1]} key columns for {pos} tokens (a pre-allocated KV "
                "cache such as StaticCache): smeared keys cannot find this call's padding in it; run without a "
                "cache (use_cache=False) or with the default DynamicCache")
        h, dh = self.n_kv_heads, self.d_head
        if self.layout == "gpt2":  # q | k | v along features
            k = out[..., self.d_model:2 * self.d_model].reshape(batch, pos, h, dh)  # (batch, pos, head, d_head)
        elif self.layout == "neox":  # per head [q, k, v]
            k = out.reshape(batch, pos, h, 3 * dh)[..., dh:2 * dh]  # (batch, pos, head, d_head)
        else:
            k = out.reshape(batch, pos, h, dh)  # (batch, pos, kv_head, d_head)
        k = k.transpose(1, 2)  # (batch, head, pos, d_head)
        smeared = self(k, self._previous_keys(k), self._mask).transpose(1, 2)
        if self.layout == "gpt2":
            d = self.d_model
            return torch.cat([out[..., :d], smeared.reshape(batch, pos, d), out[..., 2 * d:]], dim=-1)
        if self.layout == "neox":
            qkv = out.reshape(batch, pos, h, 3 * dh)
            qkv = torch.cat([qkv[..., :dh], smeared, qkv[..., 2 * dh:]], dim=-1)
            return qkv.reshape(out.shape)
        return smeared.reshape(out.shape)

    def _previous_keys(self, k: torch.Tensor) -> torch.Tensor:
        """For positions 1..pos-1, the pre-rotary key that rotates at position j to R_{j-1} k_{j-1}.

        k: (batch, head, pos, d_head) -> (batch, head, pos - 1, d_head), in at least float32 (``forward`` rounds)."""
        prev = k[:, :, :-1]
        if self.layout not in _ROTARY:
            return prev
        if self._rotary is None:
            raise ValueError("the key projection ran outside its attention module's call: smeared keys on "
                             "rotary models need the positions the attention module receives")
        work = torch.promote_types(k.dtype, torch.float32)  # as the mix: at least float32, rounded once after it
        prev = prev.to(work)
        cos, sin = self._rotary  # (batch or 1, pos, rotary_dim), scaled by attention_scaling
        cos, sin = cos[:, None].to(work), sin[:, None].to(work)  # (batch, 1, pos, rotary_dim)
        rd = cos.shape[-1]
        rot, rest = prev[..., :rd], prev[..., rd:]
        c0, s0, c1, s1 = cos[:, :, :-1], sin[:, :, :-1], cos[:, :, 1:], sin[:, :, 1:]
        y = rot * c0 + _rotate_half(rot) * s0  # R_{j-1} k_{j-1}
        y = (y * c1 - _rotate_half(y) * s1) / (c1 * c1 + s1 * s1)  # R_j^{-1}
        return torch.cat([y, rest], dim=-1)


# ----------------------------------------------------------------------------- model edit

def _inner(model):
    return getattr(model, "_module", model)


def smear_modules(model) -> list[KeySmear]:
    """The ``KeySmear`` module of each layer, in layer order (empty for a model without smeared keys)."""
    return [m for m in _inner(model).modules() if isinstance(m, KeySmear)]


def is_smeared(model) -> bool:
    inner = _inner(model)
    return bool(smear_modules(inner)) or bool(getattr(getattr(inner, "config", None), "smear_keys", False))


def _layout(model) -> tuple[object, Layout]:
    from ..engine.adapters import get_adapter

    a = get_adapter(model)
    layout = SMEAR_LAYOUTS.get(a.model_type)
    if layout is None:
        raise ValueError(f"smear_keys does not know where {a.model_type!r} keeps its keys: supported are "
                         f"{', '.join(sorted(SMEAR_LAYOUTS))}. Add the layout to "
                         "interventions.zoo.smear.SMEAR_LAYOUTS (and a test) to support it")
    return a, layout


def smear_keys(model, init_alpha: float = EDIT_INIT_ALPHA):
    """A deep copy of ``model`` whose keys are smeared (one trainable alpha per key/value head).

    Args:
        model: an ``AttnOnlyForCausalLM``, GPT-2, GPT-NeoX / Pythia, Llama, Qwen2 or Mistral causal LM
            (or an nnsight wrapper of one). Not modified.
        init_alpha: initial alpha of every head; default ``EDIT_INIT_ALPHA`` (sigmoid 0.9975: the edit
            starts close to the original model). Use a large value (e.g. 100) for an exact no-op.
    Returns:
        The edited copy, in the same train/eval mode, dtype and device. Alphas: ``get_alphas``.

    Example:
        >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
        >>> edited = smear_keys(AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16)))
        >>> edited.config.smear_keys, get_alphas(edited).shape
        (True, torch.Size([1, 2]))
    """
    inner = _inner(model)
    a, layout = _layout(inner)
    if not isinstance(init_alpha, (int, float)) or isinstance(init_alpha, bool) or init_alpha != init_alpha:
        raise ValueError(f"init_alpha={init_alpha!r} must be a number (not NaN): the smear weight is sigmoid(alpha)")
    if is_smeared(inner):
        raise ValueError("this model already has smeared keys (a KeySmear module or config.smear_keys=True): "
                         "edit the original model, or change the alphas with set_alphas(model, alphas)")
    new = copy.deepcopy(inner)
    for layer in range(a.n_layers):
        attn = a.module(new, layer, "attn")
        key_module = a.module(new, layer, "k_proj")
        weight = next(key_module.parameters())
        if layout == "attn_only":
            smear = KeySmear(a.n_heads, init_alpha)
            attn.smear = smear
        else:
            smear = ProjectionKeySmear(a.n_kv_heads, a.d_head, a.d_model, layout, init_alpha)
            attn.key_smear = smear
            smear.attach(attn, key_module)
        smear.to(device=weight.device, dtype=weight.dtype)
        smear.train(attn.training)
    if layout == "attn_only":
        new.config.smear_keys = True
    return new


def get_alphas(model) -> torch.Tensor:
    """The alphas of a smeared model, (layer, kv_head), detached."""
    mods = smear_modules(model)
    if not mods:
        raise ValueError("this model has no smeared keys: make a copy that has them with smear_keys(model)")
    return torch.stack([m.alpha.detach() for m in mods])


@torch.no_grad()
def set_alphas(model, alphas: torch.Tensor | float) -> None:
    """Set every alpha of a smeared model in place: a scalar, or a (layer, kv_head) tensor."""
    mods = smear_modules(model)
    if not mods:
        raise ValueError("this model has no smeared keys: make a copy that has them with smear_keys(model)")
    shape = (len(mods), mods[0].alpha.shape[0])
    alphas = torch.as_tensor(alphas, dtype=torch.float32)
    if alphas.dim() == 0:
        alphas = alphas.expand(shape)
    if tuple(alphas.shape) != shape:
        raise ValueError(f"alphas has shape {tuple(alphas.shape)} but the model needs (n_layers, n_kv_heads) = "
                         f"{shape}: pass one alpha per layer and key/value head (or a single number)")
    if torch.isnan(alphas).any():
        raise ValueError("alphas contain NaN (every smeared key, and so every logit, would be NaN): pass numbers; "
                         "+inf gives an exact no-op, -inf the previous key")
    for m, row in zip(mods, alphas):
        m.alpha.copy_(row.to(m.alpha))
