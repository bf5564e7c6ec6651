"""The one site vocabulary: every activation the toolkit reads or writes, with its shape.

A site is ``Site(layer, kind)``, written ``"L<layer>.<kind>"`` (``"L1.z"``). Kinds, in the order they
run inside a layer (the engine visits them in this order; nnsight requires execution order):

============  ==============================  =====================================================
kind          shape                           what it is (TransformerLens name)
============  ==============================  =====================================================
resid_pre     (batch, pos, d_model)           residual stream entering the layer (hook_resid_pre)
q             (batch, pos, head, d_head)      queries as the query projection writes them, before
                                              rotary embeddings and any q/k norm (attn.hook_q)
k             (batch, pos, kv_head, d_head)   keys, per key/value head, before rotary embeddings
                                              and key smearing (attn.hook_k)
v             (batch, pos, kv_head, d_head)   values, per key/value head (attn.hook_v)
pattern       (batch, head, q_pos, k_pos)     attention pattern; only inside ``observable(model)``
                                              (attn.hook_pattern)
z             (batch, pos, head, d_head)      per-head output: the input of the attention output
                                              projection, head h at columns h*d_head.. (attn.hook_z)
attn_out      (batch, pos, d_model)           attention output: the output projection's output
                                              (hook_attn_out)
mlp_out       (batch, pos, d_model)           MLP output; models with an MLP only (hook_mlp_out)
resid_post    (batch, pos, d_model)           residual stream leaving the layer (hook_resid_post)
============  ==============================  =====================================================

Plus one site outside the layers: ``"final"`` (batch, pos, d_model), the input of the unembedding,
i.e. the residual stream after the final norm (TransformerLens' ``ln_final.hook_normalized``).

Grouped-query attention (Llama, Qwen2, Mistral with ``num_key_value_heads < num_attention_heads``):
``k`` and ``v`` have ``n_kv_heads`` heads; query head h reads key/value head
``h // (n_heads // n_kv_heads)`` (HF's ``repeat_kv``); ``kv_head_of(h, n_heads, n_kv_heads)`` says it.

Example:
    >>> parse_site("L1.z"), str(Site(0, "resid_pre")), parse_site("final")
    (Site(layer=1, kind='z'), 'L0.resid_pre', Site(layer=None, kind='final'))
    >>> kv_head_of(5, n_heads=8, n_kv_heads=2)
    1
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

SiteKind = Literal["resid_pre", "q", "k", "v", "pattern", "z", "attn_out", "mlp_out", "resid_post", "final"]
# Execution order inside a layer.
LAYER_KINDS: tuple[str, ...] = ("resid_pre", "q", "k", "v", "pattern", "z", "attn_out", "mlp_out", "resid_post")
SITE_KINDS: tuple[str, ...] = LAYER_KINDS + ("final",)
HEAD_KINDS = ("q", "z", "pattern")  # indexed by query head
KV_KINDS = ("k", "v")  # indexed by key/value head
RESID_KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post", "final")  # (batch, pos, d_model)

_SITE = re.compile(r"^L(\d+)\.([a-z_]+)$")
VALID_FORMS = ("'L<layer>.<kind>' with kind one of " + ", ".join(LAYER_KINDS) + " (e.g. 'L0.z'), or 'final'")
# a TransformerLens hook name ("blocks.0.attn.hook_z") or one half translated ("L0.hook_z"): named in the
# error, not accepted, so there stays one vocabulary
_TL_SITE = re.compile(r"^(?:blocks\.(\d+)|L(\d+))\.(?:attn\.)?hook_([a-z_]+)$")


def _tl_hint(site) -> str:
    """' (here: 'L0.z')' when ``site`` is a TransformerLens hook name of a site kind, else ''."""
    if not isinstance(site, str):
        return ""
    if site.strip() == "ln_final.hook_normalized":
        return " (TransformerLens' 'ln_final.hook_normalized' is 'final' here)"
    m = _TL_SITE.match(site.strip())
    if m is None or m.group(3) not in LAYER_KINDS:
        return ""
    return f" (TransformerLens' {site.strip()!r} is 'L{m.group(1) or m.group(2)}.{m.group(3)}' here)"


class Site(NamedTuple):
    layer: int | None  # None only for "final"
    kind: str

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"L{self.layer}.{self.kind}"


def parse_site(site: str | Site | tuple, n_layers: int | None = None) -> Site:
    """``"L1.z"`` or ``Site(1, "z")`` or ``(1, "z")`` -> ``Site``; ValueError naming the valid forms."""
    if type(site) is not str:
        return _parse_site(site, n_layers)
    parsed = _PARSED.get((site, n_layers))
    if parsed is None:
        parsed = _parse_site(site, n_layers)
        if len(_PARSED) < 4096:
            _PARSED[site, n_layers] = parsed
    return parsed


_PARSED: dict = {}  # (site string, n_layers) -> Site: runs name the same few sites over and over


def _parse_site(site, n_layers):
    if isinstance(site, tuple) and len(site) == 2:
        layer, kind = site
    elif isinstance(site, str) and site.strip() == "final":
        layer, kind = None, "final"
    else:
        m = _SITE.match(site.strip()) if isinstance(site, str) else None
        if m is None:
            raise ValueError(f"malformed site {site!r}: write sites as {VALID_FORMS}{_tl_hint(site)}")
        layer, kind = int(m.group(1)), m.group(2)
    if kind not in SITE_KINDS or (kind == "final") != (layer is None):
        raise ValueError(f"unknown site {site!r}: write sites as {VALID_FORMS}{_tl_hint(site)}")
    if layer is not None and type(layer) is not int:  # a bool is an int to isinstance: (True, "z") is no layer
        raise ValueError(f"site {site!r}: layer {layer!r} is not an integer: pass an int layer (e.g. int(x) of a "
                         "numpy or torch number)")
    if layer is not None and (layer < 0 or (n_layers is not None and layer >= n_layers)):
        top = "layers are numbered from 0" if n_layers is None else f"this model has layers 0-{n_layers - 1}"
        raise ValueError(f"site {site!r}: layer {layer} out of range: {top}")
    return Site(layer, kind)


def kv_head_of(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The key/value head that query head ``head`` reads under grouped-query attention."""
    return head // (n_heads // n_kv_heads)
