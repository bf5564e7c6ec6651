"""Where each architecture keeps its layers, attention, projections and patterns.

The one place that maps a site (``interventions.engine.sites``) to a module path and to the module's
input or output. Everything else asks ``get_adapter(model)``.

Per layer L, a site is read at one *point* (a module's input or output)::

    resid_pre   block input           q / k / v   q_proj / k_proj / v_proj output (fused c_attn /
    pattern     hook_pattern output               query_key_value for GPT-2 / NeoX, sliced per head)
    z           o_proj input          attn_out    o_proj output
    mlp_out     mlp output            resid_post  block output (first element when it is a tuple)
    final       unembedding input (after the final norm)

Zeroing head h's slice of ``z`` equals zeroing that head's rows of the output projection exactly (the
tests check it per architecture).

Supported: our ``attn_only`` model, GPT-2, GPT-NeoX / Pythia, Llama, Qwen2, Mistral (grouped-query
attention: ``n_kv_heads`` < ``n_heads``). Register another with ``register_adapter``.

Example:
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    >>> a = get_adapter(AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32)))
    >>> a.n_layers, a.n_heads, a.d_head, a.point(Site(1, "z"))
    (2, 4, 8, ('transformer.h.1.attn.c_proj', 'input'))
    >>> a.point("L1.z") == a.point(Site(1, "z"))  # the README's escape hatch names sites as strings
    True
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from .sites import KV_KINDS, Site, parse_site


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture, relative to the causal-LM model.

    Paths of projections are relative to the attention module; ``q_proj`` / ``v_proj`` default to
    ``k_proj`` when q/k/v are fused (``fused_qkv``), else to ``"q_proj"`` / ``"v_proj"``."""

    layers: str  # the ModuleList of decoder blocks
    attn: str  # attention, relative to a block
    o_proj: str  # output projection, relative to attn: its input is the per-head site z
    k_proj: str  # module whose output holds the keys, relative to attn
    pattern: str | None = None  # pattern module relative to attn (None: ``hook_pattern``, added by ``observable``)
    fused_qkv: str | None = None  # "gpt2" (c_attn: q|k|v), "neox" (per-head [q_h|k_h|v_h]) or None
    unembed: str | None = None  # None: the model's output embeddings (``get_output_embeddings``)
    q_proj: str | None = None
    v_proj: str | None = None
    mlp: str | None = "mlp"  # relative to a block; a model without one has no mlp_out site
    block_output: str = "tensor"  # "tensor" or "tuple" (first element is the residual stream)
    # The attention module's output is exactly its output projection's output (no dropout, no extra
    # term). Built-in architectures only: lets a sweep skip recomputing an ablated layer's attention.
    attn_is_o_proj: bool = False
    final_norm: str | None = None  # the norm before the unembedding (copying score); None: not known


ARCHS: dict[str, ArchSpec] = {
    "attn_only": ArchSpec("transformer.h", "attn", "c_proj", "k_proj", "hook_pattern", block_output="tuple",
                          attn_is_o_proj=True, final_norm="transformer.ln_f"),
    "gpt2": ArchSpec("transformer.h", "attn", "c_proj", "c_attn", "hook_pattern", fused_qkv="gpt2",
                     attn_is_o_proj=True, final_norm="transformer.ln_f"),
    # transformers 5 names the NeoX unembedding ``lm_head`` (4.x: ``embed_out``): found as the output embeddings
    "gpt_neox": ArchSpec("gpt_neox.layers", "attention", "dense", "query_key_value", "hook_pattern",
                         fused_qkv="neox", attn_is_o_proj=True, final_norm="gpt_neox.final_layer_norm"),
    "llama": ArchSpec("model.layers", "self_attn", "o_proj", "k_proj", "hook_pattern", attn_is_o_proj=True,
                      final_norm="model.norm"),
    "qwen2": ArchSpec("model.layers", "self_attn", "o_proj", "k_proj", "hook_pattern", attn_is_o_proj=True,
                      final_norm="model.norm"),
    "mistral": ArchSpec("model.layers", "self_attn", "o_proj", "k_proj", "hook_pattern", attn_is_o_proj=True,
                        final_norm="model.norm"),
}

# The built-in architectures as shipped (``register_adapter`` may add or replace entries of ``ARCHS``):
# their adapters are proven against the forward by the tests on every supported architecture.
BUILTIN_ARCHS = MappingProxyType(dict(ARCHS))

_REGISTER_HINT = ("interventions.register_adapter({}, interventions.ArchSpec(layers='model.layers', attn='self_attn', "
                  "o_proj='o_proj', k_proj='k_proj', attn_is_o_proj=True, "
                  "final_norm='model.norm'))  # paths of your model's modules (final_norm: the norm before the "
                  "unembedding, which the copying score and head_scores need); pattern sites are added by "
                  "observable()")


def register_adapter(model_type: str, spec: ArchSpec) -> None:
    """Teach the toolkit a new architecture (``model.config.model_type``).

    Example:
        >>> register_adapter("my_llama", ArchSpec(layers="model.layers", attn="self_attn", o_proj="o_proj",
        ...                                       k_proj="k_proj"))
        >>> _ = ARCHS.pop("my_llama")
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be the model's config.model_type (a string), got {model_type!r}: "
                         f"{_REGISTER_HINT.format('model.config.model_type')}")
    if not isinstance(spec, ArchSpec):
        raise ValueError(f"spec must be an ArchSpec, got {type(spec).__name__}: "
                         f"{_REGISTER_HINT.format(repr(model_type))}")
    if spec.fused_qkv not in (None, "gpt2", "neox"):
        raise ValueError(f"ArchSpec(fused_qkv={spec.fused_qkv!r}) is unknown: use 'gpt2' (one projection, "
                         "[q | k | v]), 'neox' (one projection, per head [q_h | k_h | v_h]) or None (separate q/k/v "
                         "projections)")
    if spec.block_output not in ("tensor", "tuple"):
        raise ValueError(f"ArchSpec(block_output={spec.block_output!r}) is unknown: use 'tensor' (a block returns the "
                         "residual stream) or 'tuple' (its first element is)")
    ARCHS[model_type] = spec


def unwrap(model):
    """The torch module under an nnsight wrapper (or the model itself)."""
    if isinstance(model, nn.Module) and "_module" not in model.__dict__ and "_module" not in model._modules:
        return model  # a plain torch module, without the raise of Module.__getattr__ for a missing name (~1 us)
    return getattr(model, "_module", model)


def module_at(root, path: str):
    """The module (or nnsight envoy, when ``root`` is one) at dotted ``path``; AttributeError where no
    module is there (a missing name, a parameter or other attribute, an index into a non-list)."""
    for part in path.split("."):
        try:
            child = root[int(part)] if part.isdigit() else getattr(root, part)
        except TypeError:  # indexing a module that is not a list of modules
            raise AttributeError(f"no module at {path!r}: {type(root).__name__} is not indexable") from None
        if isinstance(root, nn.Module) and not isinstance(child, nn.Module):
            raise AttributeError(f"no module at {path!r}: {part!r} is a {type(child).__name__}, not a module")
        root = child
    return root


@dataclass(frozen=True)
class Adapter:
    """An architecture's sites and sizes for one model."""

    model_type: str
    spec: ArchSpec
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    vocab_size: int
    n_ctx: int | None

    def path(self, layer: int, part: str) -> str:
        """Dotted module path of a module of ``layer``: layer, attn, o_proj, q_proj, k_proj, v_proj,
        pattern or mlp."""
        self.check_layer(layer)
        s = self.spec
        base = f"{s.layers}.{layer}"
        if part == "layer":
            return base
        if part == "mlp":
            if s.mlp is None:
                raise ValueError(f"this {self.model_type} adapter names no MLP module: set ArchSpec(mlp=...)")
            return f"{base}.{s.mlp}"
        attn = f"{base}.{s.attn}"
        if part == "attn":
            return attn
        default = s.k_proj if s.fused_qkv else None
        sub = {"o_proj": s.o_proj, "k_proj": s.k_proj, "pattern": s.pattern or "hook_pattern",
               "q_proj": s.q_proj or default or "q_proj", "v_proj": s.v_proj or default or "v_proj"}.get(part)
        if sub is None:
            raise ValueError(f"unknown module {part!r}: use one of layer, attn, o_proj, q_proj, k_proj, v_proj, "
                             "pattern, mlp")
        return f"{attn}.{sub}"

    def module(self, root, layer: int, part: str):
        """The module (or nnsight envoy, when ``root`` is one) ``part`` of ``layer``."""
        return module_at(root, self.path(layer, part))

    def point(self, site: Site | str, root=None) -> tuple[str, str]:
        """(module path, "input" or "output") where ``site`` (``Site(1, "z")`` or ``"L1.z"``) is read and
        written; ``root``: the model, where the ``final`` site's unembedding is found (``unembed_path``)."""
        if type(site) is not Site:
            site = parse_site(site, self.n_layers)
        kind = site.kind
        if kind == "final":
            return self.unembed_path(root), "input"
        part, io = {"resid_pre": ("layer", "input"), "q": ("q_proj", "output"), "k": ("k_proj", "output"),
                    "v": ("v_proj", "output"), "pattern": ("pattern", "output"), "z": ("o_proj", "input"),
                    "attn_out": ("o_proj", "output"), "mlp_out": ("mlp", "output"),
                    "resid_post": ("layer", "output")}[kind]
        return self.path(site.layer, part), io

    def n_site_heads(self, kind: str) -> int:
        return self.n_kv_heads if kind in KV_KINDS else self.n_heads

    def view_spec(self, kind: str) -> tuple:
        """How the site's view is cut from the tensor at its point, as plain data
        ``(lo, hi, split, pick)``: ``raw[..., lo:hi]`` (``lo`` None: all of it), viewed as
        ``(batch, pos, *split)`` (``split`` None: as it is), then ``[:, :, :, pick]`` (None: no pick).
        Plain data so that a trace body run on a server (``remote=True``) needs no code of this package."""
        if kind in ("q", "k", "v"):
            n, d = self.n_site_heads(kind), self.d_head
            which = "qkv".index(kind)
            if self.spec.fused_qkv == "gpt2":  # [q | k | v] along the last dim; k, v of n_kv_heads heads each (Phi-3)
                lo = (0, self.n_heads, self.n_heads + self.n_kv_heads)[which] * d
                return lo, lo + n * d, (n, d), None
            if self.spec.fused_qkv == "neox":  # per head [q_h | k_h | v_h]
                return None, None, (self.n_heads, 3, d), which
            return None, None, (n, d), None
        if kind == "z":
            return None, None, (self.n_heads, self.d_head), None
        return None, None, None, None

    def view(self, raw: torch.Tensor, kind: str) -> torch.Tensor:
        """``raw`` (the tensor at the site's point) as a view in the site's documented shape: writes to
        the view change ``raw`` in place."""
        return cut_view(raw, self.view_spec(kind))

    def unembed_path(self, root=None) -> str:
        """Path of the unembedding module in ``root``: the spec's ``unembed``, which must exist, or where it
        is unset the module ``get_output_embeddings`` returns (names differ across transformers versions,
        e.g. NeoX ``embed_out`` -> ``lm_head``)."""
        named = self.spec.unembed
        if root is None:
            if named is None:
                raise ValueError("the unembedding's path is found in the model: pass it, "
                                 "get_adapter(model).point('final', model)")
            return named
        inner = unwrap(root)
        if named is not None:
            try:
                module_at(inner, named)
            except (AttributeError, IndexError):
                raise ValueError(f"no unembedding module at {named!r} (ArchSpec(unembed=...)) in this "
                                 f"{self.model_type} model: register the adapter with ArchSpec(unembed=<path of the "
                                 "lm head>), or leave unembed unset to use the model's get_output_embeddings()") \
                    from None
            return named
        out = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if out is not None:
            if getattr(inner, "lm_head", None) is out:  # the usual name, without a walk over every module
                return "lm_head"
            for name, m in inner.named_modules():
                if m is out:
                    return name
        raise ValueError(f"this {self.model_type} model has no output embeddings (get_output_embeddings()): "
                         "register the adapter with ArchSpec(unembed=<path of the lm head>)")

    def check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer!r} out of range: this model has layers 0-{self.n_layers - 1}")

    def head_slice(self, head: int) -> slice:
        """Columns of head ``head`` in the raw per-head output (the o_proj input)."""
        return slice(head * self.d_head, (head + 1) * self.d_head)


def cut_view(raw: torch.Tensor, spec: tuple) -> torch.Tensor:
    """The view ``Adapter.view_spec`` describes (the trace body repeats these lines inline)."""
    lo, hi, split, pick = spec
    view = raw if lo is None else raw[..., lo:hi]
    if split is not None:
        view = view.view(raw.shape[0], raw.shape[1], *split)
    return view if pick is None else view[:, :, :, pick]


_ADAPTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def get_adapter(model) -> Adapter:
    """The adapter of an HF causal LM (or an nnsight wrapper of one).

    Cached per model and config object (HF config attribute reads are slow enough to show in the
    per-trace overhead); re-read when the config, its model type or the registry changes. Holds no
    reference to the model (weak keys; the value references only the config)."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    try:
        cached = _ADAPTERS.get(inner)
    except TypeError:  # not weak-referenceable
        cached = None
    # the model type is read again: a user may rename it (``config.model_type = ...``) to register an adapter
    model_type = getattr(config, "model_type", None)
    if cached is not None and cached[0] is config and cached[2].model_type == model_type \
            and cached[1] is ARCHS.get(model_type):
        return cached[2]
    adapter = _build_adapter(config)
    try:
        _ADAPTERS[inner] = (config, adapter.spec, adapter)
    except TypeError:
        pass
    return adapter


def _build_adapter(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(
            f"unsupported architecture {model_type!r}: supported are {', '.join(sorted(ARCHS))}. "
            f"Register one with {_REGISTER_HINT.format(repr(model_type))}")
    spec = ARCHS[model_type]
    c = config
    n_heads = int(getattr(c, "num_attention_heads", None) or getattr(c, "n_head"))
    d_model = int(getattr(c, "hidden_size", None) or getattr(c, "n_embd"))
    d_head = int(getattr(c, "head_dim", None) or getattr(c, "d_head", None) or d_model // n_heads)
    n_kv = int(getattr(c, "num_key_value_heads", None) or n_heads)
    n_layers = int(getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer"))
    n_ctx = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    return Adapter(model_type, spec, n_layers, n_heads, n_kv, d_head, d_model, int(c.vocab_size),
                   int(n_ctx) if n_ctx else None)


# ----------------------------------------------------------------------------- patterns

def observable_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention for any HF architecture, routing the pattern through ``module.hook_pattern``.

    query (batch, head, q_pos, d_head); key/value (batch, kv_head, k_pos, d_head). A logit softcap
    (``softcap``, Gemma 2) is applied as HF's eager attention does, and so is GPT-2's
    ``reorder_and_upcast_attn`` (scores in float32, autocast off); attention sinks or an added position
    bias (``s_aux`` / ``sinks``, ``position_bias``) are refused: computing without them would be wrong."""
    extra = [name for name in ("s_aux", "sinks", "position_bias") if kwargs.get(name) is not None]
    if extra:
        from .tracing import InterventionError

        raise InterventionError(f"this {type(module).__name__} passes {', '.join(extra)} to its attention, which "
                                "observable()'s eager attention does not compute: its patterns cannot be observed; "
                                "use sites other than pattern (and ablations that are not PatternPreserving)")
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention: each kv head serves n_rep query heads
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if getattr(module, "reorder_and_upcast_attn", False):
        with torch.autocast(query.device.type, enabled=False):
            scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    else:
        scores = (query @ key.transpose(-1, -2)) * scaling  # (batch, head, q_pos, k_pos)
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    # masked in float32, where the softmax runs: in fp16 a score plus the mask's dtype minimum overflows
    # to -inf, and a query with no real key (left padding) got NaN, which padded keys' values carry on
    # to real queries (0 * NaN); every query with a real key gets what HF's eager attention gives
    scores = scores.float()
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., : key.shape[-2]], torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    weights = scores.softmax(dim=-1).to(value.dtype)
    hook = getattr(module, "hook_pattern", None)
    if hook is not None:
        weights = hook(weights)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = (weights @ value).transpose(1, 2).contiguous()  # (batch, q_pos, head, d_head)
    return out, weights


_REGISTERED = False


def _register_attention() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register("interventions_eager", observable_attention)
        # Without a mask function of the same name HF builds *no* mask for a custom attention
        # implementation (it assumes the kernel masks by itself), so the eager path above would attend
        # to future tokens. The eager mask is additive (0 / dtype min), causal, and honours padding.
        AttentionMaskInterface.register("interventions_eager", eager_mask)
        _REGISTERED = True


def has_pattern_site(model) -> bool:
    inner = unwrap(model)
    a = get_adapter(inner)
    try:
        a.module(inner, 0, "pattern")
    except (AttributeError, IndexError):
        return False
    impl = getattr(inner.config, "_attn_implementation", None)
    return impl in ("eager", "interventions_eager")


@contextlib.contextmanager
def observable(model):
    """Temporarily make attention patterns observable and writable (eager path + pattern modules).

    Inside the block every attention module of ``model`` has a ``hook_pattern`` identity module
    whose output is the pattern (batch, head, q_pos, k_pos). On exit the model is restored (modules
    removed, attention implementation reset), so the caller's model is left as it was.

    Example:
        >>> import torch
        >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM, run_with_cache
        >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=20)).eval()
        >>> with observable(model):
        ...     _, acts = run_with_cache(model, torch.zeros(1, 5, dtype=torch.long), ["L0.pattern"])
        >>> acts["L0.pattern"].shape, model.config._attn_implementation  # restored on exit
        (torch.Size([1, 2, 5, 5]), 'sdpa')
    """
    inner = unwrap(model)
    a = get_adapter(inner)
    added = []
    impl = "eager" if a.model_type == "attn_only" else "interventions_eager"
    # the model's config and any sub-configs some models keep per module, each with its own old value
    configs = {id(inner.config): inner.config}
    if a.model_type != "attn_only":
        _register_attention()
        attns = []
        for layer in range(a.n_layers):  # all found before any is edited: a failure leaves the model as it was
            try:
                attns.append(a.module(inner, layer, "attn"))
            except (AttributeError, IndexError):
                raise ValueError(f"observable: this {a.model_type} model has no attention module at "
                                 f"{a.path(layer, 'attn')!r}: fix the adapter with interventions.register_adapter "
                                 "(ArchSpec(attn=...))") from None
        for attn in attns:
            if not hasattr(attn, "hook_pattern"):
                # in its attention module's mode: a new module trains by default, and one in training mode
                # made every run of an eval-mode model with attention dropout (GPT-2) warn "call model.eval()"
                attn.hook_pattern = nn.Identity().train(attn.training)
                added.append(attn)
        for m in inner.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                configs[id(cfg)] = cfg
    saved = [(cfg, getattr(cfg, "_attn_implementation", None)) for cfg in configs.values()]
    for cfg, _ in saved:
        cfg._attn_implementation = impl
    try:
        yield model
    finally:
        for attn in added:
            del attn.hook_pattern
        for cfg, old in saved:
            cfg._attn_implementation = old
