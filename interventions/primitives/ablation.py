"""Head ablations as small objects, applied together in one trace.

* ``ZeroAblation(heads)``: the head's output (its slice of the o_proj input) set to 0.
* ``MeanAblation(heads, reference, per_position=True)``: replaced by its mean over a reference set of
  sequences, separately for each position (default: a head's typical output depends on how much
  context it has), or pooled over all positions (``per_position=False``).
* ``ResampleAblation(heads, reference, seed)``: replaced by its output on another sequence, one
  reference row drawn (seeded) for each row of the batch.
* ``PatternPreserving(ablation)``: the paper's main kind. First a clean run records every attention
  pattern; then the ablation runs with every pattern forced to its clean value, so only the
  downstream *value* paths change (no head can re-route attention in response).

Example:
    >>> import torch
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=20)).eval()
    >>> tokens = torch.randint(0, 20, (2, 8))
    >>> logits = run_with_ablations(model, tokens, [ZeroAblation("L1H0")])
    >>> logits.shape
    torch.Size([2, 8, 20])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..engine.adapters import get_adapter, observable
from ..engine.heads import Head, HeadLike, check_heads, parse_heads
from ..engine.tracing import LayerEdits, check_tokens, head_outputs, run_edited, unwrap


class Ablation:
    """Base class: which heads, and what each is replaced with on a given batch."""

    heads: tuple[Head, ...]

    def __init__(self, heads: HeadLike | Iterable[HeadLike]):
        self.heads = parse_heads(heads)

    def prepare(self, model, tokens: torch.Tensor) -> None:
        """Compute anything that depends on the model (reference activations); validate."""
        a = get_adapter(unwrap(model))
        check_heads(self.heads, a.n_layers, a.n_heads)

    def value(self, head: Head, tokens: torch.Tensor, row_offset: int = 0) -> torch.Tensor | None:
        """Replacement (batch, pos, d_head) for ``head`` on ``tokens``; None means zero.

        ``row_offset``: index of ``tokens``' first row in the whole batch, when a batch is run in chunks
        (so a per-row choice, as in resampling, does not depend on how the batch was split)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(str, self.heads))})"


class ZeroAblation(Ablation):
    """Set the heads' outputs to zero."""


class _ReferenceAblation(Ablation):
    def __init__(self, heads, reference: torch.Tensor):
        super().__init__(heads)
        if not torch.is_tensor(reference):
            raise ValueError("reference must be a (n_sequences, pos) LongTensor of token ids")
        self.reference = reference
        self._acts: dict[Head, torch.Tensor] = {}
        self._key = None

    @staticmethod
    def _state_key(model, reference: torch.Tensor) -> tuple:
        """Identifies the model *and its current weights* and the reference's contents: in-place updates
        (``load_state_dict``, an optimiser step) bump a tensor's ``_version``, so cached reference
        activations are recomputed instead of going stale."""
        inner = unwrap(model)
        return (id(inner), tuple((p.data_ptr(), p._version) for p in inner.parameters()),
                reference.data_ptr(), reference._version, tuple(reference.shape))

    def prepare(self, model, tokens):
        super().prepare(model, tokens)
        a = get_adapter(unwrap(model))
        check_tokens(self.reference, a, name="reference")
        key = self._state_key(model, self.reference)
        if self._key == key and self._acts:
            return
        layers = sorted({h.layer for h in self.heads})
        outs = head_outputs(model, self.reference, layers)  # {layer: (n, pos, head, d_head)}
        self._acts = {h: outs[h.layer][:, :, h.head] for h in self.heads}  # (n, pos, d_head)
        self._key = key


class MeanAblation(_ReferenceAblation):
    """Replace each head's output by its mean over ``reference`` sequences (per position by default)."""

    def __init__(self, heads, reference: torch.Tensor, per_position: bool = True):
        super().__init__(heads, reference)
        self.per_position = per_position

    def prepare(self, model, tokens):
        super().prepare(model, tokens)
        if self.per_position and self.reference.shape[1] < tokens.shape[1]:
            raise ValueError(f"reference has {self.reference.shape[1]} positions but the tokens have "
                             f"{tokens.shape[1]}: per-position means need a reference at least as long "
                             "(or pass per_position=False)")

    def value(self, head, tokens, row_offset=0):
        acts = self._acts[head]  # (n, pos_ref, d_head)
        b, p = tokens.shape
        if self.per_position:
            return acts[:, :p].mean(0)[None].expand(b, p, -1)
        return acts.mean((0, 1))[None, None].expand(b, p, -1)


class ResampleAblation(_ReferenceAblation):
    """Replace each head's output by its output on a (seeded) random reference sequence."""

    def __init__(self, heads, reference: torch.Tensor, seed: int = 0):
        super().__init__(heads, reference)
        self.seed = seed

    def prepare(self, model, tokens):
        super().prepare(model, tokens)
        if self.reference.shape[1] < tokens.shape[1]:
            raise ValueError(f"reference has {self.reference.shape[1]} positions, fewer than the tokens' "
                             f"{tokens.shape[1]}: pass reference sequences at least as long")

    def rows(self, batch: int, offset: int = 0) -> torch.Tensor:
        """Reference row (batch,) used for rows ``offset .. offset + batch - 1`` of the input batch:
        a seeded draw for the whole batch, so chunking a batch does not change any row's choice."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, self.reference.shape[0], (offset + batch,), generator=g)[offset:]

    def value(self, head, tokens, row_offset=0):
        b, p = tokens.shape
        return self._acts[head][self.rows(b, row_offset).to(self._acts[head].device), :p]


class PatternPreserving(Ablation):
    """Run ``inner`` with every attention pattern frozen to its value on the clean run."""

    def __init__(self, inner: Ablation):
        if isinstance(inner, PatternPreserving) or not isinstance(inner, Ablation):
            raise ValueError("PatternPreserving wraps one ZeroAblation, MeanAblation or ResampleAblation")
        self.inner = inner
        self.heads = inner.heads

    def prepare(self, model, tokens):
        self.inner.prepare(model, tokens)

    def value(self, head, tokens, row_offset=0):
        return self.inner.value(head, tokens, row_offset)

    def __repr__(self) -> str:
        return f"PatternPreserving({self.inner!r})"


def check_ablations(ablations: Ablation | Sequence[Ablation]) -> list[Ablation]:
    """The ablations as a list, after checking that each is an ``Ablation`` and that no head is ablated
    twice (within one ablation or across several): a duplicate or conflicting pair would otherwise
    resolve silently, the last one winning.

    >>> check_ablations([ZeroAblation("L1H0"), ZeroAblation("L1H0")])
    Traceback (most recent call last):
    ...
    ValueError: head L1H0 is ablated more than once (ZeroAblation(L1H0) and ZeroAblation(L1H0)): ablate each head once
    """
    if isinstance(ablations, Ablation):
        ablations = [ablations]
    ablations = list(ablations)
    owner: dict[Head, Ablation] = {}
    for abl in ablations:
        if not isinstance(abl, Ablation):
            raise ValueError(f"{abl!r} is not an ablation: pass ZeroAblation, MeanAblation, ResampleAblation "
                             "or PatternPreserving objects")
        for h in abl.heads:
            if h in owner:
                raise ValueError(f"head {h} is ablated more than once ({owner[h]!r} and {abl!r}): ablate each "
                                 "head once")
            owner[h] = abl
    return ablations


def _edits(ablations: Sequence[Ablation], tokens: torch.Tensor, row_offset: int = 0) -> dict[int, LayerEdits]:
    edits: dict[int, LayerEdits] = {}
    for abl in ablations:
        for h in abl.heads:
            # only pass row_offset when set, so subclasses with value(head, tokens) keep working
            v = abl.value(h, tokens, row_offset) if row_offset else abl.value(h, tokens)
            edits.setdefault(h.layer, LayerEdits()).heads[h.head] = v
    return edits


@torch.no_grad()
def run_with_ablations(model, tokens: torch.Tensor, ablations: Ablation | Sequence[Ablation] = (),
                       attention_mask: torch.Tensor | None = None, row_offset: int = 0) -> torch.Tensor:
    """Logits (batch, pos, vocab) of ``model`` on ``tokens`` with all ``ablations`` applied at once.

    If any ablation is ``PatternPreserving``, all patterns are frozen to the clean run's.
    ``row_offset``: index of ``tokens``' first row in a larger batch run in chunks (see ``Ablation.value``)."""
    ablations = check_ablations(ablations)  # duplicates and non-ablations raise before any work
    check_tokens(tokens, get_adapter(unwrap(model)))  # before any (reference) work
    for abl in ablations:
        abl.prepare(model, tokens)
    edits = _edits(ablations, tokens, row_offset)
    if not any(isinstance(a, PatternPreserving) for a in ablations):
        return run_edited(model, tokens, edits, attention_mask=attention_mask)
    with observable(unwrap(model)):
        _, patterns = run_edited(model, tokens, {}, save_patterns=True, attention_mask=attention_mask)
        for layer, p in enumerate(patterns):
            edits.setdefault(layer, LayerEdits()).pattern = p
        return run_edited(model, tokens, edits, attention_mask=attention_mask)
