"""Activation patching and path patching: copy activations from a source run into a target run,
measure a metric on the target run.

``direction="clean_to_corrupted"`` (default) runs the *corrupted* tokens and patches in activations
recorded on the *clean* tokens (denoising: which activations restore clean behaviour?);
``"corrupted_to_clean"`` runs the clean tokens and patches in corrupted activations (noising: which
activations does clean behaviour need?).

Sites (names and shapes in ``interventions.engine.sites``):
  * ``patch_heads``: one head's ``z`` (default), ``q``, ``k`` or ``v`` at all positions
    (``by="head"``) or at one position (``by="head_pos"``). ``k``/``v`` are per key/value head under
    grouped-query attention.
  * ``patch_residual``: the residual stream entering a layer, at one position.
  * ``patch_patterns``: one head's attention pattern (inside ``observable``; set up here).
  * ``path_patch``: the effect of a sender head on a receiver head's q, k or v input *only*, every
    other head's output frozen (Wang et al. 2022; Goldowsky-Dill et al. 2023). MLPs in between are
    recomputed, so sender -> MLP -> receiver counts as part of the path; under grouped-query
    attention a k or v path ends in the receiver query head alone.

A metric is a function ``metric(logits, tokens) -> (batch,)`` (or a scalar tensor); here:
``mean_loss_metric`` (every position), ``second_copy_loss(length)`` (the second copy of a repeated
prompt, for induction) and ``logit_diff(correct, wrong)``. The patching
functions call it with the logits *and the tokens of the run being measured* (the target run), so a
loss cannot be computed against the wrong tokens. Results are its mean over the batch. Patches are
batched: the target tokens are repeated k times along the batch and patch j is written only into rows
[j * batch, (j + 1) * batch), so one forward pass measures k patches (TransformerLens'
``get_act_patch_*`` run one pass per index). Each block of rows holds one patch only. A metric of your own
is first evaluated on the source run's logits, so one that returns the wrong shape is refused before
any patched run.

Padded batches: ``attention_mask`` (batch, pos; 1 = real token, left or right padding: a gap between a
row's real tokens is refused) is *one* mask for both runs, so clean and corrupted must be padded
identically (each pair of prompts of one length, padded at the same columns; only the shapes can be
checked). Every run takes it (each real token at
its unpadded position), and so does the metric, which is then called
``metric(logits, tokens, attention_mask=mask)`` and must leave padding out: a metric without that
parameter is refused before any run. The metrics here do: ``mean_loss_metric`` averages the losses whose
context and target are real tokens, ``second_copy_loss`` takes each row's last real tokens, and
``logit_diff``'s ``pos`` counts each row's real tokens (-1: its last real token). A patch at one
position (``by="head_pos"``, ``patch_residual``) counts only the rows with a real token there (a patch
on padding changes nothing); positions are the padded batch's columns
(left padding aligns the prompts' ends, right padding their starts), and a column of padding only gives
NaN. So every entry is the mean over the prompts it patched of what each gives run unpadded on its own
(tested).

The two built-in metrics are reduced where the model runs: ``mean_loss_metric`` from the per-token
loss, ``logit_diff`` from the two logits it compares (``second_copy_loss`` is called on the logits, as
your own metric is). That matters remotely: ``patch_heads``,
``patch_residual`` and ``path_patch`` take ``remote=True`` (NDIF, ``model`` an ``nnsight.LanguageModel``
made from a hub id) or ``"local"`` (nnsight's offline simulation; see ``interventions.engine.remote``),
one job per forward pass, and with a built-in metric only (batch, pos - 1) losses or (batch, 2) logits per
patch come back; any other metric is called here on the whole logits (batch x pos x vocab floats per patch
travel back, and the source run's once, to check the metric's shape).
``patch_patterns`` cannot run remotely (it edits the model).

Example:
    >>> import torch
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, vocab_size=20)).eval()
    >>> clean, corrupted = torch.randint(0, 20, (2, 6)), torch.randint(0, 20, (2, 6))
    >>> patch_heads(model, clean, corrupted, mean_loss_metric).shape
    torch.Size([2, 4])
    >>> patch_residual(model, clean, corrupted, logit_diff(clean[:, -1], corrupted[:, -1])).shape
    torch.Size([2, 6])
    >>> path_patch(model, clean, corrupted, mean_loss_metric, senders=["L0H0", "L0H1"], receivers=["L1H2"],
    ...            receiver_input="k").shape
    torch.Size([2, 1])
    >>> mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # row 0: a 4-token prompt, left-padded
    >>> patch_residual(model, clean, corrupted, mean_loss_metric, attention_mask=mask)[:, :2].isnan().any().item()
    False
    >>> patch_patterns(model, clean, corrupted, mean_loss_metric, attention_mask=mask).shape  # one mask, both runs
    torch.Size([2, 4])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from ..engine.adapters import observable
from ..engine.heads import Head, HeadLike, check_heads, parse_heads
from ..engine.sites import Site, kv_head_of
from .progress import check_progress, passes
from ..engine.remote import NotRemotable, Remote, check_remote
from ..engine.tracing import (Engine, Gather, Run, Write, as_position, check_mask, check_position, check_positive,
                              check_tokens)
from .loss import loss_from_logits

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Direction = Literal["clean_to_corrupted", "corrupted_to_clean"]
PatchBy = Literal["head", "head_pos"]
HeadSite = Literal["z", "q", "k", "v"]
DIRECTIONS = ("clean_to_corrupted", "corrupted_to_clean")
PATCH_BY = ("head", "head_pos")
HEAD_SITES = ("z", "q", "k", "v")


# ----------------------------------------------------------------------------- metrics

class LogitDiff:
    """The metric ``logit_diff`` returns: ``metric(logits, tokens) -> (batch,)``, logit of the correct
    token minus logit of the wrong token at position ``pos``. The patching functions reduce it where
    the model runs (only those two logits per row come back)."""

    def __init__(self, correct_ids, wrong_ids, pos: int = -1):
        self.correct = torch.as_tensor(correct_ids).long().reshape(-1)
        self.wrong = torch.as_tensor(wrong_ids).long().reshape(-1)
        # a numpy integer or a 0-d integer tensor is that int; anything else but an int is refused by ``check``
        self.pos = as_position(pos)

    def ids(self, batch: int) -> torch.Tensor:
        """(batch, 2) ids: each row's correct and wrong token."""
        for name, ids in (("correct_ids", self.correct), ("wrong_ids", self.wrong)):
            if ids.numel() not in (1, batch):
                raise ValueError(f"{name} has {ids.numel()} ids but the batch has {batch} rows: pass one id "
                                 "or one per sequence")
        return torch.stack([self.correct.expand(batch), self.wrong.expand(batch)], dim=1)

    def check(self, batch: int, pos: int, vocab_size: int, attention_mask: torch.Tensor | None = None) -> None:
        """Raise ValueError unless the ids fit ``batch`` rows and the vocabulary and ``pos`` lies in the
        sequence (with ``attention_mask``: in every row's real tokens): called before any run (an id
        outside the vocabulary would fail inside the trace)."""
        self.ids(batch)
        for name, ids in (("correct_ids", self.correct), ("wrong_ids", self.wrong)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                raise ValueError(f"{name} {ids.tolist()} has ids outside the vocabulary [0, {vocab_size}): "
                                 "pass token ids of this model's tokenizer")
        check_position(self.pos, pos, "logit_diff pos", several="for several positions, measure each with its own "
                       "logit_diff(correct_ids, wrong_ids, pos=p)")
        if attention_mask is not None:
            self._check_rows(attention_mask)

    def _check_rows(self, attention_mask: torch.Tensor) -> None:
        """Raise ValueError unless ``pos`` lies in every row's real tokens."""
        n = attention_mask.bool().sum(-1)
        short = ((self.pos >= n) | (self.pos < -n)).nonzero().flatten().tolist()
        if short:
            raise ValueError(f"logit_diff pos={self.pos} is out of range for row {short[0]}, which has "
                             f"{int(n[short[0]])} real tokens: on a padded batch pos counts each row's real "
                             f"tokens; pass a position in [-{int(n.min())}, {int(n.min())})")

    def columns(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch,) column of each row's real token number ``pos`` (counted as in an unpadded row)."""
        real = attention_mask.bool()
        count = real.long().cumsum(-1)  # real tokens up to each column
        nth = self.pos + 1 if self.pos >= 0 else count[:, -1:] + self.pos + 1  # 1-based among the row's real tokens
        return ((count == nth) & real).long().argmax(-1)

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            last = logits[:, self.pos].float()  # (batch, vocab)
        else:  # (a pos outside a row's real tokens matches no column: argmax would read column 0)
            self._check_rows(attention_mask)
            cols = self.columns(attention_mask).to(logits.device)
            last = logits[torch.arange(logits.shape[0], device=logits.device), cols].float()
        pair = last.gather(-1, self.ids(last.shape[0]).to(last.device))  # (batch, 2)
        return pair[:, 0] - pair[:, 1]


def logit_diff(correct_ids, wrong_ids, pos: int = -1) -> LogitDiff:
    """Metric: logit of the correct token minus logit of the wrong token at position ``pos``.

    ``correct_ids``/``wrong_ids``: an int, or (batch,) ids (one per sequence). Returns
    ``metric(logits, tokens, attention_mask=None) -> (batch,)`` (the tokens are not needed; with a mask,
    ``pos`` counts each row's real tokens). A difference of logits, not of probabilities, because it is
    linear in the final residual stream (up to the final LayerNorm) and unaffected by other tokens.

    Example:
        >>> m = logit_diff(torch.tensor([1, 2]), torch.tensor([0, 0]))
        >>> m(torch.eye(3)[None].expand(2, 3, 3), None).tolist()  # position -1 is one-hot at id 2
        [0.0, 1.0]
        >>> right_padded = torch.tensor([[1, 1, 0], [1, 1, 1]])  # row 0's last real token: position 1
        >>> m(torch.eye(3)[None].expand(2, 3, 3), None, right_padded).tolist()
        [1.0, 1.0]
    """
    return LogitDiff(correct_ids, wrong_ids, pos)


def mean_loss_metric(logits: torch.Tensor, tokens: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Metric: mean next-token loss (nats) over the positions of each sequence: (batch,). With
    ``attention_mask`` only the losses whose context and target token are real count.

    The patching functions pass the tokens of the run being measured, so pass the function itself:
    ``patch_heads(model, clean, corrupted, mean_loss_metric)``.

    Example:
        >>> mean_loss_metric(torch.zeros(2, 4, 10), torch.zeros(2, 4, dtype=torch.long)).tolist()  # uniform: log 10
        [2.3025851249694824, 2.3025851249694824]
    """
    if not torch.is_tensor(tokens) or logits.shape[:2] != tokens.shape:
        raise ValueError("mean_loss_metric(logits, tokens) needs the (batch, pos) tokens of the run the logits "
                         "come from; pass the function itself to the patching functions")
    check_mask(attention_mask, tokens)
    _check_loss_length(tokens.shape[1], attention_mask)
    return _real_mean(loss_from_logits(logits, tokens), attention_mask)


def second_copy_loss(length: int) -> Metric:
    """Metric: mean next-token loss (nats) of each prompt's second copy of a repeated sequence, from its
    second token on: (batch,). For prompts ending in ``length`` tokens repeated (BOS + A + A, or A + A):
    the last ``length - 1`` tokens, which an induction head can predict from the first copy (the second
    copy's first token cannot be predicted from it). ``mean_loss_metric`` averages every position, so on
    such prompts an effect on the second copy is diluted by the first copy's unpredictable tokens.

    Returns ``metric(logits, tokens, attention_mask=None) -> (batch,)``; with a mask (left or right
    padding) each row's last ``length - 1`` real tokens count.

    Example:
        >>> tokens = torch.tensor([[0, 5, 6, 7, 5, 6, 7]])  # BOS + A + A, length 3
        >>> logits = torch.zeros(1, 7, 10); logits[0, 4, 6] = logits[0, 5, 7] = 100.0  # copies 6, 7 perfectly
        >>> second_copy_loss(3)(logits, tokens).tolist()  # tokens 6 and 7 of the second copy: no loss
        [0.0]
    """
    length = check_positive(length, "length", minimum=2, why="the number of tokens repeated (the second copy from "
                            "its second token on is measured)")

    def metric(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_tensor(tokens) or tokens.dim() != 2 or logits.shape[:2] != tokens.shape:
            raise ValueError("second_copy_loss(length)(logits, tokens) needs the (batch, pos) tokens of the run the "
                             "logits come from; pass the metric itself to the patching functions")
        check_mask(attention_mask, tokens)
        real = tokens.shape[1] if attention_mask is None else int(attention_mask.bool().sum(-1).min())
        if real < 2 * length:
            raise ValueError(f"second_copy_loss({length}) needs prompts that end in {length} tokens repeated (at least "
                             f"{2 * length} real tokens), but a row has {real}: pass the length of the repeated "
                             "sequence")
        losses = loss_from_logits(logits, tokens)  # (batch, pos - 1)
        if attention_mask is None:
            return losses[:, -(length - 1):].mean(-1)  # (batch,)
        m = attention_mask.to(losses.device).bool()
        after = m.flip(-1).long().cumsum(-1).flip(-1)  # (batch, pos): real tokens at or after each column
        second = m[:, :-1] & m[:, 1:] & (after[:, 1:] <= length - 1)  # (batch, pos - 1): last length - 1 targets
        return losses.where(second, 0).sum(-1) / (length - 1)

    return metric


def _real_mean(losses: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, pos - 1) per-token losses -> (batch,) mean over the entries whose context and target are
    real tokens (all entries without a mask)."""
    if attention_mask is None:
        return losses.mean(-1)
    m = attention_mask.to(losses.device).bool()
    real = m[:, :-1] & m[:, 1:]
    return losses.where(real, 0).sum(-1) / real.sum(-1)


def _check_loss_length(pos: int, attention_mask: torch.Tensor | None = None) -> None:
    if pos < 2:  # no next-token loss: the mean of nothing is NaN
        raise ValueError(f"mean_loss_metric needs sequences of at least 2 tokens (a next-token loss), got {pos}: "
                         "pass longer sequences, or a metric such as logit_diff")
    if attention_mask is not None:
        m = attention_mask.bool()
        none = (~(m[:, :-1] & m[:, 1:]).any(-1)).nonzero().flatten().tolist()
        if none:
            raise ValueError(f"mean_loss_metric needs at least 2 adjacent real tokens in a row (a next-token loss), "
                             f"but attention_mask row {none[0]} has {int(m[none[0]].sum())} real token(s): drop "
                             "that row, or use a metric such as logit_diff")


# ----------------------------------------------------------------------------- validation

def _check_pair(model, clean, corrupted, direction, remote: Remote = False, attention_mask=None):
    engine = Engine(model, remote)
    adapter = engine.adapter
    check_tokens(clean, adapter, "clean")
    check_tokens(corrupted, adapter, "corrupted")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean has shape {tuple(clean.shape)} but corrupted has {tuple(corrupted.shape)}: "
                         "patching copies activations position by position, so pass token-aligned pairs of "
                         "the same (batch, pos) (pad or truncate both to the same length)")
    check_mask(attention_mask, clean)  # one mask for both: they are padded identically (not checkable)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is unknown: use 'clean_to_corrupted' (run corrupted, patch "
                         "in clean activations) or 'corrupted_to_clean'")
    source, target = (clean, corrupted) if direction == "clean_to_corrupted" else (corrupted, clean)
    return engine, source, target


def check_metric(metric, engine: Engine | None = None, target: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> Metric:
    """A metric must be a function of (logits, tokens), and on a padded batch (``attention_mask``) of
    ``attention_mask=`` too; a ``logit_diff`` must also fit ``target``'s (batch, pos), its real tokens and
    the model's vocabulary (checked before any run, so nothing is sent first)."""
    if not callable(metric):
        raise ValueError(f"metric must be a function (logits, tokens) -> (batch,), got {type(metric).__name__}")

    def fits(*args, **kwargs) -> bool:  # whether metric can be called so (no signature, e.g. builtins: trust it)
        try:
            inspect.signature(metric).bind(*args, **kwargs)
        except TypeError:
            return False
        except ValueError:
            pass
        return True

    if attention_mask is not None and fits(None, None, attention_mask=None):
        pass  # called metric(logits, tokens, attention_mask=mask): a required mask parameter is fine
    elif not fits(None, None):
        if fits(None, None, attention_mask=None):
            raise ValueError("the metric requires attention_mask, which is given only on a padded batch: pass "
                             "attention_mask= to the patching function, or give the parameter a default "
                             "(attention_mask=None)")
        raise ValueError("metric must take (logits, tokens): the patching functions pass the tokens of the "
                         "run being measured; e.g. def metric(logits, tokens): ...")
    elif attention_mask is not None:
        raise ValueError("on a padded batch (attention_mask) the metric is given the mask, as metric(logits, "
                         "tokens, attention_mask=mask), so that it can leave padding out; add the parameter: "
                         "def metric(logits, tokens, attention_mask=None): ...")
    if isinstance(metric, LogitDiff) and engine is not None:
        metric.check(target.shape[0], target.shape[1], engine.adapter.vocab_size, attention_mask)
    if metric is mean_loss_metric and target is not None:  # reduced in the trace: checked here, before any run
        _check_loss_length(target.shape[1], attention_mask)
    return metric


def _builtin(metric: Metric) -> bool:
    """Whether ``metric`` is reduced where the model runs (its shape is known before any run)."""
    return metric is mean_loss_metric or isinstance(metric, LogitDiff)


def _evaluate(metric: Metric, logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None,
             one_position: bool = False, per_row: bool = False) -> torch.Tensor:
    """``metric`` on one block of rows (given the mask when there is one), its shape checked: (batch,)
    or a scalar; a scalar is refused when ``one_position`` patches on a padded batch must leave out
    the rows that are padding there, and when ``per_row`` results are asked for (``reduce=False``)."""
    batch = tokens.shape[0]
    value = metric(logits, tokens) if mask is None else metric(logits, tokens, attention_mask=mask)
    if not torch.is_tensor(value) or value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"the metric returned {shape}: it must map logits (batch, pos, vocab) to a "
                         f"(batch,) tensor (batch={batch}) or a scalar tensor")
    if per_row and value.dim() == 0:
        raise ValueError("reduce=False needs one value per prompt, but the metric returned a scalar: return a "
                         f"(batch,) tensor (batch={batch}), or pass reduce=True for the mean over the batch")
    if one_position and value.dim() == 0 and mask is not None and not bool(mask.all()):
        raise ValueError("the metric returned a scalar, but on this padded batch a patch at one position must "
                         "count only the rows with a real token there: return one value per row, a "
                         f"(batch,) tensor (batch={batch})")
    return value


def _block_means(per_row: torch.Tensor, k: int, batch: int,
                 rows: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """(k * batch,) per-row values -> the mean of each of the k blocks of ``batch`` rows (on the CPU), over
    the rows ``rows[j]`` (bool (batch,); None: all) of block j."""
    return [_mean(per_row[j * batch:(j + 1) * batch], rows[j]) for j in range(k)]


def _mean(values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Mean (on the CPU) of (batch,) ``values`` at ``rows`` (None: all; a scalar is its own mean)."""
    return (values if rows is None else values[rows.to(values.device)]).float().mean().cpu()


def _rows_or_nan(values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """(batch,) values on the CPU as float32 (as ``_mean``), NaN at the rows a patch does not count."""
    values = values.float().cpu()
    return values if rows is None else values.where(rows.cpu(), float("nan"))


def _patched_rows(patch: Write | tuple[Write, ...], mask: torch.Tensor | None) -> torch.Tensor | None:
    """The rows a patch at one position counts on a padded batch (bool (batch,): those with a real token
    there); None: every row (no mask, a patch at every position, or no padding at that position)."""
    writes = (patch,) if isinstance(patch, Write) else patch
    where = {w.pos for w in writes}
    if mask is None or len(where) != 1 or not isinstance(next(iter(where)), int):
        return None
    real = mask[:, next(iter(where))].bool()
    return None if bool(real.all()) else real


def _source_run(engine: Engine, source: torch.Tensor, reads: list[Site], metric: Metric,
                mask: torch.Tensor | None, one_position: bool = False,
                per_row: bool = False) -> dict[str, torch.Tensor]:
    """The source run's activations at ``reads``. A metric of your own is evaluated once on its logits,
    so one that returns the wrong shape (or a scalar when ``per_row``) is refused before any patched run."""
    own = not _builtin(metric)
    result = engine.run(Run(source, reads=reads, attention_mask=mask, returns="logits" if own else "none"))
    if own:
        _evaluate(metric, result.logits, source, mask, one_position, per_row)
    return result.acts


# ----------------------------------------------------------------------------- driver

def _measure(engine: Engine, target: torch.Tensor, patches: Sequence[Write | tuple[Write, ...]], metric: Metric,
             per_pass: int, progress: bool | None = None, from_layer: int = 0,
             prefix: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             reduce: bool = True) -> torch.Tensor:
    """Metric (mean over batch) of ``target`` with each patch (a ``Write`` without rows, or a tuple of
    them applied together) applied alone: a (len(patches),) tensor. Up to ``per_pass`` patches share
    one forward pass on ``target`` repeated along the batch. The built-in metrics are reduced in the trace (module docstring).
    ``from_layer``/``prefix``: every patch lies in that layer or above, and ``prefix`` (batch, pos,
    d_model) is the target run's residual entering it: the blocks below are skipped (they compute what
    the target run computed). ``mask``: the batch's attention mask; a patch at one position counts
    only the rows with a real token there (module docstring). ``reduce=False``: each row's metric, a
    (len(patches), batch) tensor (NaN at rows a patch does not count)."""
    b = target.shape[0]
    out = torch.empty(len(patches)) if reduce else torch.empty(len(patches), b)
    starts = range(0, len(patches), per_pass)
    bar = passes(len(starts), "patching", progress)
    if isinstance(metric, LogitDiff):
        metric.ids(b)  # validates the ids against the batch before any run
    try:
        for start in starts:
            group = patches[start:start + per_pass]
            k = len(group)
            writes = [Write(w.site, w.value, rows=slice(j * b, (j + 1) * b), head=w.head, pos=w.pos)
                      for j, patch in enumerate(group) for w in ((patch,) if isinstance(patch, Write) else patch)]
            rep = target.repeat(k, 1)  # (k * batch, pos)
            rows = [_patched_rows(patch, mask) for patch in group]
            skip = dict(start=from_layer, prefix=None if prefix is None else prefix.repeat(k, 1, 1),
                        attention_mask=None if mask is None else mask.repeat(k, 1))
            if metric is mean_loss_metric:
                loss = engine.run(Run(rep, writes=writes, returns="loss", **skip)).loss  # (k * batch, pos - 1)
                per_row = _real_mean(loss, skip["attention_mask"])  # (k * batch,)
            elif isinstance(metric, LogitDiff):
                where = metric.pos if mask is None else metric.columns(mask).repeat(k)  # each row's column
                pair = engine.run(Run(rep, writes=writes, returns=Gather(where, metric.ids(b).repeat(k, 1)),
                                      **skip)).gathered
                per_row = pair[:, 0] - pair[:, 1]  # (k * batch,)
            else:  # your metric, on the logits of each block of rows
                logits = engine.run(Run(rep, writes=writes, **skip)).logits  # (k * batch, pos, vocab)
                blocks = [_evaluate(metric, logits[j * b:(j + 1) * b], target, mask, rows[j] is not None,
                                    per_row=not reduce) for j in range(k)]  # k x (batch,) or scalars
                per_row = None if reduce else torch.cat(blocks)
                if reduce:
                    values = [_mean(v, rows[j]) for j, v in enumerate(blocks)]
            if not reduce:
                values = [_rows_or_nan(per_row[j * b:(j + 1) * b], rows[j]) for j in range(k)]  # k x (batch,)
            elif per_row is not None:
                values = _block_means(per_row, k, b, rows)
            out[start:start + k] = torch.stack(values)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


# ----------------------------------------------------------------------------- public

@torch.no_grad()
def patch_heads(model, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
                by: PatchBy = "head", direction: Direction = "clean_to_corrupted",
                heads_per_pass: int = 8, progress: bool | None = None, site: HeadSite = "z",
                remote: Remote = False, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Metric with one head's activation patched from the source run into the target run.

    Args:
        model: HF causal LM of a supported architecture.
        clean, corrupted: (batch, pos) token ids of the same shape.
        metric: ``metric(logits, tokens) -> (batch,)`` or scalar; called with the target run's tokens
            (and ``attention_mask=`` when one is given).
        by: "head" (patch the head at every position) or "head_pos" (at one position).
        direction: see the module docstring.
        heads_per_pass: patches measured per forward pass (memory grows with it).
        progress: a tqdm bar over forward passes: None (default) once the work has lasted a few seconds,
            True always, False never (``interventions.primitives.progress``).
        site: "z" (the head's output, default), "q", "k" or "v" (k/v: per key/value head).
        remote: True runs on NDIF, "local" nnsight's offline simulation of that (module docstring).
        attention_mask: (batch, pos), 1 = real token: one mask for clean and corrupted, which must be
            padded identically (module docstring).

    Returns:
        (n_layers, n_heads) for by="head", (n_layers, n_heads, pos) for by="head_pos": the metric
        (mean over the batch) with that one patch applied (subtract the unpatched target run's metric
        for an effect); n_heads is n_kv_heads for k and v.
    """
    check_progress(progress)
    engine, source, target = _check_pair(model, clean, corrupted, direction, remote, attention_mask)
    metric = check_metric(metric, engine, target, attention_mask)
    if by not in PATCH_BY:
        raise ValueError(f"by={by!r} is unknown: use 'head' (one head at all positions) or 'head_pos' "
                         "(one head at one position)")
    if site not in HEAD_SITES:
        raise ValueError(f"site={site!r} is unknown: use one of {', '.join(HEAD_SITES)}")
    heads_per_pass = check_positive(heads_per_pass, "heads_per_pass")
    a = engine.adapter
    n_layers, n_heads, pos = a.n_layers, a.n_site_heads(site), source.shape[1]
    src = _source_run(engine, source, [Site(layer, site) for layer in range(n_layers)], metric, attention_mask,
                      one_position=by == "head_pos")
    patches: list[Write] = []
    for layer in range(n_layers):
        x = src[f"L{layer}.{site}"]  # (batch, pos, head, d_head)
        for head in range(n_heads):
            if by == "head":
                patches.append(Write(Site(layer, site), x[:, :, head], head=head))
            else:
                patches.extend(Write(Site(layer, site), x[:, p, head], head=head, pos=p) for p in range(pos))
    out = _measure(engine, target, patches, metric, heads_per_pass, progress, mask=attention_mask)
    return out.view(n_layers, n_heads) if by == "head" else out.view(n_layers, n_heads, pos)


@torch.no_grad()
def patch_residual(model, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
                   direction: Direction = "clean_to_corrupted", patches_per_pass: int = 8,
                   progress: bool | None = None, remote: Remote = False,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Metric with the residual stream entering one layer (``resid_pre``), at one position, patched from
    the source. Returns (n_layers, pos). ``remote``, ``attention_mask``: as ``patch_heads`` (a column's
    entry counts the rows with a real token there; NaN where none has)."""
    check_progress(progress)
    engine, source, target = _check_pair(model, clean, corrupted, direction, remote, attention_mask)
    metric = check_metric(metric, engine, target, attention_mask)
    patches_per_pass = check_positive(patches_per_pass, "patches_per_pass")
    n_layers, pos = engine.adapter.n_layers, source.shape[1]
    src = _source_run(engine, source, [Site(layer, "resid_pre") for layer in range(n_layers)], metric,
                      attention_mask, one_position=True)
    patches = [Write(Site(layer, "resid_pre"), src[f"L{layer}.resid_pre"][:, p], pos=p)
               for layer in range(n_layers) for p in range(pos)]
    return _measure(engine, target, patches, metric, patches_per_pass, progress,
                    mask=attention_mask).view(n_layers, pos)


@torch.no_grad()
def patch_patterns(model, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
                   direction: Direction = "clean_to_corrupted", heads_per_pass: int = 8,
                   progress: bool | None = None, remote: Remote = False,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Metric with one head's attention pattern (all query positions) patched from the source run.

    Runs the model on its eager attention path (``observable``) for both runs; the model is restored
    afterwards. Returns (n_layers, n_heads). Cannot run remotely (``remote`` raises ``NotRemotable``):
    ``observable`` edits the model, and a server's model is shared. ``attention_mask``: as
    ``patch_heads`` (one mask for both runs, so a real query's source pattern is zero on the padded keys
    the target masks too, and the whole (q_pos, k_pos) pattern is copied)."""
    check_progress(progress)
    if remote is not None and remote is not False and remote is not True and remote != "local":
        check_remote(model, remote)  # an unknown value: named as such
    if remote:
        raise NotRemotable("patch_patterns cannot run remotely: patterns need observable(), which adds a module to "
                           "every attention layer and switches the attention implementation, and a server's model is "
                           "shared and cannot be edited; patch z, q, k or v with patch_heads(..., remote=...) instead")
    engine, source, target = _check_pair(model, clean, corrupted, direction, attention_mask=attention_mask)
    metric = check_metric(metric, engine, target, attention_mask)
    heads_per_pass = check_positive(heads_per_pass, "heads_per_pass")
    n_layers, n_heads = engine.adapter.n_layers, engine.adapter.n_heads
    with observable(engine.inner):
        src = _source_run(engine, source, [Site(layer, "pattern") for layer in range(n_layers)], metric,
                          attention_mask)
        patches = [Write(Site(layer, "pattern"), src[f"L{layer}.pattern"][:, head], head=head)  # (batch, q, k)
                   for layer in range(n_layers) for head in range(n_heads)]
        return _measure(engine, target, patches, metric, heads_per_pass, progress,
                        mask=attention_mask).view(n_layers, n_heads)


@torch.no_grad()
def path_patch(model, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
               senders: HeadLike | Sequence[HeadLike], receivers: HeadLike | Sequence[HeadLike],
               receiver_input: Literal["q", "k", "v"] = "k", direction: Direction = "clean_to_corrupted",
               patches_per_pass: int = 8, remote: Remote = False, progress: bool | None = None,
               attention_mask: torch.Tensor | None = None, reduce: bool = True) -> torch.Tensor:
    """Path patching: the metric when only the path sender -> receiver's ``receiver_input`` carries
    the source run's sender output (Wang et al. 2022; Goldowsky-Dill et al. 2023).

    For each sender s and receiver r (r in a later layer than s), on the target tokens:
      1. run with s's output ``z`` set to its source-run value and the output of *every other head*
         frozen to its target-run value; record r's ``receiver_input`` (q, k or v), which now differs
         from the target run only through s's direct path (and MLPs in between, which are recomputed);
      2. run again, free, with only r's ``receiver_input`` replaced by the recorded value; measure (the
         blocks below the receivers' layer are the target run's: they are skipped, their output reused).
    Under grouped-query attention k and v belong to a key/value head shared by a group of query heads
    (``kv_head_of``): step 2 patches that key/value head and keeps the output ``z`` of the group's other
    query heads at its target-run value (what they compute from unpatched keys and values: their layer's
    input is the target run's), so the path ends in r alone, as without grouped-query attention.

    Args:
        clean, corrupted: (batch, pos) token ids of the same shape.
        metric: ``metric(logits, tokens) -> (batch,)`` or scalar, called with the target run's tokens.
        senders, receivers: heads ("L0H1", Head(0, 1) or (0, 1); one or a list).
        receiver_input: "q", "k" or "v": which input of the receiver the path ends in.
        direction: "clean_to_corrupted" (default: the target run is ``corrupted``, the sender's output
            comes from ``clean``) or "corrupted_to_clean" (target ``clean``, sender output from
            ``corrupted``). For K-composition on repeated prompts use the latter with ``corrupted`` another
            prompt of the same kind (a resampled sender): patched into an unrelated prompt, the keys can
            point the receiver at the right positions while its values carry the wrong tokens
            (``experiments.circuit``).
        patches_per_pass: (sender or sender x receiver) patches per forward pass.
        progress: a tqdm bar over the forward passes of step 2: None (default) once they have lasted a few
            seconds, True always, False never.
        remote: True runs on NDIF, "local" nnsight's offline simulation of that (module docstring): 2 +
            ceil(senders / patches_per_pass) + ceil(senders x receivers / patches_per_pass) jobs.
        attention_mask: (batch, pos), 1 = real token: one mask for clean and corrupted, which must be
            padded identically; every run of both steps takes it (module docstring).
        reduce: True (default) averages the metric over the batch; False keeps each prompt's value, for a
            standard error over prompts (the metric must then return (batch,), not a scalar).

    Returns:
        (len(senders), len(receivers)): the metric (mean over the batch) with that one path patched;
        with ``reduce=False`` (len(senders), len(receivers), batch), each prompt's, equal to one call per
        prompt up to float rounding (the batch is run together). It is not an effect: subtract the metric
        of the unpatched target run.

    Example:
        >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
        >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=20)).eval()
        >>> prompts = torch.randint(1, 20, (3, 4)).repeat(1, 2)  # A + A, length 4
        >>> path_patch(model, prompts, prompts.roll(1, 0), second_copy_loss(4), ["L0H0", "L0H1"], "L1H0",
        ...            direction="corrupted_to_clean", reduce=False).shape  # (senders, receivers, batch)
        torch.Size([2, 1, 3])
    """
    check_progress(progress)
    engine, source, target = _check_pair(model, clean, corrupted, direction, remote, attention_mask)
    metric = check_metric(metric, engine, target, attention_mask)
    patches_per_pass = check_positive(patches_per_pass, "patches_per_pass")
    if receiver_input not in ("q", "k", "v"):
        raise ValueError(f"receiver_input={receiver_input!r} is unknown: use 'q', 'k' or 'v'")
    if reduce is not True and reduce is not False:
        raise ValueError(f"reduce={reduce!r} must be True (mean over the batch) or False (one value per prompt)")
    a = engine.adapter
    senders, receivers = parse_heads(senders), parse_heads(receivers)
    for role, heads in (("senders", senders), ("receivers", receivers)):
        if len(set(heads)) != len(heads):
            dup = sorted({str(h) for h in heads if heads.count(h) > 1})
            raise ValueError(f"{role} list {', '.join(dup)} more than once: pass each head once")
    check_heads(senders + receivers, a.n_layers, a.n_heads)
    for s in senders:
        for r in receivers:
            if r.layer <= s.layer:
                raise ValueError(f"receiver {r} is not after sender {s}: a receiver must sit in a later layer "
                                 "than every sender (its input is computed before the sender's layer runs)")
    kind = receiver_input
    shared = kind in ("k", "v") and a.n_kv_heads < a.n_heads  # a key/value head serves several query heads
    r_layers = sorted({r.layer for r in receivers})
    top = max(r_layers)
    z_sites = [Site(layer, "z") for layer in range(top)]
    mask = attention_mask
    src = _source_run(engine, source, [Site(s.layer, "z") for s in senders], metric, mask, per_row=not reduce)
    # step 2 patches nothing below the first receiver layer: those blocks are the target run's (locally
    # skipped; remotely recomputed, as sending their output for every block of rows would cost more)
    first = 0 if engine.remote else min(r_layers)
    tgt = engine.run(Run(target, reads=z_sites + ([Site(top, "z")] if shared else [])
                         + ([Site(first, "resid_pre")] if first > 0 else []), attention_mask=mask, returns="none")).acts
    b = target.shape[0]
    # 1. one block of rows per sender: every head below the top receiver layer frozen, the sender patched
    recorded: dict[Head, dict[str, torch.Tensor]] = {}
    for start in range(0, len(senders), patches_per_pass):
        group = senders[start:start + patches_per_pass]
        k = len(group)
        # the same tensor in every block of rows: one object, sent once (not k copies) on a remote run
        writes = [Write(site, tgt[str(site)], rows=slice(j * b, (j + 1) * b)) for site in z_sites for j in range(k)]
        writes += [Write(Site(s.layer, "z"), src[f"L{s.layer}.z"][:, :, s.head], rows=slice(j * b, (j + 1) * b),
                         head=s.head) for j, s in enumerate(group)]
        acts = engine.run(Run(target.repeat(k, 1), writes=writes, reads=[Site(layer, kind) for layer in r_layers],
                              attention_mask=None if mask is None else mask.repeat(k, 1), returns="none")).acts
        for j, s in enumerate(group):
            recorded[s] = {name: x[j * b:(j + 1) * b] for name, x in acts.items()}
    # 2. one block of rows per (sender, receiver): only the receiver's input patched
    def patch(s: Head, r: Head) -> tuple[Write, ...]:
        if kind == "q":
            return (Write(Site(r.layer, kind), recorded[s][f"L{r.layer}.q"][:, :, r.head], head=r.head),)
        kv = kv_head_of(r.head, a.n_heads, a.n_kv_heads)
        others = [h for h in range(a.n_heads) if h != r.head and kv_head_of(h, a.n_heads, a.n_kv_heads) == kv]
        return ((Write(Site(r.layer, kind), recorded[s][f"L{r.layer}.{kind}"][:, :, kv], head=kv),)
                + tuple(Write(Site(r.layer, "z"), tgt[f"L{r.layer}.z"][:, :, h], head=h) for h in others))

    patches = [patch(s, r) for s in senders for r in receivers]
    out = _measure(engine, target, patches, metric, patches_per_pass, progress, from_layer=first,
                   prefix=tgt[f"L{first}.resid_pre"] if first > 0 else None, mask=mask, reduce=reduce)
    return out.view(len(senders), len(receivers)) if reduce else out.view(len(senders), len(receivers), b)
