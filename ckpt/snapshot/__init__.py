"""Lazy in-process snapshots of a training state into reused host buffers.

``SnapshotEngine`` records a state's tensors at ``snapshot(step)`` and copies them on a
background thread into the slots of a ``SnapshotBuffers`` (``InProcessBuffers`` here;
``PinnedBuffers`` for CUDA; shared memory owned by the per-rank agent later); a guard on the
optimizer waits only for the tensors it will write that are not copied yet.
``restore_from_snapshot`` fills a live state from a complete snapshot.

Example::

    with SnapshotEngine({"model": model, "optim": opt, "step": step}) as engine:
        engine.register_guard(opt)
        for step in ...:
            loss = train_step()          # forward, backward, opt.step() (the guard may wait)
            engine.snapshot(step)        # returns at once
        with engine.latest_complete() as snap:
            restore_from_snapshot(state, snap)
"""

from ckpt.snapshot._buffers import InProcessBuffers, PinnedBuffers, SnapshotBuffers
from ckpt.snapshot._engine import CopyFn, SnapshotEngine
from ckpt.snapshot._records import Snapshot, SnapshotFailedError, SnapshotPolicy
from ckpt.snapshot._restore import SnapshotCorruptError, restore_from_snapshot

__all__ = [
    "SnapshotEngine",
    "SnapshotPolicy",
    "Snapshot",
    "SnapshotBuffers",
    "InProcessBuffers",
    "PinnedBuffers",
    "SnapshotFailedError",
    "SnapshotCorruptError",
    "CopyFn",
    "restore_from_snapshot",
]
