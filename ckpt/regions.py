"""Box arithmetic for tensor regions: pure, no torch, no I/O.

A ``Box`` is an n-d region ``[offsets, offsets + sizes)`` of a tensor. Stored chunks, the
regions a rank holds, and the regions a target needs are all boxes; the planners intersect
them and turn intersections into byte runs inside stored chunks.

Storage order: a chunk MAY be stored with its dimensions permuted (``order``, a permutation of
``range(ndim)``, slowest-varying first), e.g. ``(1, 0)`` stores a matrix column-major so that a
range of columns is one contiguous byte run. ``order=None`` is the identity (C order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

__all__ = [
    "Box",
    "Run",
    "flat_range_to_boxes",
    "box_runs",
    "coalesce_runs",
    "split_box",
    "check_order",
]

#: ``(start, length)`` in elements (or bytes, when scaled) within a stored chunk.
Run = tuple[int, int]


@dataclass(frozen=True, order=True)
class Box:
    """An n-d region ``[offsets, offsets + sizes)``; 0-d boxes have empty tuples."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.sizes):
            raise ValueError(f"box offsets {self.offsets} and sizes {self.sizes} differ in length")
        if any(o < 0 for o in self.offsets) or any(s < 0 for s in self.sizes):
            raise ValueError(f"box offsets {self.offsets} and sizes {self.sizes} must be >= 0")

    @classmethod
    def whole(cls, shape: Sequence[int]) -> "Box":
        return cls((0,) * len(shape), tuple(shape))

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    @property
    def empty(self) -> bool:
        return self.numel == 0

    def intersect(self, other: "Box") -> Optional["Box"]:
        """The common region, or ``None`` if they do not overlap (or either is empty)."""
        if self.ndim != other.ndim:
            raise ValueError(f"cannot intersect boxes of {self.ndim} and {other.ndim} dims")
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a, b) for a, b in zip(self.ends, other.ends))
        if any(h <= l for l, h in zip(lo, hi)) or self.empty or other.empty:
            return None
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))

    def contains(self, other: "Box") -> bool:
        return all(a <= b for a, b in zip(self.offsets, other.offsets)) and all(
            a >= b for a, b in zip(self.ends, other.ends)
        )

    def relative_to(self, outer: "Box") -> "Box":
        """This box in the coordinates of ``outer`` (which must contain it)."""
        return Box(tuple(a - b for a, b in zip(self.offsets, outer.offsets)), self.sizes)

    def shift(self, delta: Sequence[int]) -> "Box":
        return Box(tuple(a + d for a, d in zip(self.offsets, delta)), self.sizes)

    def permute(self, order: Optional[Sequence[int]]) -> "Box":
        if order is None:
            return self
        return Box(tuple(self.offsets[d] for d in order), tuple(self.sizes[d] for d in order))

    def to_json(self) -> dict:
        return {"offsets": list(self.offsets), "sizes": list(self.sizes)}


def check_order(order: Optional[Sequence[int]], ndim: int) -> Optional[tuple[int, ...]]:
    """Validate a storage order; identity is normalised to ``None``."""
    if order is None:
        return None
    order = tuple(order)
    if sorted(order) != list(range(ndim)):
        raise ValueError(f"storage order {list(order)} is not a permutation of range({ndim})")
    return None if order == tuple(range(ndim)) else order


def flat_range_to_boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """The elements ``[start, stop)`` of a C-order tensor of ``shape`` as at most ``2*ndim-1``
    boxes, in C order (so their concatenation is exactly that flat range).

    Raises:
        ValueError: a negative dimension, or not ``0 <= start <= stop <= prod(shape)``.
    """
    shape = tuple(shape)
    if any(type(d) is not int or d < 0 for d in shape):
        raise ValueError(f"shape {list(shape)} must be non-negative integers")
    total = math.prod(shape)
    if not (type(start) is int and type(stop) is int and 0 <= start <= stop <= total):
        raise ValueError(f"flat range [{start}, {stop}) is not within the {total} elements of shape {list(shape)}")
    if start == stop:
        return []
    return [Box(o, s) for o, s in _flat_boxes(shape, start, stop)]


def _flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``flat_range_to_boxes`` on a non-empty, valid range, as ``(offsets, sizes)`` pairs.

    At most ``ndim-1`` boxes for the partial head row (going up), one block of whole rows, and
    at most ``ndim-1`` for the partial tail row (going down).
    """
    if not shape:
        return [((), ())]
    row = math.prod(shape[1:])  # elements per index of dim 0 (> 0: the range is non-empty)
    rest = shape[1:]
    first, last = start // row, stop // row
    if first == last:  # inside one row: recurse into it
        return [((first,) + o, (1,) + s) for o, s in _flat_boxes(rest, start - first * row, stop - first * row)]
    out = []
    if start % row:  # partial head row
        out += [((first,) + o, (1,) + s) for o, s in _flat_boxes(rest, start % row, row)]
        first += 1
    if last > first:  # whole rows
        out.append(((first,) + (0,) * len(rest), (last - first,) + rest))
    if stop % row:  # partial tail row
        out += [((last,) + o, (1,) + s) for o, s in _flat_boxes(rest, 0, stop % row)]
    return out


def box_runs(chunk: Box, inner: Box, order: Optional[Sequence[int]] = None) -> list[Run]:
    """Element runs ``(start, length)`` covering ``inner`` inside ``chunk`` stored in ``order``.

    Runs are in storage order, contiguous runs merged; their concatenation is ``inner``'s
    elements in ``order`` (i.e. ``inner.permute(order)`` in C order). The work is linear in
    the number of runs (the product of ``inner``'s sizes over the storage dims before its
    trailing fully covered block), never in the number of elements.

    Raises:
        ValueError: ``inner`` is not inside ``chunk`` or ``order`` is not a permutation.
    """
    if chunk.ndim != inner.ndim or not chunk.contains(inner):
        raise ValueError(f"box {inner} is not inside chunk {chunk}")
    order = check_order(order, chunk.ndim)
    if inner.empty:
        return []
    full = chunk.permute(order).sizes
    rel = inner.relative_to(chunk).permute(order)
    offs, sizes = rel.offsets, rel.sizes
    strides = [math.prod(full[d + 1 :]) for d in range(len(full))]
    k = len(full) - 1  # the innermost dim not fully covered (dims after it are whole)
    while k > 0 and sizes[k] == full[k]:
        k -= 1
    if k < 0:  # 0-d
        return [(0, 1)]
    starts = [offs[k] * strides[k]]
    for d in range(k - 1, -1, -1):  # outer dims: one run per index combination
        base = [(offs[d] + i) * strides[d] for i in range(sizes[d])]
        starts = [b + s for b in base for s in starts]
    length = sizes[k] * strides[k]
    # Consecutive runs are separated by (full[k] - sizes[k]) * strides[k] > 0 elements when
    # k > 0, and there is one run when k == 0: so they are already maximal.
    return [(s, length) for s in starts]


def coalesce_runs(runs: Iterable[Run], *, max_gap: int) -> list[Run]:
    """Merge sorted runs whose gap is at most ``max_gap`` (reading a little extra is cheaper
    than another request); returns covering runs, sorted.

    Overlapping runs merge too; empty runs are dropped.

    Raises:
        ValueError: ``max_gap`` or a length is negative, or the runs are not sorted by start.
    """
    if max_gap < 0:
        raise ValueError(f"max_gap {max_gap} must be >= 0")
    out: list[list[int]] = []
    prev_start = None
    for start, length in runs:
        if length < 0 or start < 0:
            raise ValueError(f"run ({start}, {length}) has a negative start or length")
        if prev_start is not None and start < prev_start:
            raise ValueError(f"runs are not sorted by start: {start} after {prev_start}")
        prev_start = start
        if length == 0:
            continue
        if out and start - (out[-1][0] + out[-1][1]) <= max_gap:
            last = out[-1]
            last[1] = max(last[1], start + length - last[0])
        else:
            out.append([start, length])
    return [(s, n) for s, n in out]


def split_box(box: Box, *, max_numel: int, order: Optional[Sequence[int]] = None) -> list[Box]:
    """Cut ``box`` along its outermost storage dimension (``order[0]``, or dim 0) into boxes of
    at most ``max_numel`` elements (at least one slice each); in storage order.

    A single slice larger than ``max_numel`` is returned whole. 0-d and empty boxes come back
    as ``[box]``.

    Raises:
        ValueError: ``max_numel < 1`` or ``order`` is not a permutation.
    """
    if max_numel < 1:
        raise ValueError(f"max_numel {max_numel} must be >= 1")
    order = check_order(order, box.ndim)
    if box.ndim == 0 or box.empty:
        return [box]
    dim = order[0] if order else 0
    extent = box.sizes[dim]
    step = max(1, max_numel // (box.numel // extent))
    out = []
    for lo in range(0, extent, step):
        offsets = box.offsets[:dim] + (box.offsets[dim] + lo,) + box.offsets[dim + 1 :]
        sizes = box.sizes[:dim] + (min(step, extent - lo),) + box.sizes[dim + 1 :]
        out.append(Box(offsets, sizes))
    return out
