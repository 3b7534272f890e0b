"""Unit and property tests for ``ckpt.regions``: Box methods, flat ranges, runs, splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.regions import Box, box_runs, check_order, coalesce_runs, flat_range_to_boxes, split_box

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple)


@st.composite
def shape_and_range(draw: st.DrawFn) -> tuple[tuple[int, ...], int, int]:
    shape = draw(shapes)
    total = math.prod(shape)
    start = draw(st.integers(0, total))
    stop = draw(st.integers(start, total))
    return shape, start, stop


@st.composite
def sub_box(draw: st.DrawFn, outer: Box) -> Box:
    """A box inside ``outer`` (possibly empty)."""
    offsets, sizes = [], []
    for o, s in zip(outer.offsets, outer.sizes):
        lo = draw(st.integers(0, s))
        hi = draw(st.integers(lo, s))
        offsets.append(o + lo)
        sizes.append(hi - lo)
    return Box(tuple(offsets), tuple(sizes))


@st.composite
def chunk_inner_order(draw: st.DrawFn) -> tuple[Box, Box, tuple[int, ...]]:
    sizes = draw(shapes)
    offsets = tuple(draw(st.integers(0, 3)) for _ in sizes)
    chunk = Box(offsets, sizes)
    order = tuple(draw(st.permutations(range(len(sizes)))))
    return chunk, draw(sub_box(chunk)), order


def _elements(box: Box, global_shape: tuple[int, ...]) -> np.ndarray:
    """The global flat indices of ``box``'s elements, as an array of ``box``'s shape."""
    full = np.arange(math.prod(global_shape), dtype=np.int64).reshape(global_shape)
    return full[tuple(slice(o, e) for o, e in zip(box.offsets, box.ends))]


def _gather(storage: np.ndarray, runs: list[tuple[int, int]]) -> np.ndarray:
    if not runs:
        return np.zeros(0, dtype=storage.dtype)
    return np.concatenate([storage[s : s + n] for s, n in runs])


# -- Box ---------------------------------------------------------------------------------------


def test_box_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        Box((0,), (1, 2))
    with pytest.raises(ValueError, match=">= 0"):
        Box((-1,), (2,))
    with pytest.raises(ValueError, match=">= 0"):
        Box((0,), (-2,))


def test_box_properties() -> None:
    b = Box((1, 2), (3, 4))
    assert (b.ndim, b.numel, b.ends, b.empty) == (2, 12, (4, 6), False)
    assert Box((0, 0), (3, 0)).empty
    scalar = Box((), ())
    assert (scalar.ndim, scalar.numel, scalar.empty) == (0, 1, False)
    assert Box.whole((2, 5)) == Box((0, 0), (2, 5))
    assert b.to_json() == {"offsets": [1, 2], "sizes": [3, 4]}


def test_intersect_overlap_and_disjoint() -> None:
    a = Box((0, 0), (4, 4))
    assert a.intersect(Box((2, 1), (4, 2))) == Box((2, 1), (2, 2))
    assert a.intersect(Box((5, 0), (1, 1))) is None
    assert a.intersect(a) == a
    assert Box((), ()).intersect(Box((), ())) == Box((), ())


def test_intersect_edge_touching_is_none() -> None:
    a = Box((0, 0), (4, 4))
    assert a.intersect(Box((4, 0), (2, 4))) is None  # shares the face at row 4 only
    assert a.intersect(Box((0, 4), (4, 1))) is None
    assert a.intersect(Box((4, 4), (1, 1))) is None  # shares a corner


def test_intersect_with_empty_is_none() -> None:
    a = Box((0, 0), (4, 4))
    assert a.intersect(Box((1, 1), (0, 2))) is None
    assert Box((1, 1), (2, 0)).intersect(a) is None


def test_intersect_rejects_ndim_mismatch() -> None:
    with pytest.raises(ValueError, match="2 and 1 dims"):
        Box((0, 0), (1, 1)).intersect(Box((0,), (1,)))


def test_contains() -> None:
    outer = Box((1, 1), (4, 4))
    assert outer.contains(outer)
    assert outer.contains(Box((2, 3), (3, 2)))
    assert not outer.contains(Box((0, 1), (2, 2)))
    assert not outer.contains(Box((2, 2), (4, 1)))
    assert outer.contains(Box((5, 5), (0, 0)))  # an empty box at the far corner
    assert not Box((2, 2), (2, 2)).contains(outer)


def test_relative_to_and_shift() -> None:
    outer = Box((10, 20), (5, 5))
    inner = Box((12, 21), (2, 3))
    rel = inner.relative_to(outer)
    assert rel == Box((2, 1), (2, 3))
    assert rel.shift(outer.offsets) == inner


def test_permute() -> None:
    b = Box((1, 2, 3), (4, 5, 6))
    assert b.permute(None) is b
    assert b.permute((2, 0, 1)) == Box((3, 1, 2), (6, 4, 5))
    assert b.permute((0, 1, 2)) == b


def test_check_order() -> None:
    assert check_order(None, 3) is None
    assert check_order((0, 1, 2), 3) is None
    assert check_order([], 0) is None
    assert check_order([1, 0], 2) == (1, 0)
    for bad, ndim in [((0, 0), 2), ((0, 1), 3), ((1, 2), 2), ((0,), 0), ((-1, 0), 2)]:
        with pytest.raises(ValueError, match="not a permutation"):
            check_order(bad, ndim)


# -- flat_range_to_boxes -----------------------------------------------------------------------


def test_flat_range_examples() -> None:
    assert flat_range_to_boxes((), 0, 1) == [Box((), ())]
    assert flat_range_to_boxes((), 0, 0) == []
    assert flat_range_to_boxes((3, 4), 5, 5) == []
    assert flat_range_to_boxes((3, 4), 0, 12) == [Box((0, 0), (3, 4))]
    assert flat_range_to_boxes((3, 4), 4, 8) == [Box((1, 0), (1, 4))]
    assert flat_range_to_boxes((3, 4), 2, 11) == [
        Box((0, 2), (1, 2)),
        Box((1, 0), (1, 4)),
        Box((2, 0), (1, 3)),
    ]


def test_flat_range_rejects_bad_bounds() -> None:
    for shape, start, stop in [((3,), -1, 2), ((3,), 2, 1), ((3,), 0, 4), ((), 0, 2), ((0, 3), 0, 1)]:
        with pytest.raises(ValueError, match="not within"):
            flat_range_to_boxes(shape, start, stop)
    with pytest.raises(ValueError, match="non-negative"):
        flat_range_to_boxes((2, -1), 0, 0)


@settings(max_examples=300, deadline=None)
@given(shape_and_range())
def test_flat_range_concatenates_to_the_range(case: tuple[tuple[int, ...], int, int]) -> None:
    shape, start, stop = case
    boxes = flat_range_to_boxes(shape, start, stop)
    assert len(boxes) <= max(1, 2 * len(shape) - 1)
    assert all(not b.empty and Box.whole(shape).contains(b) for b in boxes)
    got = [_elements(b, shape).ravel() for b in boxes]
    flat = np.concatenate(got) if got else np.zeros(0, dtype=np.int64)
    np.testing.assert_array_equal(flat, np.arange(math.prod(shape))[start:stop])


# -- box_runs ----------------------------------------------------------------------------------


def test_box_runs_examples() -> None:
    chunk = Box((0, 0), (4, 6))
    assert box_runs(chunk, chunk) == [(0, 24)]
    assert box_runs(chunk, Box((1, 0), (2, 6))) == [(6, 12)]  # full rows: one run
    assert box_runs(chunk, Box((1, 2), (2, 3))) == [(8, 3), (14, 3)]
    assert box_runs(chunk, Box((0, 2), (4, 3)), order=(1, 0)) == [(8, 12)]  # columns, column-major
    assert box_runs(Box((), ()), Box((), ())) == [(0, 1)]
    assert box_runs(chunk, Box((1, 1), (0, 3))) == []


def test_box_runs_rejects_outside_and_bad_order() -> None:
    chunk = Box((2, 2), (4, 4))
    with pytest.raises(ValueError, match="not inside"):
        box_runs(chunk, Box((1, 2), (2, 2)))
    with pytest.raises(ValueError, match="not inside"):
        box_runs(chunk, Box((2,), (2,)))
    with pytest.raises(ValueError, match="not a permutation"):
        box_runs(chunk, chunk, order=(0, 0))


def test_box_runs_count_is_not_element_count() -> None:
    chunk = Box((0, 0, 0), (1000, 1000, 1000))
    runs = box_runs(chunk, Box((10, 0, 0), (500, 1000, 1000)))
    assert runs == [(10 * 1_000_000, 500 * 1_000_000)]
    runs = box_runs(chunk, Box((0, 0, 100), (2, 3, 200)))
    assert len(runs) == 6 and all(n == 200 for _, n in runs)


@settings(max_examples=300, deadline=None)
@given(chunk_inner_order())
def test_box_runs_gather_the_inner_box(case: tuple[Box, Box, tuple[int, ...]]) -> None:
    chunk, inner, order = case
    global_shape = chunk.ends
    storage = _elements(chunk, global_shape).transpose(order).ravel()
    runs = box_runs(chunk, inner, order)
    expected = _elements(inner, global_shape).transpose(order).ravel()
    np.testing.assert_array_equal(_gather(storage, runs), expected)
    assert all(n > 0 for _, n in runs)
    for (s0, n0), (s1, _) in zip(runs, runs[1:]):
        assert s0 + n0 < s1  # sorted, disjoint, and not adjacent (maximal)


# -- coalesce_runs -----------------------------------------------------------------------------


def test_coalesce_examples() -> None:
    assert coalesce_runs([], max_gap=10) == []
    assert coalesce_runs([(0, 4), (4, 4)], max_gap=0) == [(0, 8)]
    assert coalesce_runs([(0, 4), (6, 2), (20, 1)], max_gap=2) == [(0, 8), (20, 1)]
    assert coalesce_runs([(0, 10), (2, 3)], max_gap=0) == [(0, 10)]  # contained
    assert coalesce_runs([(0, 2), (5, 0), (9, 1)], max_gap=0) == [(0, 2), (9, 1)]


def test_coalesce_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="max_gap"):
        coalesce_runs([(0, 1)], max_gap=-1)
    with pytest.raises(ValueError, match="not sorted"):
        coalesce_runs([(5, 1), (0, 1)], max_gap=0)
    with pytest.raises(ValueError, match="negative"):
        coalesce_runs([(0, -1)], max_gap=0)


runs_strategy = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 20)), max_size=20).map(sorted)


@settings(max_examples=300, deadline=None)
@given(runs_strategy, st.integers(0, 30))
def test_coalesce_covers_and_respects_gap(runs: list[tuple[int, int]], max_gap: int) -> None:
    out = coalesce_runs(runs, max_gap=max_gap)
    for s, n in runs:
        if n:
            assert any(cs <= s and s + n <= cs + cn for cs, cn in out)
    for (s0, n0), (s1, _) in zip(out, out[1:]):
        assert s1 - (s0 + n0) > max_gap
    covered = set().union(*[range(s, s + n) for s, n in runs]) if runs else set()
    for cs, cn in out:  # every output run starts and ends on input elements
        assert cn > 0 and cs in covered and cs + cn - 1 in covered


# -- split_box ---------------------------------------------------------------------------------


def test_split_box_examples() -> None:
    box = Box((2, 0), (5, 4))
    assert split_box(box, max_numel=8) == [Box((2, 0), (2, 4)), Box((4, 0), (2, 4)), Box((6, 0), (1, 4))]
    assert split_box(box, max_numel=100) == [box]
    assert split_box(box, max_numel=1) == [Box((2 + i, 0), (1, 4)) for i in range(5)]  # 4 > 1
    assert split_box(box, max_numel=10, order=(1, 0)) == [Box((2, 0), (5, 2)), Box((2, 2), (5, 2))]
    assert split_box(Box((), ()), max_numel=1) == [Box((), ())]
    assert split_box(Box((0, 0), (0, 3)), max_numel=1) == [Box((0, 0), (0, 3))]


def test_split_box_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_numel"):
        split_box(Box((0,), (4,)), max_numel=0)
    with pytest.raises(ValueError, match="not a permutation"):
        split_box(Box((0,), (4,)), max_numel=1, order=(1,))


@settings(max_examples=300, deadline=None)
@given(chunk_inner_order(), st.integers(1, 400))
def test_split_box_tiles_in_storage_order(case: tuple[Box, Box, tuple[int, ...]], max_numel: int) -> None:
    box, _, order = case
    pieces = split_box(box, max_numel=max_numel, order=order)
    if box.ndim == 0 or box.empty:
        assert pieces == [box]
        return
    dim = order[0]
    row = box.numel // box.sizes[dim]
    assert sum(p.numel for p in pieces) == box.numel
    cursor = box.offsets[dim]
    for p in pieces:
        assert box.contains(p) and not p.empty
        assert p.offsets[dim] == cursor  # consecutive along the outermost storage dim
        assert all(p.sizes[d] == box.sizes[d] for d in range(box.ndim) if d != dim)
        assert p.numel <= max(max_numel, row)
        cursor += p.sizes[dim]
    assert cursor == box.ends[dim]
    # In storage, the pieces' runs concatenate to the whole box's single run.
    runs = [r for p in pieces for r in box_runs(box, p, order)]
    assert coalesce_runs(runs, max_gap=0) == [(0, box.numel)]
