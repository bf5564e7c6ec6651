"""Head ablations as small objects, applied together in one trace.

* ``ZeroAblation(heads)``: the head's output (its slice of the ``z`` site) set to 0.
* ``MeanAblation(heads, reference, per_position=True)``: replaced by its mean over a reference set of
  sequences, separately for each position (default: a head's typical output depends on how much
  context it has), or pooled over all positions (``per_position=False``).
* ``ResampleAblation(heads, reference, seed)``: replaced by its output on another sequence, one
  reference row drawn (seeded) for each row of the batch (never the row itself when the reference is
  the tokens).
* ``FunctionAblation(heads, fn)``: replaced by ``fn(z, head)``, a function of the activation it
  replaces (batch, pos, d_head): e.g. scaling, noise, projecting out a direction.
* ``PatternPreserving(ablation)``: the paper's main kind. First a clean run records every attention
  pattern; then the ablation runs with every pattern forced to its clean value, so only the
  downstream *value* paths change (no head can re-route attention in response).

On a left-padded batch (``attention_mask``) mean and resample ablation index their reference by each
token's *unpadded* position, so a padded run equals the unpadded runs at every real token (tested).
References themselves are unpadded sequences (a reference holding the run's padded rows, e.g. the
padded tokens themselves, is refused).

Remotely (``remote=True`` on NDIF, or ``"local"``, see ``interventions.engine.remote``) zero, mean and
resample ablations run (a mean or resample reference is one more remote run; only the ablated heads'
outputs come back, for a mean only their mean over the reference sequences, and the replacements are
computed here), and so does your own ``Ablation`` whose ``value`` is a tensor or
None; ``PatternPreserving``, ``FunctionAblation`` and an ``Ablation`` whose ``value`` is a function of the
activation are refused before anything is sent (``prepare_ablations``).

Subclass ``Ablation`` and override ``value`` for your own kind; sweeps accept it too. A tensor it returns
must be exactly (batch, pos, d_head) (anything else is refused with ValueError before the ablated run).

Example:
    >>> import torch
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=20)).eval()
    >>> tokens = torch.randint(0, 20, (2, 8))
    >>> run_with_ablations(model, tokens, [ZeroAblation("L1H0")]).shape
    torch.Size([2, 8, 20])
    >>> halved = FunctionAblation("L0H1", lambda z, head: 0.5 * z)
    >>> run_with_ablations(model, tokens, halved).shape
    torch.Size([2, 8, 20])
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch

from ..engine.adapters import get_adapter, observable
from ..engine.devices import output_device
from ..engine.heads import Head, HeadLike, check_heads, parse_heads
from ..engine.sites import Site
from ..engine.remote import NotRemotable, Remote
from ..engine.tracing import (Engine, Read, Result, Run, Write, check_mask, check_tokens, check_value, position_ids,
                              unwrap, without_grad)


class Ablation:
    """Base class: which heads, and what each is replaced with on a given batch."""

    heads: tuple[Head, ...]

    def __init__(self, heads: HeadLike | Iterable[HeadLike]):
        self.heads = parse_heads(heads)

    def prepare(self, model, tokens: torch.Tensor, remote: Remote = False) -> None:
        """Compute anything that depends on the model (reference activations), on NDIF when ``remote``;
        validate."""
        a = get_adapter(unwrap(model))
        check_heads(self.heads, a.n_layers, a.n_heads)

    def value(self, head: Head, tokens: torch.Tensor, row_offset: int = 0, positions: torch.Tensor | None = None):
        """Replacement for ``head`` on ``tokens`` (batch, pos): a tensor of exactly (batch, pos, d_head)
        (no broadcasting: a (batch, d_head) tensor is refused, not read as (pos, d_head)), ``None`` for
        zero, or a function of the head's current output (batch, pos, d_head) returning one.

        ``row_offset``: index of ``tokens``' first row in the whole batch, when a batch is run in chunks
        (so a per-row choice, as in resampling, does not depend on how the batch was split).
        ``positions``: (batch, pos) unpadded position of every token (padded batches); None: 0..pos-1.
        A function cannot run remotely (refused before anything is sent)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(str, self.heads))})"


def prepare_ablation(abl: Ablation, model, tokens: torch.Tensor, remote: Remote = False) -> None:
    """``abl.prepare``, passing ``remote`` where its signature takes it (by name or ``**kwargs``; subclasses
    written for ``prepare(model, tokens)`` keep working; they compute here)."""
    if remote and "remote" in _param_names(abl.prepare, ("remote",)):
        abl.prepare(model, tokens, remote=remote)
    else:
        abl.prepare(model, tokens)


def check_remotable(ablations: Sequence[Ablation], remote: Remote) -> None:
    """Refuse, before anything is sent, ablations that cannot run remotely (``interventions.engine.remote``)."""
    if not remote:
        return
    for abl in ablations:
        if isinstance(abl, PatternPreserving):
            raise NotRemotable(f"{abl!r} cannot run remotely: freezing patterns needs observable(), which adds a "
                               "module to every attention layer and switches the attention implementation, and a server's "
                               "model is shared and cannot be edited; run the inner ablation remotely without "
                               "PatternPreserving, or run it locally")
        if isinstance(abl, FunctionAblation):
            raise NotRemotable(f"{abl!r} cannot run remotely: its function would run inside the trace on the server, "
                               "where this package is not installed (the function is handed a Head of it) and your "
                               "code arrives only as far as nnsight can ship it by source, which cannot be checked "
                               "before sending; compute the replacement here and return a tensor from a custom "
                               "Ablation's value(), or use Zero/Mean/ResampleAblation")


def prepare_ablations(ablations: Sequence[Ablation], model, tokens: torch.Tensor, remote: Remote = False,
                      attention_mask: torch.Tensor | None = None, rows: int | None = None, row_offset: int = 0) -> None:
    """Validate ``ablations`` and prepare each on ``tokens`` (reference runs), before a call's first run.

    Remotely, what a custom ablation (a class with its own ``value``) writes is known only by asking it:
    it is prepared first and asked for its values as the call's first run will ask (rows ``:rows`` of
    ``tokens`` at ``row_offset``), so a function of the activation (``NotRemotable``) or a value that
    does not fit a head (``ValueError``) is refused before any reference run or run of the call is sent
    (one that turns into a function only on later rows is refused by the engine at that run). Asking
    leaves torch's CPU generator as it was (a value drawing noise from it gives the same draws)."""
    check_remotable(ablations, remote)
    check_ablations(ablations, model, tokens)
    check_unpadded_references(ablations, tokens, attention_mask, row_offset)
    custom = [abl for abl in ablations if remote and _own_value(abl)]
    for abl in custom:
        prepare_ablation(abl, model, tokens, remote)
        first = tokens[:rows]
        positions = None if attention_mask is None else position_ids(attention_mask[:rows], first)
        _check_values(abl, get_adapter(unwrap(model)).d_head, first, row_offset, positions)
    for abl in ablations:
        if not any(abl is c for c in custom):
            prepare_ablation(abl, model, tokens, remote)


def _own_value(abl: Ablation) -> bool:
    """Whether ``abl``'s class defines its own ``value`` (not zero, mean or resample)."""
    return type(abl).value not in (Ablation.value, MeanAblation.value, ResampleAblation.value)


def _check_values(abl: Ablation, d_head: int, tokens: torch.Tensor, row_offset: int, positions) -> None:
    """Raise unless every head's value of ``abl`` on ``tokens`` can be sent: zero or a tensor that fits."""
    with torch.random.fork_rng(devices=[]):
        for h in abl.heads:
            value = ablation_value(abl, h, tokens, row_offset, positions, d_head=d_head)
            if callable(value) and not torch.is_tensor(value):
                raise NotRemotable(f"{abl!r}.value returned a function of the activation for {h}: it cannot run "
                                   "remotely (it would run inside the trace on the server, which has neither this "
                                   "package nor your code): compute the replacement here and return a tensor, or "
                                   "run locally")
            check_value(value, (*tokens.shape, d_head), f"{abl!r}.value for {h}")


def check_ablations(ablations: Sequence[Ablation], model, tokens: torch.Tensor) -> None:
    """What ``prepare`` validates (heads; a reference's ids and length), for every ablation before the first
    prepares: a reference run is a forward (remotely a job), and a later ablation's bad input must not follow it."""
    if len(ablations) < 2:  # one ablation validates in its prepare, before its run
        return
    a = get_adapter(unwrap(model))
    for abl in ablations:
        abl = abl.inner if isinstance(abl, PatternPreserving) else abl
        check_heads(abl.heads, a.n_layers, a.n_heads)
        if isinstance(abl, _ReferenceAblation):
            check_tokens(abl.reference, a, name="reference")
            abl.check_length(tokens)


def check_unpadded_references(ablations: Sequence[Ablation], tokens: torch.Tensor,
                              attention_mask: torch.Tensor | None, row_offset: int = 0) -> None:
    """Refuse a mean or resample reference that holds a padded row of this call's ``tokens`` (the row of the
    same index: e.g. ``MeanAblation(heads, tokens)`` on a padded batch). A reference is run as unpadded
    sequences, so its pad ids would be taken for tokens, at the wrong positions (left padding): the
    replacement at a row's position t would average pad tokens' outputs in."""
    if attention_mask is None:
        return
    check_mask(attention_mask, tokens)
    padded = ~attention_mask.bool().all(-1).cpu()  # (batch,) rows with padding
    if not bool(padded.any()):
        return
    for abl in ablations:
        inner = abl.inner if isinstance(abl, PatternPreserving) else abl
        if not isinstance(inner, _ReferenceAblation) or not torch.is_tensor(inner.reference):
            continue
        same = inner.own_rows(tokens, row_offset) & padded
        if bool(same.any()):
            row = int(same.nonzero()[0])
            raise ValueError(f"{abl!r}: its reference holds row {row_offset + row} of the tokens, which is padded "
                             "(attention_mask has zeros there), but a reference is run as unpadded sequences: its pad "
                             "ids would count as tokens; pass reference= unpadded sequences at least as long as the "
                             "tokens")


def _value_params(method) -> frozenset[str]:
    """Parameter names of an ``Ablation.value`` (a bound method: cached per function; signature
    inspection costs tens of microseconds, a noticeable share of one small trace)."""
    fn = getattr(method, "__func__", None)
    if fn is None:
        return _param_names(method)
    params = _VALUE_PARAMS.get(fn)
    if params is None:
        params = _VALUE_PARAMS[fn] = _param_names(method)
    return params


def _param_names(method, optional=("row_offset", "positions")) -> frozenset[str]:
    """Names of ``method``'s parameters; a ``**kwargs`` parameter takes every ``optional`` name (a subclass
    passing its keyword arguments on to ``super()`` must not lose them)."""
    params = inspect.signature(method).parameters
    names = frozenset(params)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        names |= set(optional)
    return names


_VALUE_PARAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # function -> its parameter names


def ablation_value(abl: Ablation, head: Head, tokens: torch.Tensor, row_offset: int = 0,
                   positions: torch.Tensor | None = None, *, d_head: int):
    """``abl.value`` called with the arguments its signature takes (subclasses written for
    ``value(head, tokens)`` keep working); a tensor must have exactly the documented shape (batch, pos,
    d_head): a broadcastable one (e.g. (batch, d_head) when batch == pos) would be taken silently for
    another layout. ValueError naming the fix otherwise."""
    value = _called_value(abl, head, tokens, row_offset, positions)
    want = (*tokens.shape, d_head)
    if torch.is_tensor(value) and tuple(value.shape) != want:
        raise ValueError(f"{abl!r}.value for {head}: a value of shape {tuple(value.shape)} does not fit the head's "
                         f"output (batch, pos, d_head) = {want}: return a tensor of exactly that shape (e.g. a "
                         "per-row (batch, d_head) value as value[:, None].expand(-1, pos, -1)), None (zero) or a "
                         "function of the activation")
    return value


def _called_value(abl: Ablation, head: Head, tokens: torch.Tensor, row_offset: int, positions):
    """``abl.value`` with the arguments its signature takes, unchecked (``PatternPreserving`` passes its
    inner ablation's value on; ``ablation_value`` checks it)."""
    params = _value_params(abl.value)
    kwargs = {}
    if "row_offset" in params:
        kwargs["row_offset"] = row_offset
    if "positions" in params:
        kwargs["positions"] = positions
    return abl.value(head, tokens, **kwargs)


class ZeroAblation(Ablation):
    """Set the heads' outputs to zero."""


class FunctionAblation(Ablation):
    """Replace each head's output z (batch, pos, d_head) by ``fn(z, head)`` (same shape)."""

    def __init__(self, heads, fn: Callable[[torch.Tensor, Head], torch.Tensor]):
        super().__init__(heads)
        if not callable(fn):
            raise ValueError("fn must be a function (z (batch, pos, d_head), head) -> replacement of z's shape")
        self.fn = fn

    def value(self, head, tokens, row_offset=0, positions=None):
        return lambda z: self.fn(z, head)


class _ReferenceAblation(Ablation):
    mean_rows = False  # prepare keeps each head's (n, pos_ref, d_head) outputs; True: their mean (pos_ref, d_head)

    def __init__(self, heads, reference: torch.Tensor):
        super().__init__(heads)
        if not torch.is_tensor(reference):
            raise ValueError("reference must be a (n_sequences, pos) LongTensor of token ids")
        self.reference = reference
        self._acts: dict[Head, torch.Tensor] = {}

    def prepare(self, model, tokens, remote: Remote = False):
        """Run the reference and keep the heads' outputs, every call: a cache keyed on the model and the
        reference would miss edits that bump no version counter (``p.data.copy_``, ``reference.data[...] =``)
        and give stale replacements silently. A primitive prepares once per call (all chunks share it)."""
        super().prepare(model, tokens)
        a = get_adapter(unwrap(model))
        check_tokens(self.reference, a, name="reference")
        self.check_length(tokens)
        by_layer: dict[int, list[int]] = {}
        for h in self.heads:
            if h.head not in by_layer.setdefault(h.layer, []):
                by_layer[h.layer].append(h.head)
        # only these heads, and for a mean only the mean, are read back (remotely, only that travels)
        reads = [Read(Site(layer, "z"), heads=heads, mean_rows=self.mean_rows) for layer, heads in sorted(by_layer.items())]
        acts = Engine(model, remote).run(Run(self.reference, reads=reads, returns="none")).acts
        self._acts = {h: acts[f"L{h.layer}.z"][..., by_layer[h.layer].index(h.head), :] for h in self.heads}

    def own_rows(self, tokens: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        """(batch,) bool: which batch rows (at ``row_offset ..``) are the reference's row of the same index
        (e.g. the reference is the tokens, as ``ablation_sweep(kind="resample")`` uses by default). Row by
        row, so that the answer for a row depends neither on the other rows nor on how the batch is chunked."""
        ref, (b, p) = self.reference, tokens.shape
        own = torch.zeros(b, dtype=torch.bool)
        n = min(b, ref.shape[0] - row_offset)
        if ref.dim() == 2 and n > 0 and p <= ref.shape[1]:
            own[:n] = (ref[row_offset:row_offset + n, :p] == tokens[:n].to(ref.device, ref.dtype)).all(-1).cpu()
        return own

    def check_length(self, tokens: torch.Tensor) -> None:
        """Raise if the reference is too short for ``tokens`` (before any reference run)."""

    @staticmethod
    def _positions(tokens, positions, device):
        return (position_ids(None, tokens) if positions is None else positions).to(device)


class MeanAblation(_ReferenceAblation):
    """Replace each head's output by its mean over ``reference`` sequences (per position by default)."""

    mean_rows = True

    def __init__(self, heads, reference: torch.Tensor, per_position: bool = True):
        super().__init__(heads, reference)
        if not isinstance(per_position, bool):
            raise ValueError(f"per_position={per_position!r} must be True (a mean per position) or False (pooled)")
        self.per_position = per_position

    def check_length(self, tokens):
        if self.per_position and self.reference.shape[1] < tokens.shape[1]:
            raise ValueError(f"reference has {self.reference.shape[1]} positions but the tokens have "
                             f"{tokens.shape[1]}: per-position means need a reference at least as long "
                             "(or pass per_position=False)")

    def value(self, head, tokens, row_offset=0, positions=None):
        mean = self._acts[head]  # (pos_ref, d_head): the mean over the reference sequences
        b, p = tokens.shape
        if self.per_position:
            return mean[self._positions(tokens, positions, mean.device)]  # (batch, pos, d_head)
        return mean.mean(0)[None, None].expand(b, p, -1)


class ResampleAblation(_ReferenceAblation):
    """Replace each head's output by its output on a (seeded) random reference sequence."""

    def __init__(self, heads, reference: torch.Tensor, seed: int = 0):
        super().__init__(heads, reference)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r} must be an integer (it seeds the draw of reference rows)")
        self.seed = seed

    def check_length(self, tokens):
        if self.reference.shape[1] < tokens.shape[1]:
            raise ValueError(f"reference has {self.reference.shape[1]} positions, fewer than the tokens' "
                             f"{tokens.shape[1]}: pass reference sequences at least as long")

    def rows(self, batch: int, offset: int = 0, exclude_self: bool | torch.Tensor = False) -> torch.Tensor:
        """Reference row (batch,) used for rows ``offset .. offset + batch - 1`` of the input batch:
        a seeded draw for the whole batch, so chunking a batch does not change any row's choice.
        ``exclude_self``: batch row i *is* reference row i (the reference is the tokens themselves), so
        each row draws from the other rows: a row resampled from itself would not be ablated at all. A
        (batch,) bool tensor says it row by row (rows marked False draw as without it)."""
        n = self.reference.shape[0]
        own = torch.as_tensor(exclude_self, dtype=torch.bool).expand(batch)
        g = torch.Generator().manual_seed(self.seed)
        if not bool(own.any()):
            return torch.randint(0, n, (offset + batch,), generator=g)[offset:]
        if n < 2:
            raise ValueError("the reference is the ablated sequence itself and holds no other: resampling would "
                             "replace the head's output by itself; pass reference= other sequences")
        r = torch.randint(0, n - 1, (offset + batch,), generator=g)[offset:]
        other = r + (r >= torch.arange(offset, offset + batch))  # every row but its own
        if bool(own.all()):
            return other
        free = torch.randint(0, n, (offset + batch,), generator=torch.Generator().manual_seed(self.seed))[offset:]
        return torch.where(own, other, free)


    def value(self, head, tokens, row_offset=0, positions=None):
        acts = self._acts[head]  # (n, pos_ref, d_head)
        b = tokens.shape[0]
        rows = self.rows(b, row_offset, self.own_rows(tokens, row_offset)).to(acts.device)
        return acts[rows[:, None], self._positions(tokens, positions, acts.device)]  # (batch, pos, d_head)


class PatternPreserving(Ablation):
    """Run ``inner`` with every attention pattern frozen to its value on the clean run.

    Both runs take ``observable``'s eager attention path, not the model's default (SDPA). The two paths'
    losses differ by rounding (bfloat16: ~0.01 nats on a token, more with large attention scores; float32:
    ~1e-6), so compare an ablated loss with a clean one on the same path, ``with observable(model):
    per_token_loss(model, tokens)`` (``ablation_sweep`` does this itself)."""

    def __init__(self, inner: Ablation):
        if isinstance(inner, PatternPreserving) or not isinstance(inner, Ablation):
            raise ValueError("PatternPreserving wraps one ZeroAblation, MeanAblation, ResampleAblation, "
                             "FunctionAblation or Ablation subclass")
        self.inner = inner
        self.heads = inner.heads

    def prepare(self, model, tokens, remote: Remote = False):
        prepare_ablation(self.inner, model, tokens, remote)

    def value(self, head, tokens, row_offset=0, positions=None):
        return _called_value(self.inner, head, tokens, row_offset, positions)

    def __repr__(self) -> str:
        return f"PatternPreserving({self.inner!r})"


def as_ablations(ablations) -> list[Ablation]:
    """One ablation or a sequence of them, validated: each must be an ``Ablation``, and no head may be
    ablated twice (within one ablation or across several): a duplicate or conflicting pair would
    otherwise resolve silently, the last one winning.

    >>> as_ablations([ZeroAblation("L1H0"), ZeroAblation("L1H0")])
    Traceback (most recent call last):
    ...
    ValueError: head L1H0 is ablated more than once (ZeroAblation(L1H0) and ZeroAblation(L1H0)): ablate each head once
    """
    if isinstance(ablations, Ablation):
        ablations = [ablations]
    if not isinstance(ablations, Iterable):
        raise ValueError(f"{ablations!r} is not an ablation or a list of them: pass ZeroAblation, MeanAblation, "
                         "ResampleAblation, FunctionAblation or PatternPreserving objects ([] for none)")
    out = list(ablations)
    owner: dict = {}
    for abl in out:
        if not isinstance(abl, Ablation):
            raise ValueError(f"{abl!r} is not an ablation: pass ZeroAblation, MeanAblation, ResampleAblation, "
                             "FunctionAblation or PatternPreserving objects")
        for h in abl.heads:
            if h in owner:
                raise ValueError(f"head {h} is ablated more than once ({owner[h]!r} and {abl!r}): ablate each "
                                 "head once")
            owner[h] = abl
    return out


def head_writes(ablations: Sequence[Ablation], tokens: torch.Tensor, d_head: int, row_offset: int = 0,
                positions: torch.Tensor | None = None, rows: slice | None = None) -> list[Write]:
    """The ``z`` writes of ``ablations`` on ``tokens`` (optionally into batch ``rows`` of a larger run),
    each value checked by ``ablation_value``."""
    return [Write(Site(h.layer, "z"), ablation_value(abl, h, tokens, row_offset, positions, d_head=d_head),
                  rows=rows, head=h.head)
            for abl in ablations for h in abl.heads]


@without_grad
def run_with_ablations(model, tokens: torch.Tensor, ablations: Ablation | Sequence[Ablation] = (),
                       attention_mask: torch.Tensor | None = None, row_offset: int = 0,
                       remote: Remote = False) -> torch.Tensor:
    """Logits (batch, pos, vocab) of ``model`` on ``tokens`` with all ``ablations`` applied at once.

    If any ablation is ``PatternPreserving``, all patterns are frozen to the clean run's.
    ``attention_mask`` (batch, pos; 1 = real token) for left-padded batches. ``row_offset``: index of
    ``tokens``' first row in a larger batch run in chunks (see ``Ablation.value``). ``remote``: True runs
    on NDIF (``model`` an ``nnsight.LanguageModel`` made from a hub id), ``"local"`` nnsight's offline
    simulation of that (``interventions.engine.remote``); the whole logits come back, so for losses
    prefer ``per_token_loss``, which reduces them on the server. On a model split across devices the
    logits come back on its first parameter's device."""
    logits = ablation_run(model, tokens, ablations, attention_mask, row_offset, remote).logits
    return logits if remote else logits.to(output_device(unwrap(model)))


@without_grad
def ablation_run(model, tokens: torch.Tensor, ablations: Ablation | Sequence[Ablation] = (),
                 attention_mask: torch.Tensor | None = None, row_offset: int = 0, remote: Remote = False,
                 returns="logits", prepared: bool = False) -> Result:
    """``run_with_ablations`` returning the engine's ``Result`` of a run that returns ``returns``
    ("logits", "loss" or a ``Gather``; see ``interventions.engine.tracing.Run``). ``prepared``: the caller
    already ran ``prepare_ablation`` on every ablation in this call (a chunked batch prepares once)."""
    ablations = as_ablations(ablations)
    engine = Engine(model, remote)
    check_tokens(tokens, engine.adapter)  # before any (reference) work
    check_remotable(ablations, engine.remote)
    if not prepared:
        prepare_ablations(ablations, model, tokens, engine.remote, attention_mask, row_offset=row_offset)
    positions = None if attention_mask is None else position_ids(attention_mask, tokens)
    writes = head_writes(ablations, tokens, engine.adapter.d_head, row_offset, positions)
    if not any(isinstance(a, PatternPreserving) for a in ablations):
        return engine.run(Run(tokens, writes=writes, attention_mask=attention_mask, returns=returns))
    with observable(engine.inner):
        _, frozen = frozen_patterns(engine, tokens, attention_mask)
        return engine.run(Run(tokens, writes=frozen + writes, attention_mask=attention_mask, returns=returns))


def frozen_patterns(engine: Engine, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    returns="none") -> tuple[Result, list[Write]]:
    """Inside ``observable``: the clean run of ``tokens`` (returning ``returns``) and the writes that freeze
    every layer's attention pattern to it (what ``PatternPreserving`` runs under)."""
    sites = [Site(layer, "pattern") for layer in range(engine.adapter.n_layers)]
    clean = engine.run(Run(tokens, reads=sites, attention_mask=attention_mask, returns=returns))
    return clean, [Write(s, clean.acts[str(s)]) for s in sites]
