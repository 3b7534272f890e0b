"""Unit and property tests for ``ckpt.layout`` and the torch adapters in ``ckpt._layout_torch``."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.errors import ManifestError
from ckpt.layout import MAX_WORLD_SIZE, Layout, parse_layout

# -- pure Layout -------------------------------------------------------------------------------


def test_grid_follows_megatron_tp_fastest() -> None:
    # Megatron numbers ranks with tp fastest, then dp, then pp (the default order pp, dp, tp).
    layout = Layout.grid(tp=2, dp=2, pp=2)
    assert layout.axes == (("pp", 2), ("dp", 2), ("tp", 2))
    expected = [(pp, dp, tp) for pp in range(2) for dp in range(2) for tp in range(2)]
    for r, (pp, dp, tp) in enumerate(expected):
        assert Layout.grid(tp=2, dp=2, pp=2, rank=r).coords == {"pp": pp, "dp": dp, "tp": tp}
    assert Layout.grid(tp=2, dp=2, pp=2, rank=5).coords == {"pp": 1, "dp": 0, "tp": 1}


def test_grid_appends_unknown_axes_and_honours_order() -> None:
    layout = Layout.grid(ep=4, tp=2, zero=3)
    assert layout.names == ("tp", "ep", "zero")
    assert Layout.grid(order=("tp", "dp"), dp=2, tp=3).names == ("tp", "dp")


def test_queries() -> None:
    layout = Layout.grid(tp=4, dp=2, pp=3, rank=13)
    assert layout.world_size == 24
    assert layout.sizes == {"pp": 3, "dp": 2, "tp": 4}
    assert layout.coords == {"pp": 1, "dp": 1, "tp": 1}
    assert (layout.size("tp"), layout.size("ep"), layout.coord("dp"), layout.coord("ep")) == (4, 1, 1, 0)
    assert layout.describe() == "pp=3,dp=2,tp=4"
    assert Layout.single().describe() == "single"
    assert Layout.single().world_size == 1 and Layout.single().coords == {}
    assert [lay.rank for lay in layout.all_ranks()] == list(range(24))
    assert layout.with_rank(0).coords == {"pp": 0, "dp": 0, "tp": 0}


def test_group() -> None:
    layout = Layout.grid(tp=2, dp=2, pp=2, rank=5)  # pp=1, dp=0, tp=1
    assert layout.group("tp") == (4, 5)
    assert layout.group("dp") == (5, 7)
    assert layout.group("pp") == (1, 5)
    assert layout.group("ep") == (5,)  # an axis not listed has size 1


def test_rank_of_rejects_out_of_range_coordinates() -> None:
    with pytest.raises(ValueError, match=r"tp=2 is outside \[0, 2\)"):
        Layout.grid(tp=2).rank_of({"tp": 2})
    assert Layout.grid(tp=2, dp=3).rank_of({"dp": 2}) == 4  # missing axes are 0


axes_strategy = st.lists(
    st.tuples(st.sampled_from(["pp", "dp", "tp", "ep", "zero", "cp", "fsdp"]), st.integers(1, 4)),
    max_size=4,
    unique_by=lambda a: a[0],
).map(tuple)


@settings(max_examples=200, deadline=None)
@given(axes_strategy)
def test_rank_coords_round_trip(axes: tuple[tuple[str, int], ...]) -> None:
    base = Layout(axes)
    seen = set()
    for layout in base.all_ranks():
        coords = layout.coords
        assert list(coords) == list(layout.names)
        assert base.rank_of(coords) == layout.rank
        seen.add(tuple(coords.values()))
        for name, _ in axes:
            group = layout.group(name)
            assert layout.rank in group and len(group) == layout.size(name)
            assert [layout.with_rank(r).coord(name) for r in group] == list(range(layout.size(name)))
    assert len(seen) == base.world_size


@settings(max_examples=100, deadline=None)
@given(axes_strategy)
def test_json_round_trip(axes: tuple[tuple[str, int], ...]) -> None:
    layout = Layout(axes, rank=0)
    doc = json.loads(json.dumps(layout.to_json()))
    assert parse_layout(doc) == layout
    last = layout.world_size - 1
    assert parse_layout(doc, rank=last) == layout.with_rank(last)


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        "pp=2",
        {},
        {"axes": {}},
        {"axes": [], "extra": 1},
        {"axes": [["tp"]]},
        {"axes": [["tp", 2, 3]]},
        {"axes": [("tp", 2)]},  # a tuple is not what JSON parses to
        {"axes": [[2, "tp"]]},
        {"axes": [["tp", "2"]]},
        {"axes": [["tp", 2.0]]},
        {"axes": [["tp", True]]},
        {"axes": [["tp", 0]]},
        {"axes": [["tp", -1]]},
        {"axes": [["TP", 2]]},
        {"axes": [["tp/../x", 2]]},
        {"axes": [["", 2]]},
        {"axes": [["x" * 33, 2]]},
        {"axes": [["tp", 2], ["tp", 2]]},
        {"axes": [["a", 1 << 11], ["b", 1 << 11]]},  # 2**22 ranks > MAX_WORLD_SIZE
        {"axes": [["tp", 10**100]]},
    ],
)
def test_parse_layout_rejects_hostile_input(doc: Any) -> None:
    with pytest.raises(ManifestError, match="layout"):
        parse_layout(doc)


def test_parse_layout_rejects_rank_outside() -> None:
    with pytest.raises(ManifestError, match="rank 4"):
        parse_layout({"axes": [["tp", 4]]}, rank=4)


@pytest.mark.parametrize(
    "axes, rank, match",
    [
        ((("tp", 2), ("tp", 2)), 0, "repeat"),
        ((("Tp", 2),), 0, "lowercase"),
        ((("1tp", 2),), 0, "lowercase"),
        ((("tp", 0),), 0, "size 0"),
        ((("tp", 2.0),), 0, "size 2.0"),
        ((("tp", True),), 0, "size True"),
        ((("tp", MAX_WORLD_SIZE), ("dp", 2)), 0, "exceeds"),
        ((("tp", 2),), 2, "outside"),
        ((("tp", 2),), -1, "outside"),
        ((), 1, "outside"),
        ((("tp", 2),), 1.0, "outside"),
    ],
)
def test_layout_rejects_invalid_fields(axes: Any, rank: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Layout(axes, rank)


# -- torch adapters ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gloo_world_of_one() -> Iterator[Any]:
    """A single-process gloo default group, destroyed afterwards."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if dist.is_initialized():
        pytest.skip("a default process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_layout_from_process_group_explicit_world() -> None:
    from ckpt._layout_torch import layout_from_process_group

    layout = layout_from_process_group(rank=13, world_size=32, tp=4, pp=2)
    assert layout == Layout.grid(rank=13, pp=2, dp=4, tp=4)
    assert layout.coords == {"pp": 0, "dp": 3, "tp": 1}
    assert layout_from_process_group(rank=3, world_size=4, dp=2, tp=2).names == ("dp", "tp")
    assert layout_from_process_group(rank=0, world_size=6, order=("tp", "dp"), tp=3).names == ("tp", "dp")


def test_layout_from_process_group_without_dist_is_single_process() -> None:
    import torch.distributed as dist

    from ckpt._layout_torch import layout_from_process_group

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a default process group is already initialised in this process")
    assert layout_from_process_group() == Layout((("dp", 1),), 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0, "world_size": 8, "tp": 3}, "world size 8 is not divisible by the product 3 of tp=3"),
        ({"rank": 0, "world_size": 8, "tp": 2, "dp": 2}, "tp=2, dp=2 has 4 ranks but the world size is 8"),
        ({"rank": 0, "world_size": 4, "tp": 2, "dp": 4}, "has 8 ranks but the world size is 4"),
        ({"rank": 0, "world_size": 4, "tp": 0}, "tp=0"),
        ({"rank": 0, "world_size": 0}, "world_size 0"),
        ({"rank": 4, "world_size": 4, "tp": 2}, "rank 4 is outside"),
        ({"rank": 0, "world_size": 4, "TP": 4}, "lowercase"),
    ],
)
def test_layout_from_process_group_rejects_mismatch(kwargs: dict[str, Any], match: str) -> None:
    from ckpt._layout_torch import layout_from_process_group

    with pytest.raises(ValueError, match=match):
        layout_from_process_group(**kwargs)


def test_layout_from_process_group_reads_gloo_group(gloo_world_of_one: Any) -> None:
    from ckpt._layout_torch import layout_from_process_group

    assert layout_from_process_group(tp=1) == Layout((("dp", 1), ("tp", 1)), 0)
    with pytest.raises(ValueError, match="has 2 ranks but the world size is 1"):
        layout_from_process_group(tp=2, dp=1)


def test_layout_from_device_mesh(gloo_world_of_one: Any) -> None:
    from ckpt._layout_torch import layout_from_device_mesh

    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
        mesh_2d = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    except (ImportError, RuntimeError, NotImplementedError) as e:  # pragma: no cover - old torch
        pytest.skip(f"init_device_mesh on cpu/gloo does not work with this torch: {e}")
    assert layout_from_device_mesh(mesh) == Layout((("dp", 1),), 0)
    assert layout_from_device_mesh(mesh_2d) == Layout((("dp", 1), ("tp", 1)), 0)


def test_layout_from_device_mesh_requires_names() -> None:
    torch = pytest.importorskip("torch")
    from ckpt._layout_torch import layout_from_device_mesh

    fake = SimpleNamespace(mesh_dim_names=None, mesh=torch.arange(4).reshape(2, 2))
    with pytest.raises(ValueError, match="mesh_dim_names"):
        layout_from_device_mesh(fake)


@pytest.mark.parametrize(
    "ranks",
    [[[0, 2], [1, 3]], [[4, 5], [6, 7]], [[1, 0], [2, 3]]],
    ids=["permuted", "sub-mesh", "swapped"],
)
def test_layout_from_device_mesh_rejects_non_row_major(ranks: list[list[int]]) -> None:
    torch = pytest.importorskip("torch")
    from ckpt._layout_torch import layout_from_device_mesh

    # A stand-in with DeviceMesh's attributes: a real permuted mesh needs several processes.
    fake = SimpleNamespace(mesh_dim_names=("dp", "tp"), mesh=torch.tensor(ranks))
    with pytest.raises(ValueError, match="not supported yet"):
        layout_from_device_mesh(fake)
