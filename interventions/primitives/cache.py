"""Caching chosen activations by site name: logits and activations from one forward pass.

Site names and shapes are the one vocabulary of ``interventions.engine.sites`` (``"L0.z"``,
``"L1.resid_pre"``, ``"L0.k"``, ``"L1.pattern"``, ``"final"``, ...). Only the sites asked for are
kept (caching everything is a frequent memory complaint about other toolkits).

Example:
    >>> import torch
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, vocab_size=20)).eval()
    >>> cache = cache_activations(model, torch.randint(0, 20, (2, 6)), ["L0.z", "L1.resid_pre"])
    >>> cache["L0.z"].shape, cache["L1.resid_pre"].shape
    (torch.Size([2, 6, 4, 8]), torch.Size([2, 6, 32]))
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..engine.remote import Remote
from ..engine.sites import VALID_FORMS, Site, parse_site
from ..engine.tracing import Run, execute


@torch.no_grad()
def run_with_cache(model, tokens: torch.Tensor, sites, attention_mask: torch.Tensor | None = None,
                   remote: Remote = False):
    """Logits and the activations of ``sites`` from one forward pass: ``(logits, {site: tensor})``.

    Sites are names such as ``"L0.z"``, ``"L1.resid_pre"``, ``"L0.k"``, ``"final"`` (shapes in
    ``interventions.engine.sites``); only the sites asked for are kept. ``remote``: True runs on NDIF
    (``model`` an ``nnsight.LanguageModel`` made from a hub id), ``"local"`` nnsight's offline
    simulation of that (``interventions.engine.remote``); pattern sites cannot run remotely.

    Example:
        >>> import torch
        >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
        >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, vocab_size=20)).eval()
        >>> logits, cache = run_with_cache(model, torch.randint(0, 20, (2, 6)), ["L0.z", "L1.resid_post"])
        >>> logits.shape, cache["L0.z"].shape, cache["L1.resid_post"].shape
        (torch.Size([2, 6, 20]), torch.Size([2, 6, 4, 8]), torch.Size([2, 6, 32]))
    """
    return _cache(model, tokens, sites, attention_mask, remote, "logits")


def _cache(model, tokens, sites, attention_mask, remote, returns):
    if isinstance(sites, (str, Site)):
        sites = [sites]
    elif not isinstance(sites, Iterable):
        raise ValueError(f"sites must be a site name or a list of them, got {type(sites).__name__}: pass names such "
                         f"as {VALID_FORMS}")
    sites = list(sites)
    if not sites:
        raise ValueError(f"no sites given: pass names such as {VALID_FORMS}")
    out = execute(model, Run(tokens, reads=sites, attention_mask=attention_mask, returns=returns), remote)
    return out.logits, {(s.strip() if isinstance(s, str) else str(parse_site(s))): out.acts[str(parse_site(s))]
                        for s in sites}


@torch.no_grad()
def cache_activations(model, tokens: torch.Tensor, sites, attention_mask: torch.Tensor | None = None,
                      remote: Remote = False) -> dict[str, torch.Tensor]:
    """``run_with_cache`` without the logits (they are not kept, nor sent back from a server): {site:
    tensor} for the sites asked.

    ``"L0.pattern"`` needs ``with interventions.observable(model):`` (SDPA computes no pattern)."""
    return _cache(model, tokens, sites, attention_mask, remote, "none")[1]
