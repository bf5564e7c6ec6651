"""Ablate every head (or a chosen set) one at a time and record the per-token loss change.

``ablation_sweep`` measures several heads per forward pass: the tokens are repeated k times along
the batch and head j is ablated only in rows [j * batch, (j + 1) * batch) (``LayerEdits.rows``), so
a sweep over all heads costs about n_heads_swept / k passes of k * batch rows instead of
n_heads_swept Python-level passes. Each block of rows holds one ablation, so the result equals
ablating each head on its own (the tests check it against ``per_token_loss`` head by head).

Kinds:
  * ``"zero"``: the head's output set to 0 (``ZeroAblation``).
  * ``"mean"``: replaced by its per-position mean over ``reference`` (``MeanAblation``; the tokens
    themselves when no reference is given).
  * ``"pattern"``: zero-ablation with every attention pattern frozen to the clean run's
    (``PatternPreserving(ZeroAblation)``), the paper's main ablation. Clean and ablated runs both use
    the eager attention path, so a head with no effect gives a delta of exactly 0.

Example:
    >>> import torch
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=20)).eval()
    >>> tokens = torch.randint(0, 20, (3, 8))
    >>> clean, delta = ablation_sweep(model, tokens, kind="zero")
    >>> clean.shape, delta.shape
    (torch.Size([3, 7]), torch.Size([4, 3, 7]))
    >>> sweep_table(delta, all_heads(2, 2)).columns.tolist()
    ['layer', 'head', 'name', 'token_index', 'delta_loss', 'sem', 'n']
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from .ablation import MeanAblation, ZeroAblation
from .adapters import get_adapter, observable
from .heads import Head, HeadLike, all_heads, check_heads, parse_heads
from .loss import loss_from_logits
from .tracing import LayerEdits, check_tokens, run_edited, unwrap

SweepKind = Literal["zero", "mean", "pattern"]
SWEEP_KINDS = ("zero", "mean", "pattern")


@torch.no_grad()
def ablation_sweep(model, tokens: torch.Tensor, kind: SweepKind = "zero",
                   heads: HeadLike | Iterable[HeadLike] | None = None, heads_per_pass: int = 8,
                   reference: torch.Tensor | None = None, batch_size: int | None = None,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss change from ablating each head on its own.

    Args:
        model: HF causal LM of a supported architecture.
        tokens: (batch, pos) token ids.
        kind: "zero", "mean" or "pattern" (see the module docstring).
        heads: heads to sweep, in the order of the result (default: all, layer-major, as ``all_heads``).
        heads_per_pass: heads ablated per forward pass (the pass has heads_per_pass * batch rows).
        reference: (n, pos_ref) tokens for kind="mean" (default: ``tokens``); pos_ref >= pos.
        batch_size: split ``tokens`` into chunks of this many rows (same result, less memory).
        progress: show a tqdm bar over forward passes.

    Returns:
        clean_loss (batch, pos - 1) and delta (n_heads_swept, batch, pos - 1): per-token loss (nats)
        with that head ablated minus the clean loss. Entry t is the loss of predicting token t + 1.
    """
    inner = unwrap(model)
    adapter = get_adapter(inner)
    check_tokens(tokens, adapter)
    if kind not in SWEEP_KINDS:
        raise ValueError(f"kind={kind!r} is unknown: use 'zero', 'mean' or 'pattern' (pattern-preserving "
                         "zero ablation)")
    if not isinstance(heads_per_pass, int) or isinstance(heads_per_pass, bool) or heads_per_pass < 1:
        raise ValueError(f"heads_per_pass={heads_per_pass!r} must be a positive integer")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be None or a positive integer")
    if reference is not None and kind != "mean":
        raise ValueError(f"reference is only used by kind='mean', not kind={kind!r}: drop it or use kind='mean'")
    heads = all_heads(adapter.n_layers, adapter.n_heads) if heads is None else parse_heads(heads)
    check_heads(heads, adapter.n_layers, adapter.n_heads)
    if len(set(heads)) != len(heads):
        dup = sorted({str(h) for h in heads if heads.count(h) > 1})
        raise ValueError(f"heads listed more than once: {', '.join(dup)}; pass each head once")

    if kind == "mean":
        ablation = MeanAblation(heads, tokens if reference is None else reference)
    else:
        ablation = ZeroAblation(heads)
    ablation.prepare(inner, tokens)  # validates; computes reference means once for all chunks

    b_total, pos = tokens.shape
    chunk = b_total if batch_size is None else batch_size
    groups = [heads[i:i + heads_per_pass] for i in range(0, len(heads), heads_per_pass)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups) * -(-b_total // chunk), desc=f"{kind} ablation sweep", unit="pass")
    clean_parts, delta_parts = [], []
    # Pattern kind: eager attention with observable pattern sites, entered once for all chunks.
    ctx = observable(inner) if kind == "pattern" else contextlib.nullcontext()
    try:
        with ctx:
            for start in range(0, b_total, chunk):
                toks = tokens[start:start + chunk]
                clean, delta = _sweep_chunk(inner, toks, kind, ablation, groups, bar)
                clean_parts.append(clean)
                delta_parts.append(delta)
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(clean_parts), torch.cat(delta_parts, dim=1)


def _sweep_chunk(model, tokens, kind, ablation, groups: Sequence[Sequence[Head]], bar):
    """(batch, pos - 1) clean loss and (n_heads, batch, pos - 1) deltas for one chunk of tokens."""
    b = tokens.shape[0]
    if kind == "pattern":
        logits, patterns = run_edited(model, tokens, {}, save_patterns=True)  # (batch, head, q, k) each
    else:
        logits, patterns = run_edited(model, tokens, {}), None
    clean = loss_from_logits(logits, tokens).cpu()  # (batch, pos - 1)
    deltas = []
    for group in groups:
        k = len(group)
        edits: dict[int, LayerEdits] = {}
        for j, h in enumerate(group):
            e = edits.setdefault(h.layer, LayerEdits())
            e.heads[h.head] = ablation.value(h, tokens)  # None (zero) or (batch, pos, d_head)
            e.rows[h.head] = slice(j * b, (j + 1) * b)
        if patterns is not None:  # freeze every pattern, in every block of rows, to the clean one
            for layer, p in enumerate(patterns):
                edits.setdefault(layer, LayerEdits()).pattern = p.repeat(k, 1, 1, 1)
        rep = tokens.repeat(k, 1)  # (k * batch, pos)
        loss = loss_from_logits(run_edited(model, rep, edits), rep).cpu()  # (k * batch, pos - 1)
        deltas.append(loss.view(k, b, -1) - clean)
        if bar is not None:
            bar.update(1)
    return clean, torch.cat(deltas)


def sweep_table(delta: torch.Tensor, heads: HeadLike | Iterable[HeadLike]):
    """Tidy table of a sweep: one row per layer x head x token_index.

    Args:
        delta: (n_heads_swept, batch, pos - 1) from ``ablation_sweep``.
        heads: the swept heads in the same order (``all_heads(n_layers, n_heads)`` when the sweep
            used the default).

    Returns:
        DataFrame with columns ``layer``, ``head``, ``name`` ("L1H3"), ``token_index`` (position of
        the predicted token, 1 .. pos - 1, as ``loss_by_position``), ``delta_loss`` (mean over
        sequences, nats), ``sem`` (standard error over sequences; NaN for one sequence) and ``n``.
    """
    import pandas as pd

    heads = parse_heads(heads)
    if not torch.is_tensor(delta) or delta.dim() != 3:
        raise ValueError("delta must be the (n_heads_swept, batch, pos - 1) tensor from ablation_sweep")
    if delta.shape[0] != len(heads):
        raise ValueError(f"delta has {delta.shape[0]} heads but {len(heads)} heads were named: pass the heads "
                         "in the order of the sweep")
    n_h, n, t = delta.shape
    d = delta.detach().float().cpu()
    mean = d.mean(1)  # (head, pos - 1)
    sem = d.std(1, unbiased=True) / n ** 0.5 if n > 1 else torch.full_like(mean, float("nan"))
    idx = torch.arange(1, t + 1)
    return pd.DataFrame({
        "layer": [h.layer for h in heads for _ in range(t)],
        "head": [h.head for h in heads for _ in range(t)],
        "name": [str(h) for h in heads for _ in range(t)],
        "token_index": idx.repeat(n_h).numpy(),
        "delta_loss": mean.reshape(-1).numpy(),
        "sem": sem.reshape(-1).numpy(),
        "n": n,
    })
