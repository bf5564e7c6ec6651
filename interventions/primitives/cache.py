"""Caching chosen activations by name, and the trace that reads and writes them.

Site names are ``"L<layer>.<kind>"``; only the sites asked for are saved (caching everything is a
frequent memory complaint about other toolkits). Kinds and shapes:

  * ``head_out``  (batch, pos, head, d_head): per-head outputs, the input of the attention output
    projection reshaped per head (TransformerLens' ``hook_z``).
  * ``resid_pre`` (batch, pos, d_model): the residual stream entering the layer (the decoder block's
    first input).
  * ``pattern``   (batch, head, q_pos, k_pos): attention pattern; only inside
    ``with interventions.observable(model):`` (SDPA computes no pattern).
  * ``keys``      (batch, pos, kv_head, d_head): keys as the key projection writes them, i.e. before
    rotary embeddings or key smearing. For fused q/k/v projections (GPT-2, GPT-NeoX) the key part is
    sliced out of the fused output.

``_run_sites`` is the private driver shared with ``interventions.primitives.patching``: one trace that visits
layers, and the sites inside a layer, in execution order (nnsight requires it), writes values in
place at given indices, saves what is asked, and checks afterwards that every write took effect.

Example:
    >>> import torch
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, vocab_size=20)).eval()
    >>> cache = cache_activations(model, torch.randint(0, 20, (2, 6)), ["L0.head_out", "L1.resid_pre"])
    >>> cache["L0.head_out"].shape, cache["L1.resid_pre"].shape
    (torch.Size([2, 6, 4, 8]), torch.Size([2, 6, 32]))
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

import torch

from ..engine.adapters import Adapter, get_adapter, has_pattern_site
from ..engine.tracing import InterventionError, _unembed, check_tokens, translate_trace_error, unwrap, wrap

SiteKind = Literal["resid_pre", "keys", "pattern", "head_out"]
# Execution order of the kinds inside one layer: block input, key projection, pattern, o_proj input.
SITE_KINDS: tuple[str, ...] = ("resid_pre", "keys", "pattern", "head_out")
_SITE = re.compile(r"^L(\d+)\.([a-z_]+)$")
_VALID_FORMS = "'L<layer>.<kind>' with kind one of " + ", ".join(SITE_KINDS) + " (e.g. 'L0.head_out')"

# One in-place write: (index into the site tensor, including the batch index first; value).
Write = tuple[tuple, torch.Tensor]


def parse_site(site: str, adapter: Adapter) -> tuple[int, str]:
    """``"L1.head_out"`` -> (1, "head_out"); ValueError naming the valid forms otherwise."""
    m = _SITE.match(site.strip()) if isinstance(site, str) else None
    if m is None or m.group(2) not in SITE_KINDS:
        raise ValueError(f"malformed site {site!r}: write sites as {_VALID_FORMS}")
    layer = int(m.group(1))
    if layer >= adapter.n_layers:
        raise ValueError(f"site {site!r}: layer {layer} out of range: this model has layers 0-{adapter.n_layers - 1}")
    return layer, m.group(2)


def _raw(lm, adapter: Adapter, layer: int, kind: str):
    """The raw tensor (inside a trace) of a site: in-place writes on it change the forward."""
    if kind == "resid_pre":
        return adapter.module(lm, layer, "layer").input  # (batch, pos, d_model)
    if kind == "keys":
        return adapter.module(lm, layer, "k_proj").output  # (batch, pos, kv_head*d_head) or fused
    if kind == "pattern":
        return adapter.module(lm, layer, "pattern").output  # (batch, head, q_pos, k_pos)
    return adapter.module(lm, layer, "o_proj").input  # (batch, pos, head*d_head)


def _shape(x: torch.Tensor, adapter: Adapter, kind: str) -> torch.Tensor:
    """A saved raw site tensor in the documented shape."""
    b, p = x.shape[0], x.shape[1]
    if kind == "head_out":
        return x.reshape(b, p, adapter.n_heads, adapter.d_head)  # (batch, pos, head, d_head)
    if kind == "keys":
        fused, d_kv = adapter.spec.fused_qkv, adapter.n_kv_heads * adapter.d_head
        if fused == "gpt2":  # c_attn output: [q | k | v] along the last dim
            x = x[..., d_kv: 2 * d_kv]
        elif fused == "neox":  # per head [q_h | k_h | v_h]
            x = x.reshape(b, p, adapter.n_heads, 3 * adapter.d_head)[..., adapter.d_head: 2 * adapter.d_head]
        return x.reshape(b, p, adapter.n_kv_heads, adapter.d_head)  # (batch, pos, kv_head, d_head)
    return x


@torch.no_grad()
def _run_sites(model, tokens: torch.Tensor, reads: Iterable[tuple[int, str]] = (),
               writes: dict[tuple[int, str], list[Write]] | None = None):
    """One trace of ``model`` on ``tokens``: write ``writes[(layer, kind)]`` in place (in the raw site
    layout: head_out is (batch, pos, head*d_head)), then save ``reads`` (after that layer's writes).
    Returns (logits (batch, pos, vocab), {(layer, kind): raw tensor})."""
    inner = unwrap(model)
    adapter = get_adapter(inner)
    check_tokens(tokens, adapter)
    writes = writes or {}
    reads = set(reads)
    wanted = reads | set(writes)
    if any(kind == "pattern" for _, kind in wanted) and not has_pattern_site(inner):
        raise InterventionError("attention patterns are not observable on this model's attention path "
                                "(SDPA/flash computes no pattern): run inside `with interventions.observable(model):`")
    lm = wrap(inner, lean=True)
    tokens = tokens.to(next(inner.parameters()).device)
    saved, checks = {}, []
    try:
        with lm.trace(tokens, use_cache=False):
            for layer in range(adapter.n_layers):
                for kind in SITE_KINDS:
                    if (layer, kind) not in wanted:
                        continue
                    x = _raw(lm, adapter, layer, kind)
                    for index, value in writes.get((layer, kind), ()):
                        x[index] = value
                        checks.append((layer, kind, value, x[index].clone().save()))
                    if (layer, kind) in reads:
                        saved[(layer, kind)] = x.clone().save()
            logits = _unembed(lm, adapter).output.save()
    except InterventionError:
        raise
    except Exception as e:
        raise translate_trace_error(e) from None
    for layer, kind, value, seen in checks:
        if not torch.equal(seen, value.to(seen.dtype).expand_as(seen)):
            raise InterventionError(f"the write to L{layer}.{kind} did not take effect (the model's forward "
                                    "does not use that site as expected); check the adapter")
    return logits, saved


@torch.no_grad()
def cache_activations(model, tokens: torch.Tensor, sites: str | Iterable[str]) -> dict[str, torch.Tensor]:
    """Run ``model`` once on ``tokens`` (batch, pos) and return {site: tensor} for the sites asked.

    Args:
        model: an HF causal LM of a supported architecture (or its nnsight wrapper).
        tokens: (batch, pos) token ids.
        sites: names like ``"L0.head_out"``, ``"L1.resid_pre"``, ``"L0.pattern"``, ``"L0.keys"``
            (see the module docstring for shapes). ``"L0.pattern"`` needs ``observable(model)``.

    Example:
        >>> with observable(model):  # doctest: +SKIP
        ...     pattern = cache_activations(model, tokens, ["L1.pattern"])["L1.pattern"]
    """
    inner = unwrap(model)
    adapter = get_adapter(inner)
    if isinstance(sites, str):
        sites = [sites]
    sites = list(sites)
    if not sites:
        raise ValueError(f"no sites given: pass names such as {_VALID_FORMS}")
    parsed = {site: parse_site(site, adapter) for site in sites}
    if any(kind == "pattern" for _, kind in parsed.values()) and not has_pattern_site(inner):
        raise InterventionError("attention patterns are not observable on this model's attention path "
                                "(SDPA/flash computes no pattern): cache 'L<n>.pattern' inside "
                                "`with interventions.observable(model):`")
    _, saved = _run_sites(inner, tokens, reads=parsed.values())
    return {site: _shape(saved[key], adapter, key[1]) for site, key in parsed.items()}
