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
from ..engine.adapters import get_adapter, observable
from ..engine.heads import Head, HeadLike, all_heads, check_heads, parse_heads
from .loss import loss_from_logits
from ..engine.tracing import (InterventionError, LayerEdits, _device, _unembed, check_mask, check_tokens, mask_kwargs,
                      pad_to_nan, unwrap, wrap)

SweepKind = Literal["zero", "mean", "pattern"]
SWEEP_KINDS = ("zero", "mean", "pattern")
# Skip the ablated layer's attention where it is safe (see ``_sweep_chunk``); tests turn it off to check
# the general path (edits at the per-head site inside the trace) against the same oracle.
_ATTN_SHORTCUT = True


# tokens per forward pass that the default heads_per_pass aims at, by device (see ablation_sweep)
PASS_TOKENS = {"cpu": 4096, "cuda": 262144}


@torch.no_grad()
def ablation_sweep(model, tokens: torch.Tensor, kind: SweepKind = "zero",
                   heads: HeadLike | Iterable[HeadLike] | None = None, heads_per_pass: int | None = None,
                   reference: torch.Tensor | None = None, batch_size: int | None = None,
                   progress: bool = False, attention_mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss change from ablating each head on its own.

    Args:
        model: HF causal LM of a supported architecture.
        tokens: (batch, pos) token ids.
        kind: "zero", "mean" or "pattern" (see the module docstring).
        heads: heads to sweep, in the order of the result (default: all, layer-major, as ``all_heads``).
        heads_per_pass: heads ablated per forward pass (the pass has heads_per_pass * batch rows).
            Default: as many as keep a pass near ``PASS_TOKENS`` tokens (at least 1); measured in
            benchmarks/bench_sweep.py: on CPU, once a batch holds a few thousand tokens, bigger passes
            only cost (32 x 256 tokens: 1 head per pass 0.51x of plain forwards vs 0.65x for 8); on a
            GPU small passes are launch-bound, so many heads share a pass.
        reference: (n, pos_ref) tokens for kind="mean" (default: ``tokens``); pos_ref >= pos.
        batch_size: split ``tokens`` into chunks of this many rows (same result, less memory).
        progress: show a tqdm bar over forward passes.
        attention_mask: (batch, pos), 1 = real token, for left-padded batches: every real token runs at
            its unpadded position, so results match unpadded runs there; entries whose context or
            target is padding are NaN.

    Returns:
        clean_loss (batch, pos - 1) and delta (n_heads_swept, batch, pos - 1): per-token loss (nats)
        with that head ablated minus the clean loss. Entry t is the loss of predicting token t + 1.
    """
    inner = unwrap(model)
    adapter = get_adapter(inner)
    check_tokens(tokens, adapter)
    check_mask(attention_mask, tokens)
    if kind not in SWEEP_KINDS:
        raise ValueError(f"kind={kind!r} is unknown: use 'zero', 'mean' or 'pattern' (pattern-preserving "
                         "zero ablation)")
    if heads_per_pass is None:
        budget = PASS_TOKENS["cuda" if _device(inner).type == "cuda" else "cpu"]
        heads_per_pass = max(1, budget // (tokens.shape[0] * tokens.shape[1]))
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
    groups = _layer_groups(heads, heads_per_pass)
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
                mask = None if attention_mask is None else attention_mask[start:start + chunk]
                clean, delta = _sweep_chunk(inner, toks, kind, ablation, groups, len(heads), bar, mask)
                clean_parts.append(pad_to_nan(clean, mask))
                delta_parts.append(pad_to_nan(delta, mask))
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(clean_parts), torch.cat(delta_parts, dim=1)


def _layer_groups(heads: Sequence[Head], heads_per_pass: int) -> list[list[tuple[int, Head]]]:
    """(index in ``heads``, head) groups of at most ``heads_per_pass`` heads, each from one layer, so a
    pass can start at its layer: blocks below it are the same as in the clean run."""
    by_layer: dict[int, list[tuple[int, Head]]] = {}
    for i, h in enumerate(heads):
        by_layer.setdefault(h.layer, []).append((i, h))
    return [hs[i:i + heads_per_pass] for layer in sorted(by_layer) for hs in [by_layer[layer]]
            for i in range(0, len(hs), heads_per_pass)]


def _first(output):
    """The tensor a block or attention module passes on: the output, or its first element."""
    return output if torch.is_tensor(output) else output[0]


def _with_first(output, first: torch.Tensor):
    """``first`` in the output structure of a module whose clean output was ``output``: a tensor (HF
    decoder layers in transformers 5), or a tuple whose first element is what the module passes on
    (our ``Block``: (x, pattern); attention modules: (out, pattern or None)). The other elements become
    None: nothing downstream reads a skipped module's pattern."""
    if torch.is_tensor(output):
        return first
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
        return (first,) + (None,) * (len(output) - 1)
    raise InterventionError(f"cannot reuse a module output of type {type(output).__name__}: skipped modules "
                            "must return a tensor or a tuple starting with one")


def _sweep_pass(model, adapter, tokens, kind, edits: dict[int, LayerEdits], start: int = 0, prefix=None,
                attn_out=None, save_layers: Sequence[int] = (), save_patterns: bool = False, mask=None):
    """One forward of ``tokens`` with head edits, starting at layer ``start``.

    Blocks below ``start`` are skipped (``envoy.skip``) and replaced by ``prefix``, the clean output of
    block ``start - 1`` repeated along the batch (only the last skipped block's output is read
    downstream, so one replacement serves them all). With ``attn_out`` the attention module of layer
    ``start`` is skipped too and replaced by it (the head edits were then applied by the caller).

    Returns logits (batch, pos, vocab); for each layer in ``save_layers`` a dict with the clean outputs
    of its block, attention module and output projection and the per-head site (the projection's input);
    and, if asked, the patterns (list per layer)."""
    lm = wrap(model, lean=True)
    patterns, saved, checks = [], {}, []
    tokens = tokens.to(_device(model))
    with lm.trace(tokens, **mask_kwargs(mask, tokens)):
        for layer in range(adapter.n_layers):
            block = adapter.module(lm, layer, "layer")
            if layer < start:
                block.skip(prefix)
                continue
            if layer == start and attn_out is not None:
                adapter.module(lm, layer, "attn").skip(attn_out)
            else:
                edit = edits.get(layer)
                if kind == "pattern":
                    site = adapter.module(lm, layer, "pattern")
                    if edit is not None and edit.pattern is not None:
                        site.output = edit.pattern
                    if save_patterns:
                        patterns.append(site.output.save())
                if edit is not None and edit.heads:
                    z = adapter.module(lm, layer, "o_proj").input  # (batch, pos, head*d_head)
                    for head, value in edit.heads.items():
                        sl, rows = adapter.head_slice(head), edit.rows.get(head, slice(None))
                        z[rows, :, sl] = 0 if value is None else value
                        checks.append((layer, head, value, z[rows, :, sl].clone().save()))
                if layer in save_layers:
                    o_proj = adapter.module(lm, layer, "o_proj")
                    saved[layer] = {"z": o_proj.input.save(), "o_proj": o_proj.output.save(),
                                    "attn": adapter.module(lm, layer, "attn").output.save()}
            if layer in save_layers or layer + 1 in save_layers:
                saved.setdefault(layer, {})["block"] = block.output.save()
        logits = _unembed(lm, adapter).output.save()
    for layer, head, value, seen in checks:
        expected = torch.zeros_like(seen) if value is None else value.to(seen.dtype).expand_as(seen)
        if not torch.equal(seen, expected):
            raise InterventionError(f"the edit of L{layer}H{head} did not take effect (the model's forward "
                                    "does not use the per-head site as expected); check the adapter")
    return logits, saved, patterns


def _sweep_chunk(model, tokens, kind, ablation, groups: Sequence[Sequence[tuple[int, Head]]], n_swept: int, bar,
                 mask=None):
    """(batch, pos - 1) clean loss and (n_heads, batch, pos - 1) deltas for one chunk of tokens.

    One clean pass records the logits (clean loss), the patterns (kind "pattern"), and for each
    group's layer l the output of block l - 1 and the clean attention of layer l. A group's pass then
    starts at layer l: blocks below are skipped (their output is the clean one, repeated), and so is
    layer l's attention: in every kind the heads of layer l not ablated compute exactly what they did
    on the clean run (same input, and in kind "pattern" the same pattern), so its output is the output
    projection applied to the clean per-head site with the ablated heads' slices replaced. That
    shortcut is used only where the clean run showed the attention module's output *is* its output
    projection's output (true of every supported architecture in eval mode)."""
    adapter = get_adapter(model)
    b = tokens.shape[0]
    layers = sorted({h.layer for g in groups for _, h in g})
    logits, saved, patterns = _sweep_pass(model, adapter, tokens, kind, {}, save_layers=layers,
                                          save_patterns=kind == "pattern", mask=mask)
    clean = loss_from_logits(logits, tokens).cpu()  # (batch, pos - 1)
    del logits
    o_projs = {layer: adapter.module(model, layer, "o_proj") for layer in layers}
    shortcut = {layer: _ATTN_SHORTCUT and torch.equal(_first(saved[layer]["attn"]), saved[layer]["o_proj"]) for layer in layers}
    delta = torch.empty(n_swept, *clean.shape, dtype=clean.dtype)
    for group in groups:
        k, layer = len(group), group[0][1].layer
        rows = [slice(j * b, (j + 1) * b) for j in range(k)]
        values = [ablation.value(h, tokens) for _, h in group]  # None (zero) or (batch, pos, d_head) each
        edits, attn_out = {}, None
        if shortcut[layer]:  # apply the edits to the clean per-head site here; skip the attention
            z = saved[layer]["z"].repeat(k, 1, 1)  # (k * batch, pos, head*d_head)
            for r, (_, h), value in zip(rows, group, values):
                z[r, :, adapter.head_slice(h.head)] = 0 if value is None else value
            attn_out = _with_first(saved[layer]["attn"], o_projs[layer](z))
        else:
            edits[layer] = LayerEdits(heads={h.head: v for (_, h), v in zip(group, values)},
                                      rows={h.head: r for (_, h), r in zip(group, rows)})
        if kind == "pattern":  # freeze every pattern at or above the layer, in every block of rows
            for above in range(layer, adapter.n_layers):
                edits.setdefault(above, LayerEdits()).pattern = patterns[above].repeat(k, 1, 1, 1)
        prefix = _with_first(saved[layer - 1]["block"], _first(saved[layer - 1]["block"]).repeat(k, 1, 1)) \
            if layer > 0 else None
        rep = tokens.repeat(k, 1)  # (k * batch, pos)
        out, _, _ = _sweep_pass(model, adapter, rep, kind, edits, start=layer, prefix=prefix, attn_out=attn_out,
                                mask=None if mask is None else mask.repeat(k, 1))
        loss = loss_from_logits(out, rep).cpu().view(k, b, -1)  # (k, batch, pos - 1)
        for j, (i, _) in enumerate(group):
            delta[i] = loss[j] - clean
        if bar is not None:
            bar.update(1)
    return clean, delta


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
