"""Non-tensor state across layouts: source rank choice, data position, derived seeds."""

from __future__ import annotations

from hypothesis import given, strategies as st

from ckpt.layout import Layout
from ckpt.resume import derive_seed, dp_shard, source_rank


def test_same_layout_maps_rank_to_itself() -> None:
    saved = [["pp", 2], ["dp", 2], ["tp", 2]]
    for r in range(8):
        assert source_rank(saved, 8, Layout.grid(pp=2, dp=2, tp=2, rank=r)) == r


def test_changed_layout_maps_by_shared_coordinates() -> None:
    saved = [["dp", 2], ["tp", 2]]  # rank = dp*2 + tp
    # target tp=4: tp coords 2,3 clamp to 1; no dp axis -> dp 0
    assert [source_rank(saved, 4, Layout.grid(tp=4, rank=r)) for r in range(4)] == [0, 1, 1, 1]
    # target dp=4, tp=1: dp 0..1 kept, 2..3 clamp to 1; tp 0
    assert [source_rank(saved, 4, Layout.grid(dp=4, rank=r)) for r in range(4)] == [0, 2, 2, 2]
    # no recorded layout: by number, rank 0 past the end
    assert [source_rank(None, 2, Layout.grid(dp=3, rank=r)) for r in range(3)] == [0, 1, 0]


@given(st.integers(0, 10**6), st.integers(0, 100), st.integers(1, 16))
def test_dp_shards_partition_every_global_batch(index: int, batch: int, dp: int) -> None:
    ranges = [dp_shard(index, batch, r, dp) for r in range(dp)]
    assert ranges[0][0] == index and ranges[-1][1] == index + batch
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_derived_seeds_depend_only_on_the_chosen_axes() -> None:
    a = derive_seed(7, 100, {"dp": 1, "tp": 0})
    assert a == derive_seed(7, 100, {"dp": 1, "tp": 3, "pp": 1})  # tp/pp ignored
    assert a != derive_seed(7, 100, {"dp": 2}) and a != derive_seed(7, 101, {"dp": 1}) and a != derive_seed(8, 100, {"dp": 1})
    assert 0 <= a < 2**63
