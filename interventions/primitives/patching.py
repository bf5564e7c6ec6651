"""Activation patching: copy one activation from a source run into a target run, measure a metric.

``direction="clean_to_corrupted"`` (default) runs the *corrupted* tokens and patches in activations
recorded on the *clean* tokens (denoising: which activations restore clean behaviour?);
``"corrupted_to_clean"`` runs the clean tokens and patches in corrupted activations (noising: which
activations does clean behaviour need?).

Three kinds of site:
  * ``patch_heads``: one head's output (its slice of the attention output projection's input), at all
    positions (``by="head"``) or at one position (``by="head_pos"``).
  * ``patch_residual``: the residual stream entering a layer, at one position.
  * ``patch_patterns``: one head's attention pattern (inside ``observable``; set up here).

A metric is any function of logits (batch, pos, vocab) -> (batch,) or a scalar tensor; results are
its mean over the batch. Patches are batched: the target tokens are repeated k times along the batch
and patch j is written only into rows [j * batch, (j + 1) * batch), so one forward pass measures k
patches (TransformerLens' ``get_act_patch_*`` run one pass per index). Each block of rows holds one
patch only, so the patches do not interact.

Example:
    >>> import torch
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, vocab_size=20)).eval()
    >>> clean, corrupted = torch.randint(0, 20, (2, 6)), torch.randint(0, 20, (2, 6))
    >>> metric = logit_diff(clean[:, -1], corrupted[:, -1])
    >>> patch_heads(model, clean, corrupted, metric).shape
    torch.Size([2, 4])
    >>> patch_residual(model, clean, corrupted, metric).shape
    torch.Size([2, 6])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from ..engine.adapters import get_adapter, observable
from .cache import Write, _run_sites
from .loss import loss_from_logits
from ..engine.tracing import check_tokens, unwrap

Metric = Callable[[torch.Tensor], torch.Tensor]
Direction = Literal["clean_to_corrupted", "corrupted_to_clean"]
PatchBy = Literal["head", "head_pos"]
DIRECTIONS = ("clean_to_corrupted", "corrupted_to_clean")
PATCH_BY = ("head", "head_pos")


# ----------------------------------------------------------------------------- metrics

def logit_diff(correct_ids, wrong_ids, pos: int = -1) -> Metric:
    """Metric: logit of the correct token minus logit of the wrong token at position ``pos``.

    ``correct_ids``/``wrong_ids``: an int, or (batch,) ids (one per sequence). Returns a function of
    logits (batch, pos, vocab) -> (batch,). A difference of logits, not of probabilities, because it is
    linear in the final residual stream (up to the final LayerNorm) and unaffected by other tokens.

    Example:
        >>> m = logit_diff(torch.tensor([1, 2]), torch.tensor([0, 0]))
        >>> m(torch.eye(3)[None].expand(2, 3, 3)).tolist()  # position -1 is one-hot at id 2
        [0.0, 1.0]
    """
    correct = torch.as_tensor(correct_ids).long().reshape(-1)
    wrong = torch.as_tensor(wrong_ids).long().reshape(-1)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, pos].float()  # (batch, vocab)
        b = last.shape[0]
        c, w = correct.to(last.device), wrong.to(last.device)
        for name, ids in (("correct_ids", c), ("wrong_ids", w)):
            if ids.numel() not in (1, b):
                raise ValueError(f"{name} has {ids.numel()} ids but the batch has {b} rows: pass one id "
                                 "or one per sequence")
        c, w = c.expand(b), w.expand(b)
        rows = torch.arange(b, device=last.device)
        return last[rows, c] - last[rows, w]

    return metric


def mean_loss_metric(tokens: torch.Tensor) -> Metric:
    """Metric: mean next-token loss (nats) over positions of each sequence, on ``tokens`` (batch, pos).

    Returns a function of logits (batch, pos, vocab) -> (batch,). Pass the tokens of the run the
    logits come from (the target run): loss is only defined against the tokens being predicted."""
    if not torch.is_tensor(tokens) or tokens.dim() != 2:
        raise ValueError("mean_loss_metric needs the (batch, pos) token ids of the run being measured")

    def metric(logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[:2] != tokens.shape:
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}: "
                             "build mean_loss_metric from the target run's tokens")
        return loss_from_logits(logits, tokens).mean(-1)

    return metric


# ----------------------------------------------------------------------------- validation

def _check_pair(model, clean, corrupted, direction):
    adapter = get_adapter(unwrap(model))
    check_tokens(clean, adapter, "clean")
    check_tokens(corrupted, adapter, "corrupted")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean has shape {tuple(clean.shape)} but corrupted has {tuple(corrupted.shape)}: "
                         "patching copies activations position by position, so pass token-aligned pairs of "
                         "the same (batch, pos) (pad or truncate both to the same length)")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is unknown: use 'clean_to_corrupted' (run corrupted, patch "
                         "in clean activations) or 'corrupted_to_clean'")
    source, target = (clean, corrupted) if direction == "clean_to_corrupted" else (corrupted, clean)
    return adapter, source, target


def _check_per_pass(n: int, name: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name}={n!r} must be a positive integer (patches measured per forward pass)")
    return n


def _reduce(metric: Metric, logits: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean over the batch of ``metric(logits)``, validating its shape."""
    value = metric(logits)
    if not torch.is_tensor(value) or value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"the metric returned {shape}: it must map logits (batch, pos, vocab) to a "
                         f"(batch,) tensor (batch={batch}) or a scalar tensor")
    return value.float().mean().cpu()


# ----------------------------------------------------------------------------- driver

# A patch: the (layer, kind) site and, per patch, the index *after* the batch index and the value
# (source activation at that index, batch first).
Patch = tuple[tuple[int, str], tuple, torch.Tensor]


def _measure(model, target: torch.Tensor, patches: Sequence[Patch], metric: Metric, per_pass: int,
             progress: bool = False) -> torch.Tensor:
    """Metric (mean over batch) of ``target`` with each patch applied alone: a (len(patches),) tensor.

    Up to ``per_pass`` patches share one forward pass on ``target`` repeated along the batch."""
    b = target.shape[0]
    out = torch.empty(len(patches))
    starts = range(0, len(patches), per_pass)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="patching", unit="pass")
    for start in starts:
        group = patches[start:start + per_pass]
        writes: dict[tuple[int, str], list[Write]] = {}
        for j, (key, index, value) in enumerate(group):
            writes.setdefault(key, []).append(((slice(j * b, (j + 1) * b),) + index, value))
        logits, _ = _run_sites(model, target.repeat(len(group), 1), writes=writes)  # (k*batch, pos, vocab)
        for j in range(len(group)):
            out[start + j] = _reduce(metric, logits[j * b:(j + 1) * b], b)
    return out


# ----------------------------------------------------------------------------- public

@torch.no_grad()
def patch_heads(model, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
                by: PatchBy = "head", direction: Direction = "clean_to_corrupted",
                heads_per_pass: int = 8, progress: bool = False) -> torch.Tensor:
    """Metric with one head's output patched from the source run into the target run.

    Args:
        model: HF causal LM of a supported architecture.
        clean, corrupted: (batch, pos) token ids of the same shape.
        metric: logits (batch, pos, vocab) -> (batch,) or scalar.
        by: "head" (patch the head at every position) or "head_pos" (at one position).
        direction: see the module docstring.
        heads_per_pass: patches measured per forward pass (memory grows with it).
        progress: show a tqdm bar over forward passes.

    Returns:
        (n_layers, n_heads) for by="head", (n_layers, n_heads, pos) for by="head_pos": the metric
        (mean over the batch) with that one patch applied.
    """
    adapter, source, target = _check_pair(model, clean, corrupted, direction)
    if by not in PATCH_BY:
        raise ValueError(f"by={by!r} is unknown: use 'head' (one head at all positions) or 'head_pos' "
                         "(one head at one position)")
    _check_per_pass(heads_per_pass, "heads_per_pass")
    n_layers, n_heads, pos = adapter.n_layers, adapter.n_heads, source.shape[1]
    _, src = _run_sites(model, source, reads=[(layer, "head_out") for layer in range(n_layers)])
    patches: list[Patch] = []
    for layer in range(n_layers):
        z = src[(layer, "head_out")]  # (batch, pos, head*d_head)
        for head in range(n_heads):
            sl = adapter.head_slice(head)
            if by == "head":
                patches.append(((layer, "head_out"), (slice(None), sl), z[:, :, sl]))
            else:
                patches.extend(((layer, "head_out"), (p, sl), z[:, p, sl]) for p in range(pos))
    out = _measure(model, target, patches, metric, heads_per_pass, progress)
    return out.view(n_layers, n_heads) if by == "head" else out.view(n_layers, n_heads, pos)


@torch.no_grad()
def patch_residual(model, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
                   direction: Direction = "clean_to_corrupted", patches_per_pass: int = 8,
                   progress: bool = False) -> torch.Tensor:
    """Metric with the residual stream entering one layer, at one position, patched from the source.

    The site is the decoder block's first input (resid_pre). Returns (n_layers, pos)."""
    adapter, source, target = _check_pair(model, clean, corrupted, direction)
    _check_per_pass(patches_per_pass, "patches_per_pass")
    n_layers, pos = adapter.n_layers, source.shape[1]
    _, src = _run_sites(model, source, reads=[(layer, "resid_pre") for layer in range(n_layers)])
    patches = [((layer, "resid_pre"), (p,), src[(layer, "resid_pre")][:, p])
               for layer in range(n_layers) for p in range(pos)]
    return _measure(model, target, patches, metric, patches_per_pass, progress).view(n_layers, pos)


@torch.no_grad()
def patch_patterns(model, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
                   direction: Direction = "clean_to_corrupted", heads_per_pass: int = 8,
                   progress: bool = False) -> torch.Tensor:
    """Metric with one head's attention pattern (all query positions) patched from the source run.

    Runs the model on its eager attention path (``observable``) for both runs; the model is restored
    afterwards. Returns (n_layers, n_heads)."""
    adapter, source, target = _check_pair(model, clean, corrupted, direction)
    _check_per_pass(heads_per_pass, "heads_per_pass")
    n_layers, n_heads = adapter.n_layers, adapter.n_heads
    with observable(unwrap(model)):
        _, src = _run_sites(model, source, reads=[(layer, "pattern") for layer in range(n_layers)])
        patches = [((layer, "pattern"), (head,), src[(layer, "pattern")][:, head])  # (batch, q_pos, k_pos)
                   for layer in range(n_layers) for head in range(n_heads)]
        return _measure(model, target, patches, metric, heads_per_pass, progress).view(n_layers, n_heads)
