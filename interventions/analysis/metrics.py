"""In-context-learning metrics (Olsson et al. 2022).

* ``icl_score(model, windows)``: mean loss of the late token minus mean loss of the early token
  (paper: 500th and 50th of 512), with its paired standard error.
* ``loss_by_token_index(model, windows)``: the loss-vs-context curve (token_index, loss, sem, n).
* ``icl_from_losses(losses, early, late)``: the same score from a per-token-loss array you already have.
* ``icl_per_window(losses, early, late, band)``: each window's score, (n,), for paired statistics.
* ``icl_score(model, windows, ablation=...)``: the score with heads ablated (the share of it an ablation
  removes: ``interventions.analysis.icl_ablation``).

Token numbering: the k-th token of a window (1-indexed) is predicted from the k-1 tokens before
it; in a per-token loss array of shape (batch, pos - 1) it is entry k - 2.

Precision: one token against one token is noisy (s.e. ~0.1 nats on 512 byte-level windows). The
``band`` option averages each window's loss over the tokens ``early - band .. early + band`` and
``late - band .. late + band`` before differencing; ``icl_band(n_ctx)`` (+-2% of the context up to 512 tokens, then 10: tokens
20-30 and 245-255 at 256) is what the experiments and the trainer's log use. ``band=0`` is the paper's
exact definition.

Example:
    >>> icl_indices(512), icl_indices(256), icl_band(256)
    ((50, 500), (25, 250), 5)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..engine.heads import parse_heads
from ..engine.tracing import check_positive
from ..primitives.ablation import Ablation, ZeroAblation, as_ablations
from ..primitives.loss import check_aligned, loss_by_position, per_token_loss

PAPER_EARLY, PAPER_LATE, PAPER_CTX = 50, 500, 512


def icl_indices(n_ctx: int) -> tuple[int, int]:
    """(early, late) 1-indexed token numbers for the ICL score.

    The paper uses the 50th and 500th tokens of 512-token contexts. A shorter context keeps the
    paper's proportions (early = 50/512, late = 500/512 of the context), so the score still compares
    "little context" with "nearly all of it"."""
    n_ctx = _check_n_ctx(n_ctx)
    if n_ctx >= PAPER_CTX:
        return PAPER_EARLY, PAPER_LATE
    early = max(2, round(n_ctx * PAPER_EARLY / PAPER_CTX))
    late = max(early + 1, round(n_ctx * PAPER_LATE / PAPER_CTX))
    if late > n_ctx:
        raise ValueError(f"a context of {n_ctx} tokens is too short for an ICL score: use n_ctx >= 3")
    return early, late


def icl_band(n_ctx: int) -> int:
    """Half-width (tokens) of the bands the experiments average the ICL score over: 10/512 of the context
    up to 512 tokens, then 10 (the tokens stay the paper's 50th and 500th there), so the bands stay well
    inside "little context" and "nearly all of it" at any context length.

        >>> icl_band(64), icl_band(256), icl_band(512), icl_band(4096)
        (1, 5, 10, 10)
    """
    n_ctx = _check_n_ctx(n_ctx)
    return round(min(n_ctx, PAPER_CTX) * 10 / PAPER_CTX)


def _check_n_ctx(n_ctx) -> int:
    return check_positive(n_ctx, "n_ctx", why="the windows' length in tokens")


def as_windows(windows) -> torch.Tensor:
    """(n, pos) integer token ids as a LongTensor (numpy arrays and lists accepted; never modified)."""
    if not torch.is_tensor(windows):
        try:
            windows = torch.as_tensor(np.asarray(windows))
        except Exception:
            raise ValueError(f"windows must be a (n, pos) tensor of token ids, got {type(windows).__name__}") from None
    if windows.dim() != 2:
        raise ValueError(f"windows must have shape (n, pos), got {tuple(windows.shape)}: "
                         "stack windows into one (n, pos) tensor (a single window: windows[None])")
    if windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise ValueError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    return windows.long()


def check_icl_indices(pos: int, early: int | None = None, late: int | None = None) -> tuple[int, int]:
    """Resolve and validate (early, late) 1-indexed token numbers for windows of ``pos`` tokens.

    A missing index takes its default from ``icl_indices(pos)``."""
    if early is None or late is None:
        if pos < 3:
            raise ValueError(f"windows of {pos} tokens are too short for an ICL score: use windows of at "
                             "least 3 tokens (the paper uses 512)")
        d_early, d_late = icl_indices(pos)
        early = d_early if early is None else early
        late = d_late if late is None else late
    for name, k in (("early", early), ("late", late)):
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
            raise ValueError(f"{name}={k!r} must be an integer token number (1-indexed)")
    early, late = int(early), int(late)
    if early < 2:
        raise ValueError(f"early={early}: the first token has no prediction; use early >= 2 (1-indexed)")
    if late > pos:
        raise ValueError(f"late={late} needs windows of at least {late} tokens, but they have {pos}: draw longer "
                         f"windows (e.g. source.eval_windows(n, n_ctx={late})) or pass late <= {pos} "
                         f"(icl_indices({pos}) gives the paper's proportions)")
    if early >= late:
        raise ValueError(f"early={early} must come before late={late}: the score compares a token with little "
                         "context (early) against one with nearly all of it (late)")
    return early, late


def check_icl_band(band, early: int, late: int) -> int:
    """Validate ``band`` (tokens each side) for resolved (early, late) token numbers; returns it as an int."""
    if not isinstance(band, (int, np.integer)) or isinstance(band, bool) or band < 0:
        raise ValueError(f"band={band!r} must be a non-negative integer (tokens each side)")
    if early + band >= late - band:
        raise ValueError(f"band={band} makes the early and late bands around tokens {early} and {late} overlap: "
                         f"use band < {(late - early) / 2:g}")
    return int(band)


def _as_losses(losses) -> torch.Tensor:
    """(n, pos - 1) per-token losses as float64, with n >= 1 and no NaN.

    NaN is refused (``check_aligned``): ``per_token_loss`` of a left-padded batch puts NaN at the padding
    and shifts each padded row's tokens right, so column k - 2 is not the k-th token there; a row padded
    by fewer than ``early - band - 1`` tokens gave a finite, wrong score."""
    losses = torch.as_tensor(losses if torch.is_tensor(losses) else np.asarray(losses)).double()
    if losses.dim() != 2 or losses.shape[0] == 0:
        raise ValueError(f"losses must have shape (n_windows, pos - 1) with at least one window, got "
                         f"{tuple(losses.shape)}: one window's losses are losses[None]")
    check_aligned(losses, "losses")
    return losses


def icl_band_losses(losses: torch.Tensor, early: int, late: int, band: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each window's loss at the early and the late token, each averaged over ``band`` tokens either side
    (clipped to the window): ((n,), (n,)) float64. ``late - early`` is each window's ICL score."""
    losses = _as_losses(losses)
    pos = losses.shape[1] + 1
    early, late = check_icl_indices(pos, early, late)
    band = check_icl_band(band, early, late)

    def band_mean(k: int) -> torch.Tensor:  # (n,) mean loss over tokens k-band..k+band (1-indexed, clipped)
        lo, hi = max(2, k - band), min(pos, k + band)
        return losses[:, lo - 2:hi - 1].mean(1)

    return band_mean(early), band_mean(late)


def icl_per_window(losses: torch.Tensor, early: int | None = None, late: int | None = None,
                   band: int = 0) -> np.ndarray:
    """(n,) float64: each window's ICL score (late band minus early band), nats, from (n, pos - 1) losses;
    early and late default to ``icl_indices(pos)``. Its mean is ``icl_from_losses``' score.

        >>> icl_per_window(torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.5]]), early=2, late=4).tolist()
        [-1.0, -0.5]
    """
    e, l_ = icl_band_losses(losses, early, late, band)  # (n,), (n,)
    return (l_ - e).numpy()


def resolve_ablation(ablation) -> list[Ablation]:
    """The ablations an ``ablation=`` argument names: an ``Ablation``, a list of them, or heads
    ("L1H3", ``Head(1, 3)``, (1, 3) or a list of them), which mean ``ZeroAblation(heads)``, as
    ``ablation_sweep``'s default kind (the paper's kind is ``PatternPreserving(ZeroAblation(heads))``).
    None or [] is no ablation ([]).

        >>> resolve_ablation("L1H3, L0H0")
        [ZeroAblation(L1H3, L0H0)]
    """
    if ablation is None:
        return []
    if isinstance(ablation, Ablation) or (isinstance(ablation, (list, tuple)) and ablation
                                          and all(isinstance(a, Ablation) for a in ablation)):
        return as_ablations(ablation)
    if isinstance(ablation, (list, tuple)) and not ablation:
        return []
    try:
        heads = parse_heads(ablation)
    except ValueError:
        raise ValueError(f"ablation={ablation!r} is neither an ablation, a list of ablations nor heads: pass e.g. "
                         "iv.PatternPreserving(iv.ZeroAblation('L1H3')), a list of such objects, or heads "
                         "('L1H3', Head(1, 3), (1, 3) or a list of them: zero ablation)") from None
    return [ZeroAblation(heads)]


def icl_from_losses(losses: torch.Tensor, early: int, late: int, band: int = 0) -> dict:
    """The ICL score from a (n, pos - 1) per-token-loss array (entry k - 2 is the k-th token's loss).

    ``band`` > 0 averages each window's losses over tokens ``k - band .. k + band`` (clipped to the
    window) around ``early`` and ``late`` first (see the module docstring); 0 is the paper's definition.

    Returns a dict: ``icl_score`` = mean(loss[late]) - mean(loss[early]) in nats (negative when later
    tokens are predicted better, i.e. the model uses its context), ``sem`` its paired standard error
    (std over windows of the per-window difference, ddof=1, / sqrt(n); NaN for n = 1: one window gives
    no spread), ``n``, ``early``, ``late``, ``loss_early``, ``loss_late``.

    Paired because both losses come from the same windows: the per-window difference cancels how hard
    a window is overall, so its spread is the honest uncertainty of the difference."""
    losses = _as_losses(losses)
    early, late = check_icl_indices(losses.shape[1] + 1, early, late)
    e, l_ = icl_band_losses(losses, early, late, band)  # (n,)
    diff = l_ - e
    n = int(diff.shape[0])
    sem = float(diff.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"icl_score": float(diff.mean()), "sem": sem, "n": n, "early": early, "late": late, "band": int(band),
            "loss_early": float(e.mean()), "loss_late": float(l_.mean())}


def icl_score(model, windows, early: int | None = None, late: int | None = None, batch_size: int = 16,
              band: int = 0, ablation=None) -> dict:
    """In-context-learning score of ``model`` on evaluation ``windows`` (Olsson et al. 2022), optionally
    with heads ablated.

    icl_score = mean loss of the ``late``-th token - mean loss of the ``early``-th token (1-indexed),
    by default ``icl_indices(pos)`` (the paper: 500th and 50th of 512). Sign: late minus early, so a
    model that uses its context scores negative (the paper quotes "0.4 nats" as a magnitude).

    Args:
        model: a supported HF causal LM (or its nnsight wrapper).
        windows: (n, pos) token ids, e.g. ``StreamSource.eval_windows(n, pos)``; all windows the same length.
        early, late: 1-indexed token numbers (2 <= early < late <= pos).
        batch_size: windows per forward pass (same result for any value).
        band: average each window's loss over ``band`` tokens either side of early and late (0: the
            paper's single tokens; ``icl_band(pos)`` is the experiments' choice).
        ablation: None (the clean model), an ``Ablation``, a list of them (applied together), or heads
            (zero ablation; ``resolve_ablation``): the score of the ablated run on the same windows. For
            the share of the clean score it removes, with paired standard errors, use
            ``interventions.analysis.icl_ablation.icl_share_removed``.

    Returns:
        dict with ``icl_score``, ``sem`` (paired standard error), ``n``, ``early``, ``late``, ``band``,
        ``loss_early``, ``loss_late``; ``pandas.DataFrame([result])`` makes it a tidy row.

    Example:
        >>> import torch
        >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
        >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=20)).eval()
        >>> r = icl_score(model, torch.randint(0, 20, (4, 64)))  # a trained model scores negative
        >>> r["early"], r["late"], r["n"], r["icl_score"] == r["loss_late"] - r["loss_early"]
        (6, 62, 4, True)
        >>> without = icl_score(model, torch.randint(0, 20, (4, 64)), ablation="L0H1")  # zero-ablated head
        >>> without["n"]
        4
    """
    windows = as_windows(windows)
    if windows.shape[0] == 0:
        raise ValueError("windows holds no window (shape (0, pos)): pass at least one")
    early, late = check_icl_indices(windows.shape[1], early, late)
    check_icl_band(band, early, late)  # before the forward passes
    ablations = resolve_ablation(ablation)
    if ablations:
        losses = per_token_loss(model, windows, ablations, batch_size=batch_size)  # (n, pos - 1)
    else:  # the clean run
        losses = per_token_loss(model, windows, batch_size=batch_size)  # (n, pos - 1)
    return icl_from_losses(losses, early, late, band)


def loss_by_token_index(model, windows, batch_size: int = 16):
    """Mean loss at each token index over ``windows`` (the paper's loss-vs-context curve).

    Returns a DataFrame with ``token_index`` (0-based position of the predicted token, i.e. how many
    tokens of context it had: 1 .. pos - 1), ``loss`` (nats), ``sem`` (standard error over windows)
    and ``n``. The k-th token (1-indexed) of the ICL score is ``token_index == k - 1``."""
    windows = as_windows(windows)
    if windows.shape[1] < 2:
        raise ValueError(f"windows of {windows.shape[1]} token have no next-token loss: use at least 2 tokens")
    return loss_by_position(per_token_loss(model, windows, batch_size=batch_size))
