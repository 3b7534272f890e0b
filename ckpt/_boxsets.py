"""Checks on sets of boxes: do distinct boxes overlap, and what part of a box do they leave
uncovered. Used by the resharding planners (``ckpt._reshard``) to check that the regions of a
tensor tile it exactly. Pure functions over ``Box`` values; no torch, no I/O."""

from __future__ import annotations

import bisect
from operator import lt
from typing import Optional, Sequence

from ckpt.regions import Box

__all__ = ["find_overlap", "overlap_among", "find_gap"]

#: Up to this many distinct regions per tensor, overlaps are checked pairwise.
PAIRWISE_MAX = 32


def find_overlap(boxes: Sequence[Box]) -> Optional[tuple[int, int]]:
    """Indices ``(i, j)``, ``i < j``, of two overlapping boxes among distinct non-empty boxes,
    or ``None``."""
    return overlap_among([b.offsets for b in boxes], [b.ends for b in boxes])


def overlap_among(
    los: Sequence[tuple[int, ...]], his: Sequence[tuple[int, ...]], *, pairwise_max: int = PAIRWISE_MAX
) -> Optional[tuple[int, int]]:
    """``find_overlap`` on boxes given by their offsets and ends.

    Pairwise up to ``pairwise_max`` boxes; above, a sweep along the dimension with the most
    distinct offsets: ``O(n log n)`` for 1-D and 2-D; for 3+ dims each entering box is checked
    against the boxes active at its coordinate (``O(n * active)``).
    """
    n = len(los)
    if n < 2:
        return None
    if n <= pairwise_max:
        for i in range(n):
            lo_i, hi_i = los[i], his[i]
            for j in range(i + 1, n):
                if all(map(lt, lo_i, his[j])) and all(map(lt, los[j], hi_i)):
                    return (i, j)
        return None
    return _sweep_overlap(los, his)


def _sweep_overlap(los: Sequence[tuple[int, ...]], his: Sequence[tuple[int, ...]]) -> Optional[tuple[int, int]]:
    n, ndim = len(los), len(los[0])
    if ndim == 0:  # distinct 0-d boxes cannot exist; two equal ones overlap
        return (0, 1)
    s = max(range(ndim), key=lambda k: (len({lo[k] for lo in los}), -k))
    others = [k for k in range(ndim) if k != s]
    # At one coordinate, boxes ending there leave (0) before boxes starting there enter (1).
    events = sorted([(his[i][s], 0, i) for i in range(n)] + [(los[i][s], 1, i) for i in range(n)])
    if len(others) == 1:  # active boxes are disjoint intervals along t: sorted, check neighbours
        t = others[0]
        keys: list[tuple[int, int]] = []
        for _, enter, i in events:
            key = (los[i][t], i)
            pos = bisect.bisect_left(keys, key)
            if not enter:
                del keys[pos]
                continue
            if pos > 0 and his[keys[pos - 1][1]][t] > los[i][t]:
                return _ordered(keys[pos - 1][1], i)
            if pos < len(keys) and keys[pos][0] < his[i][t]:
                return _ordered(keys[pos][1], i)
            keys.insert(pos, key)
        return None
    active: dict[int, None] = {}
    for _, enter, i in events:
        if not enter:
            del active[i]
            continue
        for j in active:  # empty `others` (1-D): any active box overlaps
            if all(los[i][k] < his[j][k] and los[j][k] < his[i][k] for k in others):
                return _ordered(j, i)
        active[i] = None
    return None


def _ordered(i: int, j: int) -> tuple[int, int]:
    return (i, j) if i < j else (j, i)


def find_gap(outer: Box, boxes: Sequence[Box]) -> Optional[Box]:
    """A non-empty sub-box of ``outer`` that none of ``boxes`` (pairwise disjoint) touches, or
    ``None`` when they cover it.

    Halves the search box at the median box boundary and keeps a half that is not fully
    covered, so the work is about ``O(n log n)`` for ``n`` boxes.
    """
    q = outer
    hits = [h for h in (b.intersect(q) for b in boxes) if h is not None]
    if sum(h.numel for h in hits) == q.numel:
        return None
    while hits:  # invariant: the hits leave part of q uncovered
        k, cut = _median_cut(q, hits)
        lo = Box(q.offsets, q.sizes[:k] + (cut - q.offsets[k],) + q.sizes[k + 1 :])
        lo_hits = [h for h in (b.intersect(lo) for b in hits) if h is not None]
        if sum(h.numel for h in lo_hits) < lo.numel:
            q, hits = lo, lo_hits
        else:
            q = Box(q.offsets[:k] + (cut,) + q.offsets[k + 1 :], q.sizes[:k] + (q.ends[k] - cut,) + q.sizes[k + 1 :])
            hits = [h for h in (b.intersect(q) for b in hits) if h is not None]
    return q


def _median_cut(q: Box, hits: Sequence[Box]) -> tuple[int, int]:
    """The median of the hits' boundaries strictly inside ``q``, along the dim with the most
    (one exists when the hits do not fill ``q``)."""
    best: tuple[int, list[int]] = (-1, [])
    for k in range(q.ndim):
        lo, hi = q.offsets[k], q.offsets[k] + q.sizes[k]
        cuts = sorted({c for h in hits for c in (h.offsets[k], h.offsets[k] + h.sizes[k]) if lo < c < hi})
        if len(cuts) > len(best[1]):
            best = (k, cuts)
    k, cuts = best
    return k, cuts[len(cuts) // 2]
