"""Where snapshot bytes live: a ``SnapshotBuffers`` allocator of numbered, reused byte slots.

The engine asks for a slot of ``nbytes`` and gets a flat ``uint8`` numpy array it copies into.
Every page is touched once when a slot is (re)allocated, so no copy ever pays a page fault, and
a slot is kept and reused until a larger one is needed. ``InProcessBuffers`` keeps the slots in
this process's heap; ``PinnedBuffers`` in page-locked memory for device-to-host copies. A
shared-memory implementation (the per-rank agent owns the slots) fits the same interface.
"""

from __future__ import annotations

import mmap
import threading
from abc import ABC, abstractmethod

import numpy as np

__all__ = ["SnapshotBuffers", "InProcessBuffers", "PinnedBuffers", "PAGE"]

PAGE = mmap.PAGESIZE


def _round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def prefault(buf: np.ndarray) -> None:
    """Touch every page of ``buf`` once (one write per page), so later copies find it mapped."""
    if buf.size:
        buf[::PAGE] = 0
        buf[-1] = 0


class SnapshotBuffers(ABC):
    """An allocator of numbered byte slots that outlive single snapshots.

    Thread safety: ``allocate``/``view``/``free`` of one slot are called by one thread at a time
    (the engine's copier); ``memory_bytes`` may be read from any thread.
    """

    @abstractmethod
    def allocate(self, slot: int, nbytes: int) -> np.ndarray:
        """Return slot ``slot`` as a pre-faulted ``uint8`` array of at least ``nbytes`` bytes,
        reusing the slot's current memory when it is large enough (its contents are then kept)."""

    @abstractmethod
    def view(self, slot: int) -> np.ndarray:
        """The slot's current memory (empty if never allocated)."""

    @abstractmethod
    def free(self, slot: int) -> None:
        """Give the slot's memory back."""

    @property
    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes held by all slots now."""

    def close(self) -> None:
        """Give back every slot."""
        for slot in list(self._slots()):
            self.free(slot)

    @abstractmethod
    def _slots(self) -> list[int]: ...

    def as_tensor(self, slot: int):  # noqa: ANN201 - torch is imported lazily
        """The slot as a flat ``uint8`` torch tensor sharing its memory."""
        import torch

        return torch.from_numpy(self.view(slot))


class InProcessBuffers(SnapshotBuffers):
    """Slots in this process's heap (numpy arrays, page-aligned sizes)."""

    def __init__(self) -> None:
        self._bufs: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _new(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, dtype=np.uint8)

    def allocate(self, slot: int, nbytes: int) -> np.ndarray:
        with self._lock:
            cur = self._bufs.get(slot)
        if cur is not None and cur.size >= nbytes:
            return cur
        del cur
        self.free(slot)  # drop the old one first: peak memory stays one slot
        buf = self._new(_round_up(max(nbytes, 1)))
        prefault(buf)
        with self._lock:
            self._bufs[slot] = buf
        return buf

    def view(self, slot: int) -> np.ndarray:
        with self._lock:
            return self._bufs.get(slot, np.empty(0, dtype=np.uint8))

    def free(self, slot: int) -> None:
        with self._lock:
            self._bufs.pop(slot, None)

    @property
    def memory_bytes(self) -> int:
        with self._lock:
            return sum(b.size for b in self._bufs.values())

    def _slots(self) -> list[int]:
        with self._lock:
            return list(self._bufs)


class PinnedBuffers(InProcessBuffers):
    """Slots in page-locked host memory (``torch.empty(..., pin_memory=True)``), the target of
    asynchronous device-to-host copies on a side CUDA stream. Needs CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self._pinned: dict[int, object] = {}  # id(numpy view) -> its pinned tensor

    def _new(self, nbytes: int) -> np.ndarray:
        import torch

        t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        arr = t.numpy()
        self._pinned[id(arr)] = t
        return arr

    def as_tensor(self, slot: int):  # noqa: ANN201 - torch is imported lazily
        """The slot as the pinned ``uint8`` tensor itself (so ``copy_`` sees pinned memory)."""
        return self._pinned[id(self.view(slot))]

    def free(self, slot: int) -> None:
        with self._lock:
            buf = self._bufs.pop(slot, None)
        if buf is not None:
            self._pinned.pop(id(buf), None)
