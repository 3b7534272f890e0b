"""Snapshot slots in named POSIX shared memory, owned by the per-rank agent.

The agent creates (and alone unlinks) the segments, named ``ckpt-<job>-r<rank>-s<slot>-g<gen>``;
the trainer attaches to them through ``SharedMemoryBuffers`` (a ``SnapshotBuffers``) and never
unlinks them, so a trainer killed with SIGKILL leaves the snapshots in memory. Attached segments
are removed from Python's ``resource_tracker`` at once (Python < 3.13 registers every attach and
would unlink the agent's segments when the trainer exits).

Which slot holds which complete step is said by a small JSON slot table, ``slots.json`` in the
run directory, written atomically (temporary file and ``os.replace``) only after every tensor of
the snapshot is copied and checksummed: a crash at any point leaves the previous entry intact.
``SharedSnapshot`` opens an entry (attaching its segment) and quacks like the engine's
``Snapshot`` for ``restore_from_snapshot``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ckpt.snapshot._buffers import SnapshotBuffers, prefault

log = logging.getLogger("ckpt.snapshot")

__all__ = [
    "SharedMemoryBuffers",
    "SharedMemoryFullError",
    "SharedSnapshot",
    "create_segment",
    "attach_segment",
    "job_id",
    "pid_alive",
    "read_pid",
    "segment_prefix",
    "snapshot_entry",
    "read_table",
    "write_table",
    "TABLE_NAME",
    "PERSIST_NAME",
]

TABLE_NAME = "slots.json"
PERSIST_NAME = "persist.json"
TABLE_VERSION = 1
_MAX_TABLE_BYTES = 64 << 20


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def read_pid(path: str | os.PathLike) -> Optional[int]:
    """The pid in a pid file, or None."""
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def job_id(run_dir: str | os.PathLike) -> str:
    """A short stable id of a run directory (part of every segment name)."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]


def segment_prefix(run_dir: str | os.PathLike, rank: int) -> str:
    """The name prefix of rank ``rank``'s segments (``ckpt-<job>-r<rank>-``)."""
    return f"ckpt-{job_id(run_dir)}-r{rank}-"


class SharedMemoryFullError(OSError):
    """The shared-memory filesystem (``/dev/shm``) has no room for a snapshot slot."""


def create_segment(name: str, nbytes: int) -> shared_memory.SharedMemory:
    """Create segment ``name`` of ``nbytes`` (page-rounded), its memory reserved and pre-faulted.
    The creator owns it and must ``unlink()`` it exactly once (the resource tracker unlinks it if
    the creator dies).

    The pages are reserved with ``posix_fallocate`` before anything touches them: on a full
    ``/dev/shm`` a plain ``ftruncate`` succeeds and the first write then kills the process with
    SIGBUS; reserved, it fails here with ``SharedMemoryFullError`` instead.

    Raises:
        SharedMemoryFullError: not enough room in ``/dev/shm`` (nothing is left behind).
    """
    size = max(1, (nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE)
    seg = shared_memory.SharedMemory(name=name, create=True, size=size)
    try:
        fd = getattr(seg, "_fd", -1)
        if fd >= 0 and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
    except OSError as e:
        _close_quietly(seg)
        seg.unlink()
        try:
            st = os.statvfs("/dev/shm")
            free = f"{st.f_bavail * st.f_frsize / 2**30:.2f} GiB free of {st.f_blocks * st.f_frsize / 2**30:.2f} GiB"
        except OSError:
            free = "free space unknown"
        raise SharedMemoryFullError(
            e.errno,
            f"cannot reserve {size / 2**30:.2f} GiB of shared memory for snapshot slot {name} ({free} in /dev/shm): "
            "free /dev/shm (stale ckpt-* segments of dead agents?), enlarge it, or snapshot less state",
        ) from e
    prefault(np.ndarray((seg.size,), dtype=np.uint8, buffer=seg.buf))
    return seg


def attach_segment(name: str) -> shared_memory.SharedMemory:
    """Attach to an existing segment without taking ownership (never unlinked by this process).

    Raises:
        FileNotFoundError: no such segment (its agent is gone).
    """
    seg = shared_memory.SharedMemory(name=name, create=False)
    try:  # Python < 3.13 registers attached segments too; the owner alone may unlink
        resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - tracker unavailable
        pass
    return seg


def _close_quietly(seg: shared_memory.SharedMemory) -> None:
    try:
        seg.close()
    except BufferError:  # a numpy view still exists; the mapping goes when it is collected
        pass


class SharedMemoryBuffers(SnapshotBuffers):
    """Engine slots in segments created by the agent.

    Args:
        allocate_fn: ``allocate_fn(slot, nbytes) -> segment name``: asks the owner (the agent)
            for a segment of at least ``nbytes`` for ``slot``; it may return the slot's current
            segment when large enough.
        slot_map: engine slot index -> owner slot index (lets a restarted trainer keep off the
            slot that holds the snapshot it restored from); its keys are the engine's slots.

    The first allocation also creates every engine slot of ``slot_map`` not created yet, at the
    same size: later snapshots then reuse slots that exist and never wait for the owner, so a
    busy or hung agent cannot hold up a copy (which the optimizer's guard may be waiting for).
    Only a state that grows asks the owner again.
    """

    def __init__(self, allocate_fn: Callable[[int, int], str], slot_map: Optional[dict[int, int]] = None) -> None:
        self._allocate_fn = allocate_fn
        self._slot_map = dict(slot_map or {})
        self._segs: dict[int, shared_memory.SharedMemory] = {}
        self._arrays: dict[int, np.ndarray] = {}

    def owner_slot(self, slot: int) -> int:
        return self._slot_map.get(slot, slot)

    def segment_name(self, slot: int) -> Optional[str]:
        seg = self._segs.get(slot)
        return None if seg is None else seg.name

    def allocate(self, slot: int, nbytes: int) -> np.ndarray:
        cur = self._arrays.get(slot)
        if cur is not None and cur.size >= nbytes:
            return cur
        del cur
        arr = self._allocate_one(slot, nbytes)
        for other in self._slot_map:  # the slots not created yet: nothing lives in them
            if other not in self._arrays:
                try:
                    self._allocate_one(other, nbytes)
                except Exception as e:  # asked again when that slot is first used
                    log.warning("could not create snapshot slot %d ahead of use: %r", other, e)
        return arr

    def _allocate_one(self, slot: int, nbytes: int) -> np.ndarray:
        self.free(slot)
        name = self._allocate_fn(self.owner_slot(slot), nbytes)
        seg = attach_segment(name)
        arr = np.ndarray((seg.size,), dtype=np.uint8, buffer=seg.buf)
        if arr.size < nbytes:
            _close_quietly(seg)
            raise RuntimeError(f"agent gave segment {name} of {arr.size} bytes for a request of {nbytes}")
        self._segs[slot], self._arrays[slot] = seg, arr
        return arr

    def slot_of(self, arr: np.ndarray) -> Optional[int]:
        """The engine slot whose memory contains ``arr`` (a view into it), or None."""
        addr = arr.__array_interface__["data"][0]
        for slot, base in self._arrays.items():
            lo = base.__array_interface__["data"][0]
            if lo <= addr < lo + max(base.size, 1):
                return slot
        return None

    def view(self, slot: int) -> np.ndarray:
        return self._arrays.get(slot, np.empty(0, dtype=np.uint8))

    def free(self, slot: int) -> None:
        self._arrays.pop(slot, None)
        seg = self._segs.pop(slot, None)
        if seg is not None:
            _close_quietly(seg)

    @property
    def memory_bytes(self) -> int:
        return sum(a.size for a in self._arrays.values())

    def _slots(self) -> list[int]:
        return list(self._segs)


def snapshot_entry(snap: Any, buffers: SharedMemoryBuffers) -> dict[str, Any]:
    """The slot-table entry of a complete engine ``Snapshot`` held in ``buffers``."""
    from ckpt._tensors import dtype_name

    tensors, slot = [], None
    for name, arr in snap.buffers.items():
        s = buffers.slot_of(arr) if arr.size else None
        if s is not None:
            slot = s
    if slot is None and snap.buffers:
        slot = next(iter(buffers._arrays), None)  # every tensor is empty: any attached slot
    if slot is None:
        raise RuntimeError(f"snapshot of step {snap.step} is not in a shared-memory slot")
    base = buffers.view(slot).__array_interface__["data"][0]
    for name, arr in snap.buffers.items():
        off = arr.__array_interface__["data"][0] - base if arr.size else 0
        tensors.append(
            dict(name=name, offset=int(off), nbytes=int(arr.size), dtype=dtype_name(snap.dtypes[name]), shape=list(snap.shapes[name]), checksum=snap.checksums[name])
        )
    return dict(
        version=TABLE_VERSION,
        step=int(snap.step),
        slot=buffers.owner_slot(slot),
        segment=buffers.segment_name(slot),
        algorithm=snap.algorithm,
        tensors=tensors,
        ndarrays=sorted(snap.ndarrays),
        tree=snap.tree,
    )


def write_table(run_dir: str | os.PathLike, entry: dict[str, Any], name: str = TABLE_NAME) -> None:
    """Atomically replace the slot table ``name`` with ``entry`` (the latest complete snapshot;
    ``PERSIST_NAME``: the latest one handed to the agent for persisting)."""
    path = Path(run_dir) / name
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:  # no fsync: the table matters only while the machine (and the
        json.dump(entry, f)  # shared memory it describes) is up; a killed process loses nothing
    os.replace(tmp, path)


def read_table(run_dir: str | os.PathLike, name: str = TABLE_NAME) -> Optional[dict[str, Any]]:
    """The slot table's entry, or None when there is none or it is malformed."""
    path = Path(run_dir) / name
    try:
        if path.stat().st_size > _MAX_TABLE_BYTES:
            return None
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        ok = (
            isinstance(entry, dict)
            and entry.get("version") == TABLE_VERSION
            and isinstance(entry["step"], int)
            and isinstance(entry["slot"], int)
            and isinstance(entry["segment"], str)
            and isinstance(entry["tensors"], list)
            and all(isinstance(t["name"], str) and isinstance(t["offset"], int) and isinstance(t["nbytes"], int) for t in entry["tensors"])
        )
    except (KeyError, TypeError):
        ok = False
    return entry if ok else None


class SharedSnapshot:
    """A slot-table entry opened for reading: attaches the segment (read through numpy views).

    Has the attributes ``restore_from_snapshot`` reads (``step``, ``tree``, ``ndarrays``,
    ``buffers``, ``checksums``, ``dtypes``, ``shapes``, ``verify()``, ``tensor()``).

    Args:
        entry: a slot-table entry (``read_table``).
        segment: the segment itself, when the caller owns it (the agent); else it is attached.

    Raises:
        FileNotFoundError: the segment is gone (its agent exited).
        ValueError: the entry does not fit the segment.
    """

    def __init__(self, entry: dict[str, Any], segment: Optional[shared_memory.SharedMemory] = None) -> None:
        from ckpt._tensors import torch_dtype

        self.step = entry["step"]
        self.tree = entry["tree"]
        self.ndarrays = frozenset(entry.get("ndarrays", ()))
        self.algorithm = entry["algorithm"]
        self._own = segment is None  # the owner passes its own segment: never attach (or close) it
        self._seg = attach_segment(entry["segment"]) if segment is None else segment
        if self._seg.name.lstrip("/") != entry["segment"].lstrip("/"):
            raise ValueError(f"slot table names segment {entry['segment']}, the slot holds {self._seg.name}")
        whole = np.ndarray((self._seg.size,), dtype=np.uint8, buffer=self._seg.buf)
        self.buffers, self.checksums, self.dtypes, self.shapes = {}, {}, {}, {}
        for t in entry["tensors"]:
            if t["offset"] < 0 or t["nbytes"] < 0 or t["offset"] + t["nbytes"] > whole.size:
                self.close()
                raise ValueError(f"slot table entry of step {self.step}: tensor {t['name']!r} lies outside segment {entry['segment']}")
            self.buffers[t["name"]] = whole[t["offset"] : t["offset"] + t["nbytes"]]
            self.checksums[t["name"]] = t["checksum"]
            self.dtypes[t["name"]] = torch_dtype(t["dtype"])
            self.shapes[t["name"]] = tuple(t["shape"])
        del whole

    def tensor(self, name: str):  # noqa: ANN201
        import torch

        raw = torch.from_numpy(self.buffers[name])
        return raw.view(self.dtypes[name]).view(self.shapes[name]) if raw.numel() else torch.empty(self.shapes[name], dtype=self.dtypes[name])

    def verify(self) -> list[str]:
        from ckpt.codecs import checksum

        return [n for n, b in self.buffers.items() if checksum(self.algorithm, b) != self.checksums[n]]

    def close(self) -> None:
        self.buffers = {}
        if self._own:
            _close_quietly(self._seg)

    def __enter__(self) -> SharedSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
