"""Progress bars of the long primitives (sweeps, patching).

``progress``: ``None`` (the default) shows a bar only once the work has lasted ``AUTO_DELAY_S``
seconds (a quick call prints nothing, a long one is never silent), ``True`` always, ``False`` never.

Example:
    >>> passes(3, "sweep", False) is None
    True
"""

from __future__ import annotations

AUTO_DELAY_S = 2.0  # progress=None: the bar appears after this many seconds of work


def check_progress(progress) -> None:
    """Raise ValueError unless ``progress`` is True, False or None (called before any work)."""
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"progress={progress!r} must be True, False or None (a bar once the work lasts "
                         f"{AUTO_DELAY_S:g} s)")


def passes(total: int, desc: str, progress: bool | None):
    """A tqdm bar over ``total`` forward passes, or None when ``progress`` is False."""
    check_progress(progress)
    if progress is False:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pass", delay=0 if progress else AUTO_DELAY_S)
