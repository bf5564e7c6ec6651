"""The processes of one training run: one (plain ``python``) or N under ``torchrun`` (DDP).

``torchrun --nproc_per_node N`` starts N copies of the trainer with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` in their environment; ``World.from_env`` reads them (none:
one process, and every method here is a plain call). The trainer's contract under DDP:

* each rank computes the whole global batch of a step (a pure function of seed and step) and keeps
  its ``batch_size / N`` rows (``World.rows``), so the data order is the one-process order;
* rank 0 alone touches the run folder (lock, config, metrics, checkpoints, evaluation):
  ``World.on_rank0`` runs a function there and hands its result, or its exception, to every rank, so
  a refusal on rank 0 stops all ranks with the same error instead of leaving them at a barrier;
* the backend is gloo for CPU and nccl for CUDA (each rank on ``cuda:LOCAL_RANK``).

Example:
    >>> w = World(rank=1, size=2, local_rank=1)
    >>> w.rows(8)
    slice(4, 8, None)
    >>> World().on_rank0(lambda: "ran")
    'ran'
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass


class DistributedError(ValueError):
    """A training run that cannot be split over the processes ``torchrun`` started (names the fix)."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer: launch with "
                               "`torchrun --nproc_per_node N ...`, or unset RANK/WORLD_SIZE/LOCAL_RANK "
                               "for one process") from None


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (rank 0 of 1 without ``torchrun``)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes on this machine (torchrun's --nproc_per_node)

    @classmethod
    def from_env(cls) -> "World":
        """From torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (absent: one process)."""
        rank, size, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
        local_size = _env_int("LOCAL_WORLD_SIZE")
        if size is None and rank is None:
            return cls()
        if size is None or rank is None or not 0 <= rank < size:
            raise DistributedError(f"inconsistent torchrun environment (RANK={rank}, WORLD_SIZE={size}): launch "
                                   "with `torchrun --nproc_per_node N ...`, or unset both for one process")
        local = rank if local is None else local
        return cls(rank=rank, size=size, local_rank=local, local_size=max(local + 1, local_size or size))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        """DistributedError naming the fix unless ``batch_size`` (the global batch) splits evenly.

        Equal rows per rank make the mean of the per-rank mean losses the global mean (what one
        process minimises), so the gradients DDP averages are the one-process gradients."""
        if batch_size % self.size == 0:
            return
        procs = [d for d in range(2, batch_size + 1) if batch_size % d == 0][:6]  # the smallest few
        batches = sorted({(batch_size // self.size) * self.size, (batch_size // self.size + 1) * self.size} - {0})
        raise DistributedError(
            f"batch_size {batch_size} is not divisible by {self.size} processes (each process takes an equal "
            f"share of the global batch): use --nproc_per_node {_alternatives(procs) if procs else '1'}, or "
            f"--set batch_size={_alternatives(batches)} (a different global batch changes the run)")

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` (see ``check_batch``)."""
        per = batch_size // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def device(self, device: str) -> str:
        """The device this rank trains on: ``cuda`` becomes ``cuda:LOCAL_RANK``; one device per rank."""
        if not self.distributed:
            return device
        if device.startswith("cuda"):
            if ":" in device:
                raise DistributedError(f"device={device!r} under torchrun: pass --device cuda (each process "
                                       "uses cuda:LOCAL_RANK)")
            import torch

            n = torch.cuda.device_count()
            if n == 0:
                raise DistributedError("device='cuda' was asked for but no CUDA GPU is available: use --device cpu")
            if self.local_size > n:  # every rank sees it, so every rank stops (none waits for the others)
                raise DistributedError(f"torchrun started {self.local_size} processes on this machine but it has "
                                       f"{n} CUDA device(s) (one per process): use --nproc_per_node {n} or fewer")
            return f"cuda:{self.local_rank}"
        if device != "cpu":
            raise DistributedError(f"device={device!r} is not supported under torchrun: use --device cpu "
                                   "(gloo) or --device cuda (nccl)")
        return device

    @contextlib.contextmanager
    def joined(self, device: str, wait: float = 0.0):
        """Join the process group for the ``with`` block (gloo on CPU, nccl on CUDA); no-op for one process.

        ``wait``: seconds rank 0 may wait for the run folder's lock while the others wait in a
        collective; added to the backend's default timeout. A group made by the caller is used as it
        is and left open."""
        if not self.distributed:
            yield
            return
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            yield
            return
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

        backend = "nccl" if device.startswith("cuda") else "gloo"
        base = (default_pg_nccl_timeout or default_pg_timeout) if backend == "nccl" else default_pg_timeout
        timeout = base + datetime.timedelta(seconds=min(wait, 1e8))  # --wait inf: ~3 years, not an overflow
        dist.init_process_group(backend=backend, rank=self.rank, world_size=self.size, timeout=timeout,
                                device_id=torch.device(device) if device.startswith("cuda") else None)
        try:
            yield
        finally:
            dist.destroy_process_group()

    def on_rank0(self, fn):
        """``fn()`` on rank 0 only; every rank returns its result or raises its exception (a barrier)."""
        return self._from_rank0(fn, share_result=True)

    def rank0_first(self, fn):
        """``fn()`` on rank 0, then (if it succeeded) on the other ranks: for work that fills a shared
        cache, so that only one process writes it. Rank 0's exception reaches every rank."""
        out = self._from_rank0(fn, share_result=False)
        return out if self.is_main else fn()

    def _from_rank0(self, fn, share_result: bool):
        if not self.distributed:
            return fn()
        import pickle

        import torch.distributed as dist

        box = [None, None]
        if self.is_main:
            try:
                result = fn()
                box = [result if share_result else None, None]
            except Exception as e:  # handed to the other ranks, then raised here with its traceback
                try:
                    pickle.dumps(e)
                    box = [None, e]
                except Exception:  # an exception that cannot travel: its class name and message do
                    box = [None, RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}")]
                dist.broadcast_object_list(box, src=0)
                raise
            dist.broadcast_object_list(box, src=0)
            return result
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise box[1]
        return box[0]

    def mean(self, value):
        """The mean over ranks of a scalar tensor (the tensor itself for one process)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.size


def _alternatives(values: list[int]) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"
