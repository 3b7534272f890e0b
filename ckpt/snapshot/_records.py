"""The snapshot engine's records: its policy, the per-tensor entries and slots of a snapshot in
flight, and ``Snapshot``, a complete one pinned in its slot. No threads run here."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from ckpt.codecs import checksum

__all__ = ["SnapshotFailedError", "SnapshotPolicy", "Snapshot", "Flag", "Entry", "Slot", "Job", "storage_key"]


class SnapshotFailedError(RuntimeError):
    """Snapshots failed ``max_failures`` times in a row (the last error is the ``__cause__``)."""


@dataclass(frozen=True)
class SnapshotPolicy:
    """What the engine does under pressure.

    Attributes:
        backpressure: ``"skip"`` (log and skip the snapshot) or ``"wait"`` (block ``snapshot()``
            until a slot frees, at most ``wait_timeout_s``, then skip) when no slot is free.
        wait_timeout_s: the longest ``"wait"`` blocks; ``None`` waits as long as it takes.
        max_failures: ``snapshot()`` raises ``SnapshotFailedError`` when this many snapshots in
            a row failed in the copier; fewer are logged once each.
        checksum: the algorithm of the per-tensor checksums (``"xxh3_64"``: about twice as fast
            as CRC32C here, and every core-second the copier spends is taken from training;
            these checksums guard memory only, a persisted checkpoint gets its own).
        yield_threads: how many of torch's intra-op threads the training thread gives up while
            a snapshot's host copy runs, so the copier has a core (see ``_yield``): 0 (the
            default) never; ``None`` (auto) 1 when torch trains on every core available. They
            come back at the first gradient accumulation, guarded forward or optimizer step
            after the copy, or at ``wait()``/``close()`` (a ``torch.set_num_threads`` of yours
            in between is overwritten then). Off by default: CPU kernels may round differently
            with another thread count, and when the threads come back depends on timing, so
            CPU training with it is no longer bit-reproducible run to run.
    """

    backpressure: str = "skip"
    wait_timeout_s: Optional[float] = None
    max_failures: int = 3
    checksum: str = "xxh3_64"
    yield_threads: Optional[int] = 0

    def __post_init__(self) -> None:
        if self.backpressure not in ("skip", "wait"):
            raise ValueError(f"backpressure must be 'skip' or 'wait', not {self.backpressure!r}")
        if self.max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, not {self.max_failures}")
        if self.wait_timeout_s is not None and self.wait_timeout_s < 0:
            raise ValueError(f"wait_timeout_s must be >= 0 or None, not {self.wait_timeout_s}")
        if self.yield_threads is not None and (type(self.yield_threads) is not int or self.yield_threads < 0):
            raise ValueError(f"yield_threads must be an int >= 0 or None (auto), not {self.yield_threads!r}")


class Flag:
    """A one-way flag like ``threading.Event``, but all flags of an engine share one condition:
    a snapshot has a done (and an issued) flag per tensor, and creating two Events per tensor
    per step was most of the time ``snapshot()`` took (~10 us each)."""

    __slots__ = ("_cond", "_set")

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._cond:
            self._set = True
            self._cond.notify_all()  # cheap with nobody waiting, the usual case

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._set:
            return True
        with self._cond:
            return self._cond.wait_for(lambda: self._set, timeout)


@dataclass(eq=False)
class Entry:
    name: str
    src: Optional[torch.Tensor]  # dropped once copied, so the engine keeps no tensor alive
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    key: int  # the source's storage address: tensors sharing storage share a key
    cuda: bool
    done: Flag
    issued: Flag  # CUDA: copy enqueued
    cuda_event: Any = None


@dataclass(eq=False)
class Slot:
    index: int
    status: str = "free"  # free | busy | complete | stale (complete, superseded, still pinned)
    pins: int = 0
    job: Optional["Job"] = None


@dataclass(eq=False)
class Job:
    step: int
    slot: Slot
    entries: list[Entry]
    total: int
    tree: Any
    ndarrays: frozenset[str]
    ready_event: Any = None  # CUDA event on the compute stream at snapshot()
    checksums: dict[str, str] = field(default_factory=dict)
    buffer: Optional[np.ndarray] = None
    finished: threading.Event = field(default_factory=threading.Event)
    host_pending: bool = False  # counted in the engine's pending host copies


class Snapshot:
    """A complete snapshot, pinned in its slot until ``release()`` (or the ``with`` block ends).

    Attributes:
        step: the training step it was taken at.
        tree: the state's JSON tree (plain values as of ``snapshot(step)``).
        buffers: ``{tensor name: uint8 array}``, views into the slot.
        checksums: ``{tensor name: hex checksum}`` of those bytes.
        algorithm: the checksum algorithm.
        dtypes, shapes: each tensor's dtype and shape.
    """

    def __init__(self, job: Job, algorithm: str, release: Callable[[], None]) -> None:
        assert job.buffer is not None
        self.step = job.step
        self.tree = job.tree
        self.ndarrays = job.ndarrays
        self.algorithm = algorithm
        self.buffers = {e.name: job.buffer[e.offset : e.offset + e.nbytes] for e in job.entries}
        self.checksums = dict(job.checksums)
        self.dtypes = {e.name: e.dtype for e in job.entries}
        self.shapes = {e.name: e.shape for e in job.entries}
        self._release = release
        self._released = False

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a CPU tensor viewing the slot (valid until ``release()``)."""
        raw = torch.from_numpy(self.buffers[name])
        return raw.view(self.dtypes[name]).view(self.shapes[name]) if raw.numel() else torch.empty(self.shapes[name], dtype=self.dtypes[name])

    def verify(self) -> list[str]:
        """Names of the tensors whose bytes no longer match their checksum."""
        return [n for n, b in self.buffers.items() if checksum(self.algorithm, b) != self.checksums[n]]

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.buffers = {}
            self._release()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def storage_key(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().data_ptr())
    except Exception:  # a tensor without storage: key by identity
        return id(t)
