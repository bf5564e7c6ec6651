"""Ablate every head (or a chosen set) one at a time and record the per-token loss change.

``ablation_sweep`` measures several heads per forward pass: the tokens are repeated k times along
the batch and head j is ablated only in rows [j * batch, (j + 1) * batch), so a sweep over all heads
costs about n_heads_swept / k passes of k * batch rows instead of n_heads_swept Python-level passes.
Each block of rows holds one ablation, so the result equals ablating each head on its own (the tests
check it against ``per_token_loss`` head by head). Every pass starts at its heads' layer: blocks below
are the clean run's (their output is reused), and where the architecture allows it, so is the
ablated layer's attention (its output is the output projection of the edited clean ``z``).

What to sweep (``kind``):
  * ``"zero"``: ``ZeroAblation``; ``"mean"``: ``MeanAblation`` over ``reference`` (the tokens
    themselves when no reference is given); ``"resample"``: ``ResampleAblation`` over ``reference``;
    ``"pattern"``: ``PatternPreserving(ZeroAblation)``, the paper's main ablation.
  * any ``Ablation`` object covering the swept heads (heads default to its heads), e.g.
    ``PatternPreserving(MeanAblation(heads, reference))`` or your own subclass;
  * or a factory ``heads -> Ablation`` (called once with all swept heads).
  A ``PatternPreserving`` ablation freezes every pattern at the clean run's in both runs, so a head
  with no effect gives a delta of exactly 0. Its clean and ablated runs both take ``observable``'s eager
  attention path, so its clean loss is the eager run's: in bfloat16 / float16 it differs from another
  kind's (the model's SDPA path) by rounding, while its deltas never mix the two paths.

Remotely (``remote=True`` on NDIF, ``"local"`` for nnsight's offline simulation; see
``interventions.engine.remote``) zero, mean and resample sweeps run, one job per pass plus one clean run
per chunk (and one per mean or resample reference); every pass runs from layer 0 on the server (sending
the clean residual for k blocks of rows would cost more than recomputing the layers below), and only
per-token losses come back. ``"pattern"``, ``PatternPreserving`` / ``FunctionAblation`` objects and an
``Ablation`` whose ``value`` is a function of the activation are refused before anything is sent.

Example:
    >>> import torch
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM, MeanAblation, PatternPreserving
    >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=20)).eval()
    >>> tokens = torch.randint(0, 20, (3, 8))
    >>> clean, delta = ablation_sweep(model, tokens, kind="zero")
    >>> clean.shape, delta.shape
    (torch.Size([3, 7]), torch.Size([4, 3, 7]))
    >>> _, delta = ablation_sweep(model, tokens, kind=lambda heads: PatternPreserving(MeanAblation(heads, tokens)))
    >>> sweep_table(delta, all_heads(2, 2)).columns.tolist()
    ['layer', 'head', 'name', 'token_index', 'delta_loss', 'sem', 'n']
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch

from ..engine.adapters import observable
from ..engine.heads import Head, HeadLike, all_heads, check_heads, parse_heads
from ..engine.sites import Site
from .progress import check_progress, passes
from ..engine.remote import Remote
from ..engine.tracing import (Engine, InterventionError, Run, Write, check_mask, check_positive, check_tokens,
                              check_value, pad_to_nan, position_ids,
                              rounding_tolerance)
from .ablation import (Ablation, MeanAblation, PatternPreserving, ResampleAblation, ZeroAblation, ablation_value,
                       prepare_ablations)
from .loss import check_aligned

SweepKind = Literal["zero", "mean", "resample", "pattern"]
SWEEP_KINDS = ("zero", "mean", "resample", "pattern")
# Skip the ablated layer's attention where it is safe (see ``_sweep_chunk``); tests turn it off to check
# the general path (edits at the per-head site inside the trace) against the same oracle.
_ATTN_SHORTCUT = True
# model -> {(adapter spec id, layer)} whose attention output was seen to equal its output projection's
_SHORTCUT_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# tokens per forward pass that the default heads_per_pass aims at, by device (see ablation_sweep);
# remote: a pass is one job on a shared server, whose memory must hold its tokens x vocab float32
# log-probabilities (4 GiB at 8,192 tokens and a 128k vocabulary)
PASS_TOKENS = {"cpu": 4096, "cuda": 262144, "remote": 8192}
# devices on which a sweep that fits in one pass of PASS_TOKENS (clean rows + one block per head, no
# prefix sharing) runs as that one pass: launch-bound GPUs; on a CPU prefix sharing saves compute
ONE_PASS_DEVICES = ("cuda",)
# ... and at most this many bytes of logits per pass (a 128k vocabulary in bf16: 16k tokens)
LOGITS_BYTES = 2 ** 32


def _make_ablation(kind, heads: tuple[Head, ...], tokens, reference) -> Ablation:
    if isinstance(kind, Ablation):
        missing = [str(h) for h in heads if h not in kind.heads]
        if missing:
            raise ValueError(f"the ablation {kind!r} does not cover the swept heads {', '.join(missing)}: "
                             "sweep its heads (heads=None) or pass a factory heads -> Ablation")
        if reference is not None:
            raise ValueError("reference is only used by kind='mean' or 'resample': give it to your ablation")
        return kind
    if callable(kind) and not isinstance(kind, str):
        if reference is not None:
            raise ValueError("reference is only used by kind='mean' or 'resample': give it to your factory")
        abl = kind(heads)
        if not isinstance(abl, Ablation):
            raise ValueError(f"the ablation factory returned {type(abl).__name__}, not an Ablation: it must map "
                             "heads to e.g. PatternPreserving(MeanAblation(heads, reference))")
        return _make_ablation(abl, heads, tokens, None)
    if kind not in SWEEP_KINDS:
        raise ValueError(f"kind={kind!r} is unknown: use 'zero', 'mean', 'resample', 'pattern' (pattern-preserving "
                         "zero ablation), an Ablation, or a factory heads -> Ablation")
    if reference is not None and kind not in ("mean", "resample"):
        raise ValueError(f"reference is only used by kind='mean' or 'resample', not kind={kind!r}: drop it")
    ref = tokens if reference is None else reference
    return {"zero": lambda: ZeroAblation(heads), "mean": lambda: MeanAblation(heads, ref),
            "resample": lambda: ResampleAblation(heads, ref),
            "pattern": lambda: PatternPreserving(ZeroAblation(heads))}[kind]()


@torch.no_grad()
def ablation_sweep(model, tokens: torch.Tensor, kind: SweepKind | Ablation | Callable = "zero",
                   heads: HeadLike | Iterable[HeadLike] | None = None, heads_per_pass: int | None = None,
                   reference: torch.Tensor | None = None, batch_size: int | None = None,
                   progress: bool | None = None, attention_mask: torch.Tensor | None = None,
                   remote: Remote = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss change from ablating each head on its own.

    Args:
        model: HF causal LM of a supported architecture.
        tokens: (batch, pos) token ids.
        kind: a shortcut string, an ``Ablation`` or a factory heads -> ``Ablation`` (module docstring).
        heads: heads to sweep, in the order of the result (default: the ablation's heads, else all,
            layer-major, as ``all_heads``).
        heads_per_pass: heads ablated per forward pass (the pass has heads_per_pass * batch rows).
            Default: as many as keep a pass near ``PASS_TOKENS`` tokens and its logits within
            ``LOGITS_BYTES`` (at least 1); measured in
            benchmarks/bench_sweep.py: on CPU, once a batch holds a few thousand tokens, bigger passes
            only cost; on a GPU small passes are launch-bound, so many heads share a pass.
        reference: (n, pos_ref) unpadded tokens for kind="mean"/"resample" (default: ``tokens``, refused
            when ``attention_mask`` has padding); pos_ref >= pos.
        batch_size: split ``tokens`` into chunks of this many rows (same result, less memory). Default:
            as many rows as ``PASS_TOKENS`` tokens hold (at least 1), for the same reason: on a 2-core
            CPU a GPT-2-architecture forward (d_model 128) over 8,192 tokens took 1.2x the time of two
            over 4,096 (its MLP activations then fit the caches).
        progress: a tqdm bar over forward passes: None (default) once the sweep has lasted a few
            seconds, True always, False never (``interventions.primitives.progress``).
        attention_mask: (batch, pos), 1 = real token, for left-padded batches: every real token runs at
            its unpadded position, so results match unpadded runs there; entries whose context or
            target is padding are NaN.
        remote: True runs on NDIF (``model`` an ``nnsight.LanguageModel`` made from a hub id), "local"
            nnsight's offline simulation of that (module docstring).

    Returns:
        clean_loss (batch, pos - 1) and delta (n_heads_swept, batch, pos - 1): per-token loss (nats)
        with that head ablated minus the clean loss. Entry t is the loss of predicting token t + 1.
    """
    check_progress(progress)
    engine = Engine(model, remote)
    adapter = engine.adapter
    check_tokens(tokens, adapter)
    check_mask(attention_mask, tokens)
    if isinstance(kind, str) and kind not in SWEEP_KINDS:
        _make_ablation(kind, (), tokens, reference)  # raises naming the choices
    if (kind in ("mean", "resample") and reference is None and attention_mask is not None
            and not bool(attention_mask.all())):  # the default reference is the tokens, run unpadded
        raise ValueError(f"kind={kind!r} without a reference uses the tokens themselves as the reference, which "
                         "is run as unpadded sequences, but these tokens are padded (attention_mask has zeros): "
                         "pass reference= unpadded sequences at least as long as the tokens")
    auto = heads_per_pass is None
    heads_per_pass = check_positive(heads_per_pass, "heads_per_pass", allow_none=True)
    batch_size = check_positive(batch_size, "batch_size", allow_none=True)
    budget = PASS_TOKENS["remote" if engine.remote else "cuda" if engine.device().type == "cuda" else "cpu"]
    budget = min(budget, LOGITS_BYTES // (adapter.vocab_size * engine.dtype_size()))  # a pass's logits
    if batch_size is None:  # rows per chunk: a pass of one head holds at most the budget's tokens
        batch_size = max(1, budget // tokens.shape[1])
    if heads_per_pass is None:
        heads_per_pass = max(1, budget // (min(batch_size, tokens.shape[0]) * tokens.shape[1]))
    if heads is None:
        heads = kind.heads if isinstance(kind, Ablation) else all_heads(adapter.n_layers, adapter.n_heads)
    heads = parse_heads(heads)
    check_heads(heads, adapter.n_layers, adapter.n_heads)
    if len(set(heads)) != len(heads):
        dup = sorted({str(h) for h in heads if heads.count(h) > 1})
        raise ValueError(f"heads listed more than once: {', '.join(dup)}; pass each head once")
    ablation = _make_ablation(kind, heads, tokens, reference)
    b_total = tokens.shape[0]
    chunk = min(batch_size, b_total)
    # validates; reference activations once for all chunks
    prepare_ablations([ablation], model, tokens, engine.remote, attention_mask, rows=chunk)
    frozen = isinstance(ablation, PatternPreserving)

    groups = _layer_groups(heads, heads_per_pass)
    # launch-bound sizes (a small model on a GPU): the clean run and every ablation in one pass
    one_pass = (auto and not frozen and not engine.remote and engine.device().type in ONE_PASS_DEVICES
                and (len(heads) + 1) * chunk * tokens.shape[1] <= budget)
    if one_pass:
        groups = [[(i, h) for i, h in enumerate(heads)]]
    bar = passes(len(groups) * -(-b_total // chunk), "ablation sweep", progress)
    clean_parts, delta_parts = [], []
    ctx = observable(engine.inner) if frozen else contextlib.nullcontext()  # entered once for all chunks
    try:
        with ctx:
            for start in range(0, b_total, chunk):
                toks = tokens[start:start + chunk]
                mask = None if attention_mask is None else attention_mask[start:start + chunk]
                if one_pass:
                    clean, delta = _sweep_one_pass(engine, toks, ablation, heads, mask, start)
                    if bar is not None:
                        bar.update(1)
                else:
                    clean, delta = _sweep_chunk(engine, toks, ablation, frozen, groups, len(heads), bar, mask, start)
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


def _sweep_one_pass(engine: Engine, tokens, ablation: Ablation, heads: Sequence[Head], mask, row_offset: int):
    """(batch, pos - 1) clean loss and (n_heads, batch, pos - 1) deltas from one pass of (n_heads + 1) *
    batch rows: rows [0, batch) run clean, rows [(j + 1) * batch, (j + 2) * batch) with head j ablated
    (at its ``z``). No prefix sharing: on a launch-bound device one larger pass costs less than several."""
    b, k = tokens.shape[0], len(heads)
    positions = None if mask is None else position_ids(mask, tokens)
    d_head = engine.adapter.d_head
    writes = [Write(Site(h.layer, "z"), ablation_value(ablation, h, tokens, row_offset, positions, d_head=d_head),
                    rows=slice((j + 1) * b, (j + 2) * b), head=h.head) for j, h in enumerate(heads)]
    rep = tokens.repeat(k + 1, 1)  # ((k + 1) * batch, pos)
    loss = engine.run(Run(rep, writes=writes, attention_mask=None if mask is None else mask.repeat(k + 1, 1),
                          returns="loss")).loss.cpu().view(k + 1, b, -1)  # (k + 1, batch, pos - 1)
    return loss[0], loss[1:] - loss[0]


def _sweep_chunk(engine: Engine, tokens, ablation: Ablation, frozen: bool,
                 groups: Sequence[Sequence[tuple[int, Head]]], n_swept: int, bar, mask, row_offset: int):
    """(batch, pos - 1) clean loss and (n_heads, batch, pos - 1) deltas for one chunk of tokens.

    One clean run records the logits (clean loss), the patterns (pattern-preserving), and for each
    group's layer l the residual entering it and the clean ``z``. A group's run then starts at layer l
    (blocks below are skipped and the clean residual passed on), and, where the adapter says the
    attention output is its output projection's (``ArchSpec.attn_is_o_proj``) and the heads of layer l
    not ablated compute what they did on the clean run (same input; same pattern when frozen), layer
    l's attention is skipped too: its output is the output projection applied to the clean ``z`` with
    the ablated heads' slices replaced. Remotely every pass runs from layer 0 with the edits written in
    the trace (see the module docstring)."""
    a = engine.adapter
    b = tokens.shape[0]
    positions = None if mask is None else position_ids(mask, tokens)
    layers = sorted({h.layer for g in groups for _, h in g})
    local = not engine.remote
    shortcut = local and _ATTN_SHORTCUT and a.spec.attn_is_o_proj
    reads = [Site(layer, "z") for layer in layers] if shortcut else []
    if shortcut:
        checked = _SHORTCUT_CHECKED.setdefault(engine.inner, set())
        for layer in layers:
            if (id(a.spec), layer) not in checked:
                _check_shortcut(engine, layer, tokens)
                checked.add((id(a.spec), layer))
    if local:
        reads += [Site(layer, "resid_pre") for layer in layers if layer > 0]
    if frozen:
        reads += [Site(layer, "pattern") for layer in range(a.n_layers)]
    out = engine.run(Run(tokens, reads=reads, attention_mask=mask, returns="loss"))
    clean = out.loss.cpu()  # (batch, pos - 1)
    acts = out.acts
    del out
    delta = torch.empty(n_swept, *clean.shape, dtype=clean.dtype)
    for group in groups:
        k, layer = len(group), group[0][1].layer
        rows = [slice(j * b, (j + 1) * b) for j in range(k)]
        values = [ablation_value(ablation, h, tokens, row_offset, positions, d_head=a.d_head) for _, h in group]
        writes, attn_outputs = [], {}
        if shortcut:  # apply the edits to the clean z here; skip the layer's attention
            o_proj = a.module(engine.inner, layer, "o_proj")
            # on the projection's device (a model split inside a layer reads z before accelerate moves it)
            z = acts[f"L{layer}.z"].to(engine.device(a.path(layer, "o_proj")))
            z = z.repeat(k, 1, 1, 1)  # (k * batch, pos, head, d_head)
            for r, (_, h), value in zip(rows, group, values):
                z[r, :, h.head] = _checked_value(value, z[r, :, h.head], f"L{layer}.z")
            attn_outputs[layer] = o_proj(z.flatten(2))  # (k * batch, pos, d_model)
        else:
            writes += [Write(Site(layer, "z"), value, rows=r, head=h.head) for r, (_, h), value in zip(rows, group, values)]
        if frozen:  # every pattern at or above the layer frozen, in every block of rows
            writes += [Write(Site(above, "pattern"), acts[f"L{above}.pattern"].repeat(k, 1, 1, 1))
                       for above in range(layer + (1 if shortcut else 0), a.n_layers)]
        start = layer if local else 0
        prefix = acts[f"L{layer}.resid_pre"].repeat(k, 1, 1) if start > 0 else None
        rep = tokens.repeat(k, 1)  # (k * batch, pos)
        loss = engine.run(Run(rep, writes=writes, attention_mask=None if mask is None else mask.repeat(k, 1),
                              start=start, prefix=prefix, attn_outputs=attn_outputs, returns="loss")).loss
        loss = loss.cpu().view(k, b, -1)  # (k, batch, pos - 1)
        for j, (i, _) in enumerate(group):
            delta[i] = loss[j] - clean
        if bar is not None:
            bar.update(1)
    return clean, delta


def _check_shortcut(engine: Engine, layer: int, tokens: torch.Tensor) -> None:
    """Raise unless skipping layer ``layer``'s attention module and giving its output as the output
    projection of its ``z`` leaves the logits as they were (on the first row's first 8 tokens), as
    ``ArchSpec.attn_is_o_proj`` claims and the sweep's attention shortcut assumes: an adapter registered with
    it on a model whose attention adds anything after the projection would give silently wrong deltas."""
    a = engine.adapter
    t = tokens[:1, :8]
    clean = engine.run(Run(t, reads=[Site(layer, "z")]))
    o_proj = a.module(engine.inner, layer, "o_proj")
    attn = o_proj(clean.acts[f"L{layer}.z"].to(engine.device(a.path(layer, "o_proj"))).flatten(2))
    again = engine.run(Run(t, attn_outputs={layer: attn})).logits
    want = clean.logits
    diff = float((again.to(want.device) - want).abs().nan_to_num(0.0).max())
    if diff > rounding_tolerance(want):
        raise InterventionError(
            f"ablation_sweep: the {a.model_type} adapter says attn_is_o_proj=True, but layer {layer}'s attention "
            f"module's output is not its output projection's ({a.path(layer, 'o_proj')!r}: the logits move by "
            f"{diff:.3g} when it stands in): the module adds something after it, and the sweep's shortcut would "
            "be silently wrong. Register the adapter with ArchSpec(..., attn_is_o_proj=False)")


def _checked_value(value, current: torch.Tensor, label: str):
    """The replacement the attention shortcut writes over ``current`` (batch, pos, d_head), validated as the
    engine validates a ``Write`` (``check_value``; a function's result as the trace body checks it): never a
    silent broadcast."""
    if value is None:
        return 0
    shape = tuple(current.shape)
    check_value(value, shape, f"write to {label}")
    if not torch.is_tensor(value):  # a function of the activation
        value = value(current.clone())
        if not torch.is_tensor(value) or tuple(value.shape) != shape:
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"a function written to {label} returned {got}; it must return a tensor of the "
                             f"activation's shape {shape}")
        if not value.is_floating_point() or value.is_meta:
            got = "a meta tensor" if value.is_meta else f"dtype {value.dtype}"
            raise ValueError(f"a function written to {label} returned {got}; it must return floating-point values "
                             "with data (e.g. computed from the activation it is given)")
    return value.to(current.device, current.dtype)


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
        A sweep of a padded batch (NaN at padding) is refused: its columns are not token indices.
    """
    import pandas as pd

    heads = parse_heads(heads)
    if not torch.is_tensor(delta) or delta.dim() != 3:
        raise ValueError("delta must be the (n_heads_swept, batch, pos - 1) tensor from ablation_sweep")
    if delta.shape[0] != len(heads):
        raise ValueError(f"delta has {delta.shape[0]} heads but {len(heads)} heads were named: pass the heads "
                         "in the order of the sweep")
    check_aligned(delta, "delta")
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
