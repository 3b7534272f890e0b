"""Pure planning for a save: who writes which tensor, how tensors split into chunks, and how
chunks pack into data objects. No I/O, no torch, no collectives: every rank runs the same
function on the same gathered input and gets the same answer, so no plan is scattered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from ckpt.metadata import DTYPE_ITEMSIZE

__all__ = ["LocalTensor", "assign_owners", "split_rows", "pack_objects", "Region"]

#: ``(offsets, sizes)`` of a region of a tensor.
Region = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class LocalTensor:
    """What a rank tells the others about one tensor it holds."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_ITEMSIZE[self.dtype]


def assign_owners(local: Sequence[Mapping[str, LocalTensor]]) -> tuple[dict[str, int], list[str]]:
    """Pick one writer per tensor name, balancing bytes across the ranks that hold it.

    A name held by several ranks is a replica of one logical tensor and is written once. Ranks
    are filled largest tensor first, each to the least-loaded rank that holds it (ties go to the
    lowest rank), so replicated state is spread instead of landing on rank 0.

    Returns:
        ``(owners, problems)``: ``owners[name] = rank``; ``problems`` lists names whose dtype or
        shape differs between ranks (then ``owners`` must not be used).
    """
    holders: dict[str, list[int]] = {}
    meta: dict[str, LocalTensor] = {}
    problems: list[str] = []
    for rank, tensors in enumerate(local):
        for name, t in tensors.items():
            if name in meta and meta[name] != t:
                first = holders[name][0]
                problems.append(
                    f"tensor {name!r}: rank {first} has {meta[name].dtype}{list(meta[name].shape)}, "
                    f"rank {rank} has {t.dtype}{list(t.shape)}; replicas must agree (give rank-local "
                    "tensors distinct names)"
                )
                continue
            meta.setdefault(name, t)
            holders.setdefault(name, []).append(rank)
    load = [0] * len(local)
    owners: dict[str, int] = {}
    for name in sorted(meta, key=lambda n: (-meta[n].nbytes, n)):
        rank = min(holders[name], key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += meta[name].nbytes
    return owners, problems


def split_rows(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> list[Region]:
    """Split a tensor along dim 0 into regions of at most ``chunk_bytes`` (at least one row)."""
    if not shape:
        return [((), ())]
    row_bytes = math.prod(shape[1:]) * itemsize
    total_rows = shape[0]
    if row_bytes == 0 or total_rows * row_bytes <= chunk_bytes:
        return [((0,) * len(shape), tuple(shape))]
    rows = max(1, chunk_bytes // row_bytes)
    rest = tuple(shape[1:])
    zeros = (0,) * len(rest)
    return [((start,) + zeros, (min(rows, total_rows - start),) + rest) for start in range(0, total_rows, rows)]


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
