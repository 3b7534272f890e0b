"""Non-tensor state across a layout change: which saved rank's values a new rank takes, the
data position, and per-rank random streams. Pure functions (no torch), documented in
``docs/layouts.md`` ("Non-tensor state across layouts").

Rules:

* **Which saved rank.** A new rank takes the non-tensor values (step, hyper-parameters, user
  values) of the saved rank at the same coordinates on every axis both layouts have, clamped
  to the saved size; axes only one layout has count as coordinate 0. With an unchanged layout
  that is the same rank.
* **Data position.** Store the *global* sample index (samples consumed by the whole job), never
  a per-rank position: ``dp_shard`` derives each data-parallel rank's slice of the next global
  batch from it, for any data-parallel size, so no sample is skipped or repeated.
* **Random streams.** Per-rank RNG states saved under one layout mean nothing under another.
  ``derive_seed`` re-derives a rank's seed from the job's base seed, the step and the rank's
  coordinates on the axes that should get distinct streams (e.g. ``("dp",)`` for dropout masks
  that differ per data shard but agree across tensor-parallel ranks).
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional, Sequence

from ckpt.layout import Layout

__all__ = ["source_rank", "dp_shard", "derive_seed"]


def source_rank(saved_axes: Optional[Sequence[Sequence[Any]]], saved_world_size: int, target: Layout) -> int:
    """The saved rank whose non-tensor values target rank ``target.rank`` restores.

    Args:
        saved_axes: the manifest's ``layout["axes"]`` (``[[name, size], ...]``) or ``None`` when
            the save recorded no layout (then ranks map by number, rank 0 past the end).
        saved_world_size: ranks that wrote the checkpoint.
        target: the new rank's layout.
    """
    if not saved_axes:
        return target.rank if target.rank < saved_world_size else 0
    saved = Layout(tuple((str(n), int(s)) for n, s in saved_axes), 0)
    coords = target.coords
    return saved.rank_of({name: min(coords.get(name, 0), size - 1) for name, size in saved.axes})


def dp_shard(global_index: int, global_batch: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """Sample range ``[start, stop)`` of data-parallel rank ``dp_rank`` in the global batch that
    starts at sample ``global_index``. Batches that do not divide evenly give the first
    ``global_batch % dp_size`` ranks one sample more."""
    if global_batch < 0 or global_index < 0 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad data position: index {global_index}, batch {global_batch}, dp rank {dp_rank} of {dp_size}")
    base, extra = divmod(global_batch, dp_size)
    start = global_index + dp_rank * base + min(dp_rank, extra)
    return start, start + base + (1 if dp_rank < extra else 0)


def derive_seed(base_seed: int, step: int, coords: Mapping[str, int], axes: Sequence[str] = ("dp",)) -> int:
    """A 63-bit seed for the stream of the rank at ``coords`` (only ``axes`` count) at ``step``:
    the same on every rank that shares those coordinates, under any layout."""
    key = f"{base_seed}:{step}:" + ",".join(f"{a}={coords.get(a, 0)}" for a in sorted(axes))
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1
