"""Filling a live state from a complete snapshot (the in-memory counterpart of ``ckpt.load``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ckpt._state import _is_dtensor, init_optimizer_state, optimizers_in, plan_restore, raise_problems
from ckpt._tensors import byte_view, dtype_name
from ckpt.metadata import TensorMeta
from ckpt.snapshot._records import Snapshot

__all__ = ["restore_from_snapshot", "SnapshotCorruptError"]


class SnapshotCorruptError(ValueError):
    """A snapshot's bytes no longer match their checksums (``names`` lists the tensors)."""

    def __init__(self, step: int, names: list[str]) -> None:
        self.step, self.names = step, tuple(names)
        super().__init__(f"snapshot of step {step}: checksum mismatch in {', '.join(self.names)}; restore an older snapshot or a checkpoint")


def restore_from_snapshot(state: Any, snap: Snapshot, *, verify: bool = True) -> Any:
    """Fill ``state`` in place from ``snap`` (tensors copied, ``load_state_dict`` called on
    modules, optimizers and other stateful objects) and return the restored tree. A snapshot is
    restored into the layout it was taken in: DTensors get their local shards back.

    Raises:
        StateMismatchError: the state does not match the snapshot (every mismatch listed).
        SnapshotCorruptError: ``verify`` and a tensor's bytes no longer match their checksum.
    """
    if verify:
        bad = snap.verify()
        if bad:
            raise SnapshotCorruptError(snap.step, sorted(bad))
    metas = {n: TensorMeta(dtype=dtype_name(snap.dtypes[n]), shape=snap.shapes[n], chunks=()) for n in snap.buffers}
    # a fresh optimizer over DTensor parameters needs DTensor state to fill (new plain tensors
    # would not mix with its DTensor gradients)
    created = [o for o in optimizers_in(state) if not o.state and any(_is_dtensor(p) for g in o.param_groups for p in g["params"]) and init_optimizer_state(o)]
    plan = plan_restore(state, snap.tree, metas, local_dtensors=True)  # a snapshot holds local shards
    try:
        raise_problems(plan, where=f"snapshot of step {snap.step}")
    except Exception:
        for o in created:
            o.state.clear()
        raise
    with torch.no_grad():
        for name, target in plan.fills:
            if target.device.type == "cpu" and target.is_contiguous() and not target.is_conj() and not target.is_neg():
                np.copyto(byte_view(target.detach()), snap.buffers[name])
            else:
                target.copy_(snap.tensor(name))
    for fin in plan.finalizers:
        fin()
    return plan.state
