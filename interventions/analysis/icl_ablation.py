"""How much of a model's in-context learning depends on some heads: the share of the ICL score an
ablation removes, paired over windows.

* ``icl_share_removed(model, windows, ablation)``: clean and ablated runs on the same windows.
* ``icl_share_from_losses(clean_losses, ablated_losses)``: the same from per-token losses you already
  have (e.g. from ``per_token_loss_sets`` or ``ablation_sweep``).
* ``share_removed(clean_icl, ablated_icl)``: the share and its bootstrap s.e. from per-window scores.

share = (ICL_ablated - ICL_clean) / -ICL_clean. The ICL score is negative when context helps, so 1 means
the ablation removes all of it, 0 none, and a negative share that ablating the heads makes the score
larger (more negative). It is defined only while the clean score is negative (there is ICL to remove):
NaN otherwise. The s.e. is a bootstrap over windows that resamples clean and ablated scores of the same
windows together (paired), since a window that is hard for the clean model is hard for the ablated one.

Example:
    >>> import numpy as np
    >>> clean = np.array([-0.5, -0.3, -0.4, -0.6])
    >>> share, se = share_removed(clean, clean + 0.2)  # every window loses 0.2 of its 0.45 nats
    >>> round(share, 3)
    0.444
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..engine.tracing import check_positive
from ..primitives.loss import per_token_loss_sets
from .metrics import as_windows, check_icl_band, check_icl_indices, icl_per_window, resolve_ablation

N_BOOT = 1000  # bootstrap resamples: the s.e. of a s.e. of ~2% (1 / sqrt(2 * 1000))


def _per_window(values, name: str) -> np.ndarray:
    """(n,) finite float64 per-window scores (never a copy the caller shares)."""
    x = np.asarray(values.numpy() if torch.is_tensor(values) else values, dtype=np.float64)
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be (n_windows,) per-window ICL scores with n >= 1, got shape {x.shape}: "
                         "icl_per_window(losses, early, late, band) gives them")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf: pass the per-window scores of unpadded windows with finite losses")
    return x


def share_removed(clean_icl, ablated_icl, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """(share, bootstrap s.e.) of the clean ICL score that an ablation removes, from (n,) per-window scores
    of the same windows (``icl_per_window``), in the same order: a fraction (1 = all of it).

    NaN for both when the clean mean is >= 0 (no ICL to remove: a positive one flips the share's sign,
    zero divides by zero); a NaN s.e. when any resample's clean mean is >= 0 (it divides by about 0) and
    for one window (no spread). The s.e. is the std (ddof 1) of the share over ``n_boot`` resamples of
    the windows (``numpy.random.default_rng(seed)``), each taken by clean and ablated together.

        >>> share_removed([-0.4, -0.2], [0.0, -0.1], seed=0)[0]
        0.8333333333333334
        >>> share_removed([0.1, 0.3], [0.0, -0.1])  # the clean score is positive: nothing to remove
        (nan, nan)
    """
    clean, ablated = _per_window(clean_icl, "clean_icl"), _per_window(ablated_icl, "ablated_icl")
    if clean.shape != ablated.shape:
        raise ValueError(f"clean_icl has {clean.shape[0]} windows but ablated_icl {ablated.shape[0]}: pass the scores "
                         "of the same windows, in the same order (the share is paired)")
    n_boot = check_positive(n_boot, "n_boot", minimum=2)
    seed = check_positive(seed, "seed", minimum=0)
    if not clean.mean() < 0:
        return math.nan, math.nan
    share = float((ablated.mean() - clean.mean()) / -clean.mean())
    if len(clean) < 2:
        return share, math.nan
    g = np.random.default_rng(seed)
    idx = g.integers(0, len(clean), size=(n_boot, len(clean)))  # (n_boot, n) windows of each resample
    c = clean[idx].mean(1)  # (n_boot,)
    boots = (ablated[idx].mean(1) - c) / -c
    se = float(np.std(boots, ddof=1)) if (c < 0).all() else math.nan
    return share, se


def _sem(x: np.ndarray) -> float:
    """Standard error of the mean of (n,) values (std ddof 1 / sqrt(n)); NaN for one value."""
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def icl_share_from_losses(clean_losses: torch.Tensor, ablated_losses: torch.Tensor, early: int | None = None,
                          late: int | None = None, band: int = 0, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """``icl_share_removed`` from (n, pos - 1) per-token losses (nats) of the same windows, clean and ablated.

    early, late: 1-indexed token numbers (default ``icl_indices(pos)``); band: tokens each side averaged
    (as ``icl_from_losses``). Returns the dict described in ``icl_share_removed``.

        >>> clean = torch.tensor([[2.0, 1.0, 1.0], [2.0, 2.0, 1.5]])  # windows of 4 tokens: -1.0 and -0.5 nats
        >>> r = icl_share_from_losses(clean, clean + torch.tensor([0.0, 0.0, 0.3]), early=2, late=4)
        >>> round(r["share_removed"], 3), round(r["icl_change"], 3)
        (0.4, 0.3)
    """
    if np.shape(clean_losses) != np.shape(ablated_losses):
        raise ValueError(f"clean_losses has shape {tuple(np.shape(clean_losses))} but ablated_losses "
                         f"{tuple(np.shape(ablated_losses))}: pass the (n, pos - 1) losses of the same windows, in "
                         "the same order (the share is paired)")
    c = icl_per_window(clean_losses, early, late, band)  # (n,); validates the losses, early, late and band
    early, late = check_icl_indices(np.shape(clean_losses)[1] + 1, early, late)
    a = icl_per_window(ablated_losses, early, late, band)  # (n,)
    share, share_sem = share_removed(c, a, n_boot, seed)
    return {"share_removed": share, "share_removed_sem": share_sem,
            "icl_change": float((a - c).mean()), "icl_change_sem": _sem(a - c),
            "icl_clean": float(c.mean()), "icl_clean_sem": _sem(c),
            "icl_ablated": float(a.mean()), "icl_ablated_sem": _sem(a),
            "n": int(c.shape[0]), "early": early, "late": late, "band": int(band), "n_boot": int(n_boot),
            "seed": int(seed)}


def icl_share_removed(model, windows, ablation, early: int | None = None, late: int | None = None, band: int = 0,
                      batch_size: int = 16, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """How much of ``model``'s in-context learning depends on the ablated heads: the share of the ICL score
    (``icl_score``) that ``ablation`` removes on ``windows``, paired over windows.

    Clean and ablated runs see the same windows, on the same attention path (with a ``PatternPreserving``
    ablation both run inside ``observable``: ``per_token_loss_sets``).

    Args:
        model: a supported HF causal LM (or its nnsight wrapper).
        windows: (n, pos) token ids, all windows the same length.
        ablation: an ``Ablation``, a list of them (applied together), or heads (zero ablation,
            ``resolve_ablation``); the paper's kind is ``PatternPreserving(ZeroAblation(heads))``.
        early, late, band: as ``icl_score`` (default: the paper's single tokens at ``icl_indices(pos)``;
            the experiments use ``band=icl_band(pos)``).
        batch_size: windows per forward pass (same result for any value).
        n_boot, seed: bootstrap resamples of the windows and their generator's seed.

    Returns:
        dict: ``share_removed`` (fraction of the clean score removed: 1 = all; NaN when the clean score is
        not negative) and ``share_removed_sem`` (paired bootstrap s.e., ``share_removed``);
        ``icl_change`` = ICL_ablated - ICL_clean (nats; positive: less ICL) and ``icl_change_sem`` (paired:
        std over windows of the per-window change / sqrt(n)); ``icl_clean``, ``icl_ablated`` (nats) with
        their ``_sem``; ``n``, ``early``, ``late``, ``band``, ``n_boot``, ``seed``.
        ``pandas.DataFrame([result])`` makes it a tidy row.

    Example:
        >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM, PatternPreserving, ZeroAblation
        >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=20)).eval()
        >>> r = icl_share_removed(model, torch.randint(0, 20, (8, 64)), PatternPreserving(ZeroAblation("L1H0")))
        >>> sorted(k for k in r if not k.endswith("_sem"))[:4], r["n"]  # an untrained model: share often NaN
        (['band', 'early', 'icl_ablated', 'icl_change'], 8)
    """
    windows = as_windows(windows)
    if windows.shape[0] == 0:
        raise ValueError("windows holds no window (shape (0, pos)): pass at least one")
    early, late = check_icl_indices(windows.shape[1], early, late)
    check_icl_band(band, early, late)  # every argument before the forward passes
    check_positive(n_boot, "n_boot", minimum=2)
    check_positive(seed, "seed", minimum=0)
    ablations = resolve_ablation(ablation)
    if not ablations:
        raise ValueError("ablation is empty: nothing would be removed; pass heads ('L1H3') or an ablation, e.g. "
                         "PatternPreserving(ZeroAblation('L1H3'))")
    losses = per_token_loss_sets(model, windows, {"clean": [], "ablated": ablations}, batch_size=batch_size,
                                 progress=False)  # {name: (n, pos - 1)}
    return icl_share_from_losses(losses["clean"], losses["ablated"], early, late, band, n_boot, seed)
