"""Per-token loss, optionally under ablations, and loss by token index over a dataset.

Convention (as TransformerLens' ``loss_per_token``): entry t of a (batch, pos - 1) loss array is the
loss, in nats, of predicting token t + 1 from tokens 0..t.

Example:
    >>> import torch
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=20)).eval()
    >>> per_token_loss(model, torch.randint(0, 20, (3, 10))).shape
    torch.Size([3, 9])
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch

from .ablation import (Ablation, PatternPreserving, ablation_run, as_ablations, check_ablations,
                       check_unpadded_references, frozen_patterns, head_writes, prepare_ablations)
from .progress import passes
from ..engine.adapters import get_adapter, observable
from ..engine.remote import Remote, check_remote
from ..engine.tracing import (Engine, Run, check_mask, check_positive, check_tokens, pad_to_nan, position_ids, unwrap,
                              without_grad)


LOSS_CHUNK_ELEMENTS = 2 ** 28  # float32 elements of logits converted at once (1 GiB)


def loss_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(batch, pos, vocab) logits and (batch, pos) tokens -> (batch, pos - 1) next-token loss in nats."""
    # row chunks keep the float32 copy near 1 GiB on large vocabularies (log_softmax is row-wise: the
    # result is the same bit for bit)
    rows = max(1, LOSS_CHUNK_ELEMENTS // max(1, logits.shape[1] * logits.shape[2]))
    target = tokens[:, 1:, None].to(logits.device)
    parts = [-logits[i:i + rows, :-1].float().log_softmax(-1).gather(-1, target[i:i + rows]).squeeze(-1)
             for i in range(0, logits.shape[0], rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@without_grad
def per_token_loss(model, tokens: torch.Tensor, ablation: Ablation | Sequence[Ablation] | None = None,
                   batch_size: int | None = None, attention_mask: torch.Tensor | None = None,
                   remote: Remote = False) -> torch.Tensor:
    """Loss (batch, pos - 1) in nats of ``model`` on ``tokens``, under ``ablation`` (one or a list).

    ``batch_size`` splits large inputs into chunks (same result). ``attention_mask`` (batch, pos; 1 =
    real token) runs a left-padded batch with each real token at its unpadded position; entries whose
    context or target is padding are NaN. ``remote``: True runs on NDIF (``model`` an
    ``nnsight.LanguageModel`` made from a hub id; one job per chunk, plus one per mean or resample
    reference), ``"local"`` nnsight's offline simulation of that (``interventions.engine.remote``);
    the loss is computed where the model runs, so only (batch, pos - 1) floats come back."""
    remote = check_remote(model, remote)
    check_tokens(tokens, get_adapter(unwrap(model)))
    check_mask(attention_mask, tokens)
    batch_size = check_positive(batch_size, "batch_size", allow_none=True)
    ablations = [] if ablation is None else as_ablations(ablation)
    step = tokens.shape[0] if batch_size is None else batch_size
    # once for all chunks (reference runs), on the whole batch as ablation_sweep does
    prepare_ablations(ablations, model, tokens, remote, attention_mask, rows=step)
    parts = []
    for i in range(0, tokens.shape[0], step):
        mask = None if attention_mask is None else attention_mask[i:i + step]
        loss = ablation_run(model, tokens[i:i + step], ablations, attention_mask=mask, row_offset=i, remote=remote,
                            returns="loss", prepared=True).loss
        parts.append(pad_to_nan(loss.cpu(), mask))
    return torch.cat(parts)


@without_grad
def per_token_loss_sets(model, tokens: torch.Tensor, sets: Mapping[str, Ablation | Sequence[Ablation]],
                        batch_size: int | None = None, attention_mask: torch.Tensor | None = None,
                        progress: bool | None = None) -> dict[str, torch.Tensor]:
    """``per_token_loss`` of ``tokens`` under each of several ablation sets: {name: (batch, pos - 1)}; an
    empty set is the clean run.

    Where any set holds a ``PatternPreserving`` ablation, every set runs on ``observable``'s eager path,
    the clean run included (so a change from it compares one path), and each chunk's clean patterns are
    read once, by the clean run, for all sets (``per_token_loss`` reads them again for each call): k
    pattern-preserving sets cost k + 1 forward passes, not 2k + 1. Each result equals ``with
    observable(model): per_token_loss(model, tokens, set, batch_size, attention_mask)`` (tested; without
    a pattern-preserving set, the same without ``observable``). ``progress``: a bar over forward passes
    (``interventions.primitives.progress``).

    Example:
        >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM, ZeroAblation
        >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=20)).eval()
        >>> out = per_token_loss_sets(model, torch.randint(0, 20, (3, 10)),
        ...                           {"clean": [], "L0H1": PatternPreserving(ZeroAblation("L0H1"))})
        >>> {name: tuple(loss.shape) for name, loss in out.items()}
        {'clean': (3, 9), 'L0H1': (3, 9)}
    """
    engine = Engine(model)
    check_tokens(tokens, engine.adapter)
    check_mask(attention_mask, tokens)
    batch_size = check_positive(batch_size, "batch_size", allow_none=True)
    if not isinstance(sets, Mapping) or not sets:
        raise ValueError("sets must be a non-empty dict {name: ablation or list of ablations} ([] for the clean run)")
    sets = {name: as_ablations(abl) for name, abl in sets.items()}
    # every set's input validated before the first set's reference runs (a set is prepared in turn)
    every = [abl for ablations in sets.values() for abl in ablations]
    check_ablations(every, model, tokens)
    check_unpadded_references(every, tokens, attention_mask)
    step = tokens.shape[0] if batch_size is None else batch_size
    frozen_by = {name: any(isinstance(a, PatternPreserving) for a in abl) for name, abl in sets.items()}
    eager = any(frozen_by.values())
    need_clean = eager or any(not abl for abl in sets.values())
    chunks = range(0, tokens.shape[0], step)
    bar = passes(len(chunks) * (sum(1 for abl in sets.values() if abl) + need_clean), "ablation sets", progress)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in sets}
    try:
        with observable(engine.inner) if eager else contextlib.nullcontext():
            for ablations in sets.values():  # once for all chunks (reference runs, on the sets' path)
                prepare_ablations(ablations, model, tokens, False, attention_mask, rows=step)
            for i in chunks:
                toks = tokens[i:i + step]
                mask = None if attention_mask is None else attention_mask[i:i + step]
                frozen, clean = [], None
                if eager:  # the clean run, reading the patterns that pattern-preserving sets freeze
                    result, frozen = frozen_patterns(engine, toks, mask, returns="loss")
                    clean = result.loss
                elif need_clean:
                    clean = engine.run(Run(toks, attention_mask=mask, returns="loss")).loss
                if need_clean and bar is not None:
                    bar.update(1)
                positions = None if mask is None else position_ids(mask, toks)
                for name, ablations in sets.items():
                    if not ablations:
                        loss = clean
                    else:
                        writes = head_writes(ablations, toks, engine.adapter.d_head, i, positions)
                        loss = engine.run(Run(toks, writes=(frozen if frozen_by[name] else []) + writes,
                                              attention_mask=mask, returns="loss")).loss
                        if bar is not None:
                            bar.update(1)
                    parts[name].append(pad_to_nan(loss.cpu(), mask))
    finally:
        if bar is not None:
            bar.close()
    return {name: torch.cat(p) for name, p in parts.items()}


def check_aligned(losses: torch.Tensor, name: str) -> None:
    """Refuse NaN entries (padding) in a loss array that is to be averaged column by column as token
    indices: in a left-padded batch a column holds different token indices in different rows."""
    if torch.is_tensor(losses) and bool(torch.isnan(losses).any()):
        raise ValueError(f"{name} hold NaN (entries of a padded batch, or a non-finite loss): averaging column t as "
                         "token index t + 1 would mix token indices of rows padded by different amounts; pass "
                         "results of unpadded sequences of one length (e.g. one call per length)")


def loss_by_position(losses: torch.Tensor):
    """Mean loss and standard error at each token index over a dataset.

    losses: (n_sequences, pos - 1) from ``per_token_loss``. Returns a DataFrame with columns
    ``token_index`` (0-based position of the predicted token: 1 .. pos - 1, i.e. how many tokens of
    context it had), ``loss`` (nats), ``sem`` (standard error of the mean over sequences) and ``n``.
    Losses of a padded batch (NaN at padding) are refused: their columns are not token indices."""
    import pandas as pd

    check_aligned(losses, "losses")
    n = losses.shape[0]
    mean = losses.mean(0)
    sem = losses.std(0, unbiased=True) / n ** 0.5 if n > 1 else torch.full_like(mean, float("nan"))
    return pd.DataFrame({"token_index": range(1, losses.shape[1] + 1), "loss": mean.numpy(),
                         "sem": sem.numpy(), "n": n})
