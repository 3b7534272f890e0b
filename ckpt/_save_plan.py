"""Pure planning for a save: how a rank's chunks pack into data objects. (Who writes which
region is ``ckpt._reshard.plan_save``.) No I/O, no torch."""

from __future__ import annotations

import math
from typing import Sequence


__all__ = ["pack_objects"]

#: ``(offsets, sizes)`` of a region of a tensor.
Region = tuple[tuple[int, ...], tuple[int, ...]]


def pack_objects(
    sizes: Sequence[int], *, max_object_bytes: int, min_objects: int = 1, min_object_bytes: int = 16 << 20
) -> list[list[int]]:
    """Group item indices (in order) into objects of about ``max_object_bytes``.

    The target size shrinks so that at least ``min_objects`` objects exist when there is enough
    data (a pool of that many threads then writes in parallel), but not below
    ``min_object_bytes``: small states stay in one object. An item larger than the target gets
    an object of its own.
    """
    total = sum(sizes)
    if not sizes:
        return []
    spread = math.ceil(total / max(1, min_objects))
    target = max(1, min(max_object_bytes, max(spread, min(min_object_bytes, max_object_bytes))))
    groups: list[list[int]] = [[]]
    filled = 0
    for i, s in enumerate(sizes):
        if groups[-1] and filled + s > target:
            groups.append([])
            filled = 0
        groups[-1].append(i)
        filled += s
    return groups
