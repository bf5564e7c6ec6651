"""Exclusive ownership of a folder (a training run, a results folder) by one process.

An OS advisory lock (``fcntl.flock``) on ``<folder>/.lock``: the kernel releases it when the holder
exits, however it exits (SIGKILL included), so there are no stale locks to clean up. The holder
writes its pid into the file so a second process can name it. Within one process the lock is
re-entrant (a results folder locked by ``reproduce`` is written by the experiments it calls).

Only stdlib: ``fcntl`` is POSIX; on other systems the lock is a no-op (documented in docs/reliability-log.md).

Temporary files and folders (written, then renamed into place) are named with ``temp_tag``: the writer's
pid and machine, so that ``remove_leftovers`` can tell one whose writer died mid-write from one being filled.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d, owned(d):
    ...     holder_pid(d) == os.getpid()
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_NAME = ".lock"
LOCKING = fcntl is not None  # False: ``owned`` takes no lock (not POSIX), so it guarantees nothing
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # this machine, in temporary names
# the end of a temporary name: .tmp<pid>, then (temp_tag) -<machine>-<random> (older writers: the pid only)
_TEMP = re.compile(r"\.tmp(\d+)(?:-([0-9a-f]{8})-[0-9a-z_]+)?$")
_held: dict[Path, list] = {}  # resolved folder -> [file object, depth]


class FolderBusyError(RuntimeError):
    """Another process owns the folder (a run or a results folder in use)."""


def holder_pid(folder: str | Path) -> int | None:
    """The pid recorded by the process that last locked ``folder`` (None if unknown)."""
    try:
        return int((Path(folder) / LOCK_NAME).read_text().strip() or "x")
    except (OSError, ValueError):
        return None


def temp_tag() -> str:
    """The end of a temporary name written by this process, unique to the writer:
    ``.tmp<pid>-<machine>-<random>`` (see ``remove_leftovers``)."""
    return f".tmp{os.getpid()}-{HOST}-{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine; True when that cannot be told (another user's
    process, or not POSIX), so that a caller deleting on False never deletes a live writer's file."""
    if os.name != "posix":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # PermissionError: it exists
        return True
    return True


def remove_leftovers(folder: str | Path, locked: bool = False) -> list[str]:
    """Remove the temporary files and folders in ``folder`` whose writer died mid-write (names ending in
    ``temp_tag``'s form); returns their names. Missing folders and failed removals are skipped.

    Safe: a writer lives while it fills its temporary and renames or deletes it before it exits, so one
    made on this machine by a pid that is no longer alive will never be written or renamed again. A live
    pid (maybe reused) or another machine's tag (a shared cache: its pids mean nothing here) is kept.
    Names with a pid only (older writers, no machine) are taken only when ``locked``: the caller holds
    ``folder``'s lock (``owned``), which every writer of those folders holds, so none is another machine's."""
    removed = []
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.search(p.name)
        if m is None or not (m.group(2) == HOST or (m.group(2) is None and locked)) or pid_alive(int(m.group(1))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:  # removed by another process meanwhile, or not ours to remove: left as it is
            continue
        removed.append(p.name)
    return removed


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
