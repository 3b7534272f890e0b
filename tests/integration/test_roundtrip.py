"""Save/load round trips in one process: every dtype, odd shapes, nested state, stateful objects."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import ckpt
from ckpt.errors import CheckpointNotFoundError, StateMismatchError, UnsupportedStateError

ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.complex128, torch.complex64,
    torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.bool,
]
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "complex32"):
    if hasattr(torch, _name):
        ALL_DTYPES.append(getattr(torch, _name))


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bits of any dtype (including NaN payloads), made through a byte view."""
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(shape, dtype=dtype)
    if t.numel():
        raw = torch.randint(0, 256, (t.numel() * t.element_size(),), generator=g, dtype=torch.uint8)
        if dtype == torch.bool:
            raw = raw % 2
        t.reshape(-1).view(torch.uint8).copy_(raw)
    return t


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert _bits(a) == _bits(b)


@pytest.fixture(params=["local", "memory", "local-zstd"])
def url(request, tmp_path):
    if request.param == "memory":
        return f"memory://roundtrip-{random.getrandbits(64):x}"
    return str(tmp_path / "ckpt")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact(dtype, tmp_path) -> None:
    state = {
        "matrix": _random((7, 5), dtype, 1),
        "scalar": _random((), dtype, 2),
        "empty": _random((0, 3), dtype, 3),
        "big_odd": _random((1031,), dtype, 4),
    }
    for compression in (None, "zstd"):
        url = str(tmp_path / f"c-{compression}")
        ckpt.save(state, url, step=1, compression=compression)
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        res = ckpt.load(target, url)
        assert res.step == 1 and res.tensors == 4
        for k in state:
            _assert_bit_equal(target[k], state[k])
        assert ckpt.verify(url).ok


def test_non_contiguous_and_views_are_saved_by_value(url, request) -> None:
    compression = "zstd" if request.node.callspec.params["url"] == "local-zstd" else None
    base = torch.arange(10000, dtype=torch.float32).reshape(100, 100)
    state = {
        "transposed": base.t(),
        "strided": base[::3, 1::7],
        "slice": base[10:12],  # shares storage with base: only its 200 elements are stored
        "expanded": torch.ones(3, 1).expand(3, 4),
        "conj": torch.randn(4, dtype=torch.complex64).conj(),
    }
    ckpt.save(state, url, step=3, compression=compression)
    _, manifest = ckpt.open_manifest(url)
    assert manifest.tensors["slice"].nbytes == 200 * 4
    target = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in state.items()}
    # a non-contiguous target is filled through a staging copy
    target["transposed"] = torch.empty(100, 100).t()
    ckpt.load(target, url)
    for k, v in state.items():
        assert torch.equal(target[k], v.resolve_conj()), k


def test_nested_plain_state_round_trips(url) -> None:
    state = {
        "step": 41,
        "lr": 3e-4,
        "nan": float("nan"),
        "inf": float("-inf"),
        "name": "gpt-tiny",
        "flags": [True, False, None],
        "tuple": (1, (2, "three")),
        "int_keys": {0: "a", 7: {"b": 1.5}},
        "tuple_key": {(1, 2): "pair"},
        "blob": b"\x00\xffbytes",
        "np": np.arange(6, dtype=np.int32).reshape(2, 3),
        "np_scalar": np.float32(2.5),
        "deep": {"a": [{"b": torch.tensor([1, 2, 3])}]},
    }
    ckpt.save(state, url, step=5, extras={"run": "demo"})
    res = ckpt.load({}, url)
    got = res.state
    assert got["step"] == 41 and got["lr"] == 3e-4 and math.isnan(got["nan"]) and got["inf"] == float("-inf")
    assert got["flags"] == [True, False, None]
    assert got["tuple"] == (1, (2, "three"))
    assert got["int_keys"] == {0: "a", 7: {"b": 1.5}}
    assert got["tuple_key"] == {(1, 2): "pair"}
    assert got["blob"] == b"\x00\xffbytes"
    assert isinstance(got["np"], np.ndarray) and np.array_equal(got["np"], state["np"])
    assert got["np_scalar"] == 2.5
    assert torch.equal(got["deep"]["a"][0]["b"], torch.tensor([1, 2, 3]))
    assert res.manifest.extras == {"run": "demo"}


def test_module_optimizer_and_scheduler_resume_exactly(url) -> None:
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return model, opt, sched

    def train(model, opt, sched, steps, seed):
        g = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(steps):
            x = torch.randn(4, 8, generator=g)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        return losses

    model, opt, sched = make()
    train(model, opt, sched, 3, seed=1)
    ckpt.save({"model": model, "optim": opt, "sched": sched, "step": 3}, url, step=3)
    reference = train(model, opt, sched, 3, seed=2)

    model2, opt2, sched2 = make()  # fresh objects, optimizer without any state yet
    res = ckpt.load({"model": model2, "optim": opt2, "sched": sched2, "step": None}, url)
    assert res.state["step"] == 3
    assert sched2.last_epoch == 3
    resumed = train(model2, opt2, sched2, 3, seed=2)
    assert resumed == reference


def test_shape_and_dtype_mismatches_are_all_listed(url) -> None:
    ckpt.save({"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}, url, step=1)
    with pytest.raises(StateMismatchError) as err:
        ckpt.load({"a": torch.zeros(3, 2), "b": torch.zeros(4, dtype=torch.int64), "c": torch.zeros(1), "extra": torch.zeros(1)}, url)
    text = str(err.value)
    assert len(err.value.problems) == 3
    assert "a (tensor 'a'): shape [3, 2]" in text and "dtype int64" in text and "extra: in the state but not" in text


def test_non_strict_load_skips_entries_missing_from_checkpoint(url) -> None:
    ckpt.save({"a": torch.ones(2)}, url, step=1)
    target = {"a": torch.zeros(2), "new_head": torch.full((2,), 7.0)}
    ckpt.load(target, url, strict=False)
    assert torch.equal(target["a"], torch.ones(2)) and torch.equal(target["new_head"], torch.full((2,), 7.0))


def test_unsupported_values_are_refused_with_their_path(tmp_path) -> None:
    class Opaque:
        pass

    with pytest.raises(UnsupportedStateError, match=r"model\.cfg.*Opaque"):
        ckpt.save({"model": {"cfg": Opaque()}}, str(tmp_path), step=1)
    assert ckpt.list_steps(str(tmp_path)) == []


def test_latest_step_and_explicit_step_and_resave(url) -> None:
    for s in (1, 5, 3):
        ckpt.save({"x": torch.full((2,), float(s))}, url, step=s)
    assert ckpt.list_steps(url) == [1, 3, 5]
    t = {"x": torch.zeros(2)}
    assert ckpt.load(t, url).step == 5 and t["x"][0] == 5
    assert ckpt.load(t, url, step=3).step == 3 and t["x"][0] == 3
    # a re-save of step 3 writes new objects and supersedes the earlier save
    first = ckpt.open_manifest(url, step=3)[1]
    ckpt.save({"x": torch.full((2,), 33.0)}, url, step=3)
    second = ckpt.open_manifest(url, step=3)[1]
    assert second.save_id > first.save_id and second.data_prefix != first.data_prefix
    ckpt.load(t, url, step=3)
    assert t["x"][0] == 33
    with pytest.raises(CheckpointNotFoundError, match="step 4 is not committed"):
        ckpt.load(t, url, step=4)


def test_nothing_committed_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        ckpt.load({}, str(tmp_path / "nothing"))


def test_retention_keeps_last_n_and_deletes_only_unreferenced(tmp_path) -> None:
    url = str(tmp_path / "r")
    for s in range(1, 6):
        ckpt.save({"x": torch.full((1000,), float(s))}, url, step=s, keep_last=2)
    assert ckpt.list_steps(url) == [4, 5]
    store = ckpt.open_store(url)
    prefixes = {k.split("/")[1] for k in store.list("data/")}
    assert prefixes == {ckpt.open_manifest(url, step=s)[1].data_prefix.split("/")[1] for s in (4, 5)}
    t = {"x": torch.zeros(1000)}
    ckpt.load(t, url, step=4)
    assert t["x"][0] == 4


def test_large_tensor_is_split_into_chunks_and_objects(tmp_path, monkeypatch) -> None:
    import ckpt._save as save_mod

    monkeypatch.setattr(save_mod, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(save_mod, "MAX_OBJECT_BYTES", 16384)
    state = {"w": torch.randn(300, 17), "v": torch.randn(5)}
    ckpt.save(state, str(tmp_path), step=1, io_threads=3)
    _, m = ckpt.open_manifest(str(tmp_path))
    assert len(m.tensors["w"].chunks) > 4 and len(m.objects()) > 1
    target = {"w": torch.zeros(300, 17), "v": torch.zeros(5)}
    ckpt.load(target, str(tmp_path), io_threads=3)
    assert torch.equal(target["w"], state["w"]) and torch.equal(target["v"], state["v"])
