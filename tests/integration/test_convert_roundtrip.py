"""Round trips between every pair of formats, bit-exact, through ``ckpt.convert``.

One state holding every common dtype (bf16, fp8 included), 0-d and empty tensors and plain
values is written in each format by that format's own tool where one exists (``ckpt.save``,
``torch.save``, ``torch.distributed.checkpoint.save``) and by our writers otherwise, converted
to every format, and read back: every tensor must equal the original bit for bit, with its
dtype and shape, and plain values must survive where both formats store them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.convert import convert, diff
from ckpt.formats import FORMATS, open_reader, open_writer
from ckpt.formats._base import TensorInfo

NAMES = {"universal": "u", "dcp": "d", "torch": "t.pt", "safetensors": "s.safetensors", "hf": "h"}
#: dtypes every format stores (safetensors has no complex128, fp8 fnuz, ...).
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32]


def make_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1234)
    tensors: dict[str, torch.Tensor] = {}
    for i, dt in enumerate(DTYPES):
        raw = torch.randint(0, 256, (5, 7 + i), generator=g, dtype=torch.uint8)
        width = torch.empty((), dtype=dt).element_size()
        tensors[f"model.t{i}_{str(dt).split('.')[-1]}"] = raw.repeat(1, width).view(dt) if width > 1 else raw.view(dt)
    tensors["model.bool"] = torch.rand(9, generator=g) > 0.5
    tensors["model.scalar"] = torch.tensor(3.5, dtype=torch.float64)
    tensors["model.empty"] = torch.empty(0, 4)
    tensors["optim.exp_avg.big"] = torch.randn(300, 257, generator=g)
    return tensors


PLAIN = {"step": 42, "lr": 0.25, "note": "hello"}


def _infos(tensors: dict[str, torch.Tensor]) -> list[TensorInfo]:
    from ckpt._tensors import dtype_name

    return [TensorInfo(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()]


def write_native(fmt: str, path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` + PLAIN in ``fmt``, with the format's own tool where there is one."""
    if fmt == "universal":
        ckpt.save({**tensors, **PLAIN}, str(path), step=5)
    elif fmt == "torch":
        torch.save({**tensors, **PLAIN}, path)
    elif fmt == "dcp":
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({**tensors, **PLAIN}, checkpoint_id=str(path))
    else:
        w = open_writer(str(path), format=fmt, **({"max_shard_size": 4096} if fmt == "hf" else {}))
        w.set_plain_state(PLAIN)
        w.begin(_infos(tensors))
        for n, t in tensors.items():
            w.write(n, t)
        w.commit()


def assert_same(url: str, tensors: dict[str, torch.Tensor], *, plain: bool = True) -> None:
    with open_reader(url) as r:
        infos = {i.name: i for i in r.tensors()}
        assert set(infos) == set(tensors), f"{url}: {sorted(set(infos) ^ set(tensors))}"
        for name, want in tensors.items():
            got = r.read(name)
            assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), (url, name, got.dtype, got.shape)
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), (url, name)
        if plain:
            got_plain = r.plain_state()
            for k, v in PLAIN.items():
                assert got_plain.get(k) == v, (url, k, got_plain)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("sources")
    tensors = make_state()
    out = {}
    for fmt in FORMATS:
        path = base / NAMES[fmt]
        write_native(fmt, path, tensors)
        out[fmt] = str(path)
    return out


@pytest.mark.parametrize("src", FORMATS)
def test_source_reads_bit_exact(sources: dict[str, str], src: str) -> None:
    assert_same(sources[src], make_state())


@pytest.mark.parametrize("dst", FORMATS)
@pytest.mark.parametrize("src", FORMATS)
def test_every_pair_round_trips_bit_exact(sources: dict[str, str], tmp_path: Path, src: str, dst: str) -> None:
    tensors = make_state()
    out = tmp_path / NAMES[dst]
    report = convert(sources[src], str(out), dst_format=dst, max_shard_size=4096 if dst == "hf" else None)
    assert report.src_format == src and report.dst_format == dst
    assert report.tensors == len(tensors) and report.bytes_in == report.bytes_out
    assert not report.warnings
    assert_same(str(out), tensors)
    back = tmp_path / ("back_" + NAMES[src])
    convert(str(out), str(back), dst_format=src)
    assert_same(str(back), tensors)
    assert diff(sources[src], str(back)).equal


def test_hf_output_is_sharded_with_an_index(sources: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "hf"
    report = convert(sources["dcp"], str(out), dst_format="hf", max_shard_size=1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == len(report.plan["shard_bytes"]) > 2
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == report.bytes_out
    assert not list(tmp_path.glob(".*tmp*")), "no temporary directory left behind"


def test_universal_to_universal_keeps_the_state_tree_so_ckpt_load_restores_nesting(tmp_path: Path) -> None:
    state = {"model": torch.nn.Linear(4, 3).state_dict(), "optim": {"step": 9, "lr": [0.1, 0.2]}, "ids": torch.arange(5)}
    ckpt.save(state, str(tmp_path / "a"), step=9, extras={"run": "x"})
    convert(str(tmp_path / "a"), str(tmp_path / "b"), dst_format="universal")
    target = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "optim": None, "ids": torch.zeros(5, dtype=torch.int64)}
    res = ckpt.load(target, str(tmp_path / "b"))
    assert res.step == 9 and res.state["optim"] == {"step": 9, "lr": [0.1, 0.2]}
    assert res.manifest.extras == {"run": "x"}
    assert all(torch.equal(target["model"][k], v) for k, v in state["model"].items())


def test_foreign_source_loads_into_a_module_with_ckpt_load(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    convert(str(tmp_path / "w.pt"), str(tmp_path / "u"), dst_format="universal")
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    ckpt.load(fresh, str(tmp_path / "u"))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_dtype_cast_touches_floats_only(sources: dict[str, str], tmp_path: Path) -> None:
    report = convert(sources["safetensors"], str(tmp_path / "x.safetensors"), dtype="bfloat16")
    with open_reader(str(tmp_path / "x.safetensors")) as r:
        dtypes = {i.name: i.dtype for i in r.tensors()}
        assert r.read("optim.exp_avg.big").dtype == torch.bfloat16
    assert dtypes["optim.exp_avg.big"] == "bfloat16" and dtypes["model.t4_int64"] == "int64" and dtypes["model.bool"] == "bool"
    assert dtypes["model.t10_float8_e4m3fn"] == "float8_e4m3fn", "fp8 is not a cast target or source"
    assert report.bytes_out < report.bytes_in
    d = diff(sources["safetensors"], str(tmp_path / "x.safetensors"))
    assert not d.equal and {t.status for t in d.tensors} == {"equal", "mismatch"}


def test_diff_reports_values_missing_and_plain(tmp_path: Path) -> None:
    a = {"w": torch.ones(4, 4), "b": torch.zeros(3), "only_a": torch.ones(1), "flag": torch.tensor([True, False])}
    b = {"w": torch.ones(4, 4), "b": torch.tensor([0.0, 2.5, -1.0]), "only_b": torch.ones(1), "flag": torch.tensor([True, True])}
    torch.save({**a, "step": 1}, tmp_path / "a.pt")
    torch.save({**b, "step": 2}, tmp_path / "b.pt")
    report = diff(str(tmp_path / "a.pt"), str(tmp_path / "b.pt"))
    by = {t.name: t for t in report.tensors}
    assert not report.equal
    assert by["w"].status == "equal" and by["only_a"].status == "only_a" and by["only_b"].status == "only_b"
    assert by["b"].status == "different" and by["b"].max_abs_diff == 2.5 and by["b"].differing == 2
    assert by["flag"].status == "different" and by["flag"].differing == 1
    assert report.plain == (("step", "different"),)


def test_dry_run_writes_nothing(sources: dict[str, str], tmp_path: Path) -> None:
    for fmt in FORMATS:
        out = tmp_path / NAMES[fmt]
        report = convert(sources["torch"], str(out), dst_format=fmt, dry_run=True)
        assert report.dry_run and report.committed is None and report.tensors == len(make_state())
        assert not out.exists()
    assert not list(tmp_path.iterdir())
