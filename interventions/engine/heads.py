"""Addressing attention heads: ``Head(layer, head)`` or the string ``"L1H3"``.

Example:
    >>> parse_heads("L1H3, L0H0")
    (Head(layer=1, head=3), Head(layer=0, head=0))
    >>> str(Head(2, 5))
    'L2H5'
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

_PATTERN = re.compile(r"^\s*L(\d+)\s*H(\d+)\s*$", re.IGNORECASE)


class Head(NamedTuple):
    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"


HeadLike = Head | str | tuple[int, int]


def parse_head(spec: HeadLike) -> Head:
    """A ``Head`` from ``Head``, ``(layer, head)`` or ``"L<layer>H<head>"`` (layer and head integers)."""
    if type(spec) is Head and all(type(v) is int for v in spec):
        return spec
    if isinstance(spec, str):
        m = _PATTERN.match(spec)
        if not m:
            raise ValueError(f"malformed head {spec!r}: write heads as 'L<layer>H<head>', e.g. 'L1H3'")
        return Head(int(m.group(1)), int(m.group(2)))
    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in spec):
        return Head(*spec)
    raise ValueError(f"cannot read {spec!r} as a head: pass Head(layer, head), (layer, head) or 'L1H3', with "
                     "integer layer and head (e.g. int(x) of a numpy or torch number)")


def parse_heads(specs: HeadLike | Iterable[HeadLike]) -> tuple[Head, ...]:
    """Several heads: an iterable of head specs, or one string with comma-separated heads."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    elif isinstance(specs, Head) or (isinstance(specs, tuple) and len(specs) == 2
                                     and all(isinstance(v, int) for v in specs)):
        specs = [specs]
    elif not isinstance(specs, Iterable):
        raise ValueError(f"cannot read {specs!r} as heads: pass Head(layer, head), (layer, head), 'L1H3' or a list "
                         "of them")
    heads = tuple(parse_head(s) for s in specs)
    if not heads:
        raise ValueError("no heads given: pass at least one head, e.g. 'L1H3'")
    return heads


def check_heads(heads: Iterable[Head], n_layers: int, n_heads: int) -> None:
    """Raise ValueError naming the valid range if a head does not exist in the model."""
    for h in heads:
        if not 0 <= h.layer < n_layers:
            raise ValueError(f"head {h}: layer {h.layer} out of range: the model has layers 0-{n_layers - 1}")
        if not 0 <= h.head < n_heads:
            raise ValueError(f"head {h}: head {h.head} out of range: layer {h.layer} has heads 0-{n_heads - 1}")


def all_heads(n_layers: int, n_heads: int) -> tuple[Head, ...]:
    return tuple(Head(layer, head) for layer in range(n_layers) for head in range(n_heads))
