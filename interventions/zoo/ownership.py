"""Exclusive ownership of a folder (a training run, a results folder) by one process.

An OS advisory lock (``fcntl.flock``) on ``<folder>/.lock``: the kernel releases it when the holder
exits, however it exits (SIGKILL included), so there are no stale locks to clean up. The holder
writes its pid into the file so a second process can name it. Within one process the lock is
re-entrant (a results folder locked by ``reproduce`` is written by the experiments it calls).

Only stdlib: ``fcntl`` is POSIX; on other systems the lock is a no-op (documented in the README).

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d, owned(d):
    ...     holder_pid(d) == os.getpid()
    True
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_NAME = ".lock"
_held: dict[Path, list] = {}  # resolved folder -> [file object, depth]


class FolderBusyError(RuntimeError):
    """Another process owns the folder (a run or a results folder in use)."""


def holder_pid(folder: str | Path) -> int | None:
    """The pid recorded by the process that last locked ``folder`` (None if unknown)."""
    try:
        return int((Path(folder) / LOCK_NAME).read_text().strip() or "x")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def owned(folder: str | Path, wait: float = 0.0, what: str = "folder"):
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block.

    ``wait``: seconds to wait for another holder to finish (0: fail at once). Raises
    ``FolderBusyError`` naming the holder's pid."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _held:  # re-entrant within this process
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    f = open(key / LOCK_NAME, "a+")
    try:
        if fcntl is not None:
            deadline = time.monotonic() + max(0.0, wait)
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        pid = holder_pid(key)
                        who = f"process {pid}" if pid else "another process"
                        waited = f" (waited {wait:g} s)" if wait > 0 else ""
                        raise FolderBusyError(
                            f"{what} {folder} is in use by {who}{waited}: wait for it to finish (pass "
                            "--wait SECONDS to wait), stop it, or choose another --out") from None
                    time.sleep(0.1)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _held[key] = [f, 1]
        try:
            yield
        finally:
            del _held[key]
    finally:
        f.close()  # releases the flock
