"""Stopping cleanly: a stop signal unwinds a command as Ctrl-C does, and worker processes never outlive it.

* ``stop_on_signal``: for the block, SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` (a ``KeyboardInterrupt``)
  in the main thread. The CLI runs every command in one, with or without workers: each exits 128 + N with one
  line saying how to resume (``experiments.__main__``), its locks released on the way out.
* ``worker_pool``: spawned workers, terminated and joined however the block is left. A worker leaves SIGINT
  (Ctrl-C reaches the whole process group) to the parent from its first instruction on, stops on the parent's
  SIGTERM (``terminate``) even when the command was started with SIGTERM ignored, and ends itself
  within a fraction of a second once the parent is gone (killed outright: SIGKILL, the OOM killer), so none
  goes on writing into a run folder, holding its lock. A worker stopped mid-write leaves a temporary, never
  a half-written file (the next start removes it).

Only the standard library: a worker imports it (the pool's initializer) before its task's modules (torch).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
import weakref

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # those stop_on_signal turns into Interrupted
PARENT_POLL_S = 0.2  # how often a worker looks whether its parent is still there
_active: list = []  # the deferred of the stop_on_signal block in force in the main thread


class Interrupted(KeyboardInterrupt):
    """A stop signal received in a ``stop_on_signal`` block. A ``KeyboardInterrupt``, so it unwinds as
    Ctrl-C does; ``signum``: the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signal():
    """For the block, SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` in the main thread (SIGTERM and SIGHUP
    otherwise kill the process outright, skipping every cleanup); the previous handlers are restored after.
    A later signal is dropped while the ``Interrupted`` it raised is alive (unwinding, being handled, or the
    context of another exception): it would cut short the cleanup that one started. One that Python swallowed
    ("Exception ignored in": raised in a ``__del__`` or a weakref callback) is gone, and the command went on:
    the next signal raises again, rather than leaving only SIGKILL to stop it. Yields
    ``deferred``, a context manager whose body no signal interrupts: one received meanwhile is raised at its
    end (``deferred(raise_pending=False)``: dropped, for a cleanup under way for another error; one inside
    another: at the outer one's end).
    A block inside another (a pool's inside the CLI's) is that one: a command raises once, however nested.
    Off the main thread (Python runs handlers there only) it installs nothing; an ignored signal (``nohup``,
    a background job's SIGINT) stays ignored."""
    main = threading.current_thread() is threading.main_thread()
    if main and _active:
        yield _active[-1]
        return
    state = {"raised": None, "pending": None, "defer": 0}  # raised: a weak reference to the last Interrupted

    def unwinding() -> bool:
        return state["raised"] is not None and state["raised"]() is not None

    def interrupted(signum: int) -> Interrupted:
        # no local of the raising frame holds it (its traceback holds that frame: a cycle would keep it alive)
        e = Interrupted(signum)
        state["raised"] = weakref.ref(e)
        return e

    def handler(signum, frame):
        if unwinding():
            return
        if state["defer"]:
            state["pending"] = state["pending"] or signum
            return
        raise interrupted(signum)

    @contextlib.contextmanager
    def deferred(raise_pending: bool = True):
        state["defer"] += 1
        try:
            yield
        finally:
            state["defer"] -= 1
        if state["defer"]:  # inside another deferred block: raised at its end, not in the middle of its body
            return
        pending, state["pending"] = state["pending"], None
        if pending is not None and raise_pending and not unwinding():
            raise interrupted(pending)

    before = {}
    try:
        if main:
            _active.append(deferred)
            for name in STOP_SIGNALS:
                signum = getattr(signal, name, None)  # no SIGHUP on Windows
                if signum is not None and signal.getsignal(signum) not in (signal.SIG_IGN, None):
                    before[signum] = signal.signal(signum, handler)
        yield deferred
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)
        if main:
            _active.remove(deferred)


@contextlib.contextmanager
def worker_pool(workers: int, **kwargs):
    """A pool of ``workers`` spawned processes (``kwargs``: as ``multiprocessing.Pool``'s) that never outlives
    the block: however it is left (an error, Ctrl-C, SIGTERM, SIGHUP: ``stop_on_signal``) the workers are
    terminated and joined, so none goes on writing into a run folder, and holding its lock, after the parent
    has gone; and a worker whose parent was killed outright ends itself (``worker_started``). Starting and
    stopping the pool are not interrupted (a signal then is raised once they are done).

        >>> with worker_pool(2) as pool:
        ...     sorted(pool.imap_unordered(abs, [-1, 2]))
        [1, 2]
    """
    with stop_on_signal() as deferred:
        pool, failed = None, False
        try:
            # a signal received while the pool starts is raised at the end of this, with the pool made: stopped below
            with deferred(), start_signals_blocked():  # inherited by the workers and the thread replacing them
                pool = multiprocessing.get_context("spawn").Pool(workers, initializer=worker_started, **kwargs)
            yield pool
        except Exception:
            failed = True  # its traceback is shown, not a signal received while the pool stops
            raise
        finally:
            if pool is not None:
                with deferred(raise_pending=not failed):
                    pool.terminate()
                    pool.join()


@contextlib.contextmanager
def start_signals_blocked():
    """SIGINT, and SIGTERM if this process ignores it, blocked in this thread for the block. Processes and
    threads started in it inherit the mask, so Ctrl-C cannot interrupt a worker's start-up (a KeyboardInterrupt
    traceback) before ``worker_started`` ignores it: the stdlib starts its resource tracker so. A worker also
    inherits an ignored SIGTERM, which would discard the parent's ``terminate`` during its start-up (the
    parent then waits for it forever); blocked, that SIGTERM stays pending (Linux) until ``worker_started``
    restores its default and ends the worker. The parent still gets Ctrl-C (another thread takes it, or it
    waits for the block's end)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # before: starting it unblocks SIGINT in this thread
    blocked = {signal.SIGINT} | ({signal.SIGTERM} if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN else set())
    before = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def worker_started() -> None:
    """Pool initializer, a worker's first code: ignore SIGINT (the parent handles Ctrl-C and stops the workers;
    one that came while it was blocked, ``start_signals_blocked``, is dropped), take SIGTERM's default (the
    parent's ``terminate`` sends it: an ignored one, inherited from a parent started so, would leave the parent
    waiting forever; one pending since the start ends the worker here), and end as soon as the parent is gone
    (``exit_with_parent``, in a thread: it works whatever the worker is doing)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()


def exit_with_parent(poll: float = PARENT_POLL_S) -> None:
    """In a worker: wait until its parent is gone (POSIX: the worker is then another process's child), then
    end this process at once, as the parent's ``terminate`` would have: a write under way is left as a
    temporary, never a half-written file or checkpoint, and the kernel releases the worker's locks."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    while os.getppid() == parent.pid:
        time.sleep(poll)
    os._exit(1)
