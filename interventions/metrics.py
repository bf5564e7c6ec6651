"""In-context-learning metrics (Olsson et al. 2022).

Token numbering: the k-th token of a window (1-indexed) is predicted from the k-1 tokens before
it; in a per-token loss array of shape (batch, pos - 1) it is entry k - 2.

Example:
    >>> icl_indices(512), icl_indices(256)
    ((50, 500), (25, 250))
"""

from __future__ import annotations

PAPER_EARLY, PAPER_LATE, PAPER_CTX = 50, 500, 512


def icl_indices(n_ctx: int) -> tuple[int, int]:
    """(early, late) 1-indexed token numbers for the ICL score.

    The paper uses the 50th and 500th tokens of 512-token contexts. A shorter context keeps the
    paper's proportions (early = 50/512, late = 500/512 of the context), so the score still compares
    "little context" with "nearly all of it"."""
    if n_ctx >= PAPER_CTX:
        return PAPER_EARLY, PAPER_LATE
    early = max(2, round(n_ctx * PAPER_EARLY / PAPER_CTX))
    late = max(early + 1, round(n_ctx * PAPER_LATE / PAPER_CTX))
    if late > n_ctx:
        raise ValueError(f"a context of {n_ctx} tokens is too short for an ICL score: use n_ctx >= 3")
    return early, late
