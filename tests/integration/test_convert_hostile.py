"""Hostile and broken inputs: refused with clear errors, never executed, nothing left behind.

Pickles that would run code (``os.system`` through ``__reduce__``) in a DCP ``.metadata``, in a
DCP data item and in a torch file must be refused while the sentinel file their command would
create stays absent. Truncated safetensors, headers that lie (offsets out of range, overlaps,
holes, sizes that disagree with dtype and shape, unknown dtypes, duplicate names, absurd header
lengths), HF indexes naming missing shards, and unrecognisable inputs each give one error
naming the file and the problem, and a non-zero exit from the CLI.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt.cli import main
from ckpt.convert import convert
from ckpt.formats import DestinationExistsError, FormatError, UnknownFormatError, UnsafeInputError, open_reader
from ckpt.formats.dcp import parse_metadata
from ckpt.formats.safetensors import header_bytes
from ckpt.formats._base import TensorInfo



class Evil:
    """Pickles to ``os.system("touch SENTINEL")``."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.sentinel}",))


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``ckpt ARGS`` in this process (a subprocess would spend seconds importing torch)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["ckpt", *args], code, out.getvalue(), err.getvalue())


def _dcp_save(path: Path, state: dict) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path))


# --------------------------------------------------------------------------------------------
# Pickles that would execute code
# --------------------------------------------------------------------------------------------
def test_dcp_metadata_with_code_execution_is_refused_and_never_runs(tmp_path: Path) -> None:
    src, sentinel = tmp_path / "d", tmp_path / "PWNED"
    _dcp_save(src, {"w": torch.ones(3)})
    (src / ".metadata").write_bytes(pickle.dumps(Evil(sentinel)))
    with pytest.raises(UnsafeInputError, match=r"posix\.system|os\.system") as e:
        open_reader(str(src))
    assert "code execution" in str(e.value) and str(src) in str(e.value)
    res = _cli("convert", str(src), str(tmp_path / "o.safetensors"))
    assert res.returncode == 1 and "code execution" in res.stderr
    assert _cli("verify", str(src)).returncode == 3
    assert _cli("inspect", str(src)).returncode == 1
    assert not sentinel.exists(), "the pickle ran"
    assert not (tmp_path / "o.safetensors").exists()


def test_dcp_metadata_hiding_a_call_inside_allowed_classes_is_refused(tmp_path: Path) -> None:
    src, sentinel = tmp_path / "d", tmp_path / "PWNED"
    _dcp_save(src, {"w": torch.ones(3)})
    good = (src / ".metadata").read_bytes()
    # the same metadata with a malicious object planted in planner_data
    import torch.distributed.checkpoint.metadata as M

    meta = pickle.loads(good)
    assert isinstance(meta, M.Metadata)
    meta.planner_data = {"w": Evil(sentinel)}
    (src / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UnsafeInputError, match="code execution"):
        open_reader(str(src))
    for module, name in (("builtins", "eval"), ("subprocess", "Popen"), ("torch", "load"), ("torch._utils", "_rebuild_tensor_v2")):
        raw = f"c{module}\n{name}\n(S'1'\ntR.".encode()
        with pytest.raises(UnsafeInputError, match=f"{module}.{name}"):
            parse_metadata(raw, where="crafted")
    assert not sentinel.exists()


def test_dcp_data_item_with_code_execution_is_refused(tmp_path: Path) -> None:
    src, sentinel = tmp_path / "d", tmp_path / "PWNED"
    _dcp_save(src, {"w": torch.ones(3), "extra": 5})
    meta = parse_metadata((src / ".metadata").read_bytes(), where="x")
    item = meta.tensors["w"].chunks[0].item
    blob = io.BytesIO()
    torch.save({"x": 1}, blob)  # a real zip ...
    evil = pickle.dumps(Evil(sentinel), protocol=2)
    data = bytearray((src / item.file).read_bytes())
    # ... whose data.pkl is replaced by the evil pickle, placed over the tensor item
    patched = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(io.BytesIO(blob.getvalue())) as zin, zipfile.ZipFile(patched, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, evil if info.filename.endswith("data.pkl") else zin.read(info))
    payload = patched.getvalue()
    data[item.offset : item.offset + item.length] = payload + b"\0" * max(0, item.length - len(payload))
    (src / item.file).write_bytes(bytes(data))
    with open_reader(str(src)) as r:
        with pytest.raises(UnsafeInputError, match="code execution"):
            r.read("w")
    res = _cli("convert", str(src), str(tmp_path / "o.safetensors"))
    assert res.returncode == 1 and "code execution" in res.stderr
    assert not sentinel.exists() and not (tmp_path / "o.safetensors").exists()


def test_dcp_non_tensor_item_needing_code_is_skipped_with_a_warning(tmp_path: Path) -> None:
    src, sentinel = tmp_path / "d", tmp_path / "PWNED"
    _dcp_save(src, {"w": torch.ones(3), "obj": Evil(sentinel)})  # DCP pickles it; creating it is harmless
    assert not sentinel.exists()
    report = convert(str(src), str(tmp_path / "o.safetensors"))
    assert any("'obj'" in w and "code execution" in w for w in report.warnings)
    assert not sentinel.exists()


def test_torch_file_with_code_execution_is_refused_and_never_runs(tmp_path: Path) -> None:
    sentinel = tmp_path / "PWNED"
    torch.save({"w": torch.ones(2), "evil": Evil(sentinel)}, tmp_path / "evil.pt")
    assert not sentinel.exists()
    with pytest.raises(UnsafeInputError, match="code execution") as e:
        open_reader(str(tmp_path / "evil.pt"))
    assert "state_dict" in str(e.value), "the error says how to convert safely"
    res = _cli("convert", str(tmp_path / "evil.pt"), str(tmp_path / "o.safetensors"))
    assert res.returncode == 1 and "code execution" in res.stderr and "evil.pt" in res.stderr
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        assert _cli("inspect", str(tmp_path / "evil.pt")).returncode == 1, "an environment variable does not switch safe mode off"
    assert not sentinel.exists()


# --------------------------------------------------------------------------------------------
# Broken safetensors
# --------------------------------------------------------------------------------------------
def _st(tmp_path: Path, header: dict, data: bytes, name: str = "x.safetensors") -> Path:
    raw = json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _good(tmp_path: Path) -> Path:
    infos = [TensorInfo("a", "float32", (2, 3)), TensorInfo("b", "bfloat16", (4,))]
    path = tmp_path / "good.safetensors"
    path.write_bytes(header_bytes(infos, {"format": "pt"}, "t") + bytes(24 + 8))
    return path


@pytest.mark.parametrize("case,header,data,match", [
    ("out_of_range", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(16), "truncated"),
    ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "overlap"),
    ("hole", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "belong to no tensor"),
    ("trailing", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "belong to no tensor"),
    ("size_conflict", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "dtype/shape conflict"),
    ("unknown_dtype", {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16), "unknown dtype 'F128'"),
    ("negative", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "shape"),
    ("reversed", {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, bytes(8), "data_offsets"),
    ("extra_field", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, bytes(4), "exactly dtype"),
    ("bad_metadata", {"__metadata__": {"k": 1}}, b"", "__metadata__"),
])
def test_safetensors_header_lies_are_refused(tmp_path: Path, case: str, header: dict, data: bytes, match: str) -> None:
    path = _st(tmp_path, header, data)
    with pytest.raises(FormatError, match=match) as e:
        open_reader(str(path))
    assert str(path) in str(e.value)


def test_safetensors_truncated_duplicate_and_oversized_headers(tmp_path: Path) -> None:
    good = _good(tmp_path)
    full = good.read_bytes()
    (tmp_path / "t1.safetensors").write_bytes(full[:-5])
    with pytest.raises(FormatError, match="truncated"):
        open_reader(str(tmp_path / "t1.safetensors"))
    (tmp_path / "t2.safetensors").write_bytes(full[:20])
    with pytest.raises(FormatError, match="truncated"):
        open_reader(str(tmp_path / "t2.safetensors"))
    (tmp_path / "t3.safetensors").write_bytes(full[:5])
    with pytest.raises(FormatError, match="truncated"):
        open_reader(str(tmp_path / "t3.safetensors"))
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(FormatError, match="over the cap"):
        open_reader(str(tmp_path / "huge.safetensors"))
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    (tmp_path / "dup.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(FormatError, match="duplicate key 'a'"):
        open_reader(str(tmp_path / "dup.safetensors"))
    (tmp_path / "notjson.safetensors").write_bytes(struct.pack("<Q", 4) + b"{abc")
    with pytest.raises(FormatError, match="not valid UTF-8 JSON"):
        open_reader(str(tmp_path / "notjson.safetensors"))
    res = _cli("verify", str(tmp_path / "t1.safetensors"))
    assert res.returncode == 3 and "truncated" in res.stdout
    assert _cli("verify", str(good)).returncode == 0


def test_safetensors_cannot_store_complex128_and_says_so(tmp_path: Path) -> None:
    torch.save({"c": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "c.pt")
    with pytest.raises(FormatError, match="complex128.*safetensors cannot store"):
        convert(str(tmp_path / "c.pt"), str(tmp_path / "c.safetensors"))
    assert not (tmp_path / "c.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


# --------------------------------------------------------------------------------------------
# HF indexes, unknown formats, destinations
# --------------------------------------------------------------------------------------------
def _hf(tmp_path: Path) -> Path:
    torch.save({f"layer{i}.w": torch.full((64,), float(i)) for i in range(6)}, tmp_path / "w.pt")
    convert(str(tmp_path / "w.pt"), str(tmp_path / "hf"), dst_format="hf", max_shard_size=600)
    return tmp_path / "hf"


def test_hf_missing_shard_is_a_clear_error_and_non_zero_exit(tmp_path: Path) -> None:
    hf = _hf(tmp_path)
    shards = sorted(hf.glob("*.safetensors"))
    assert len(shards) == 3
    shards[1].unlink()
    with pytest.raises(FormatError, match=f"shard '{shards[1].name}' is missing") as e:
        open_reader(str(hf))
    assert "layer" in str(e.value), "names the tensors that were in it"
    res = _cli("convert", str(hf), str(tmp_path / "o.safetensors"))
    assert res.returncode == 1 and shards[1].name in res.stderr
    assert _cli("verify", str(hf)).returncode == 3
    assert not (tmp_path / "o.safetensors").exists()


def test_hf_index_that_disagrees_with_its_shards(tmp_path: Path) -> None:
    hf = _hf(tmp_path)
    index_path = hf / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["layer0.w"]
    index["weight_map"]["layer0.w"] = index["weight_map"]["layer5.w"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match="layer0.w"):
        open_reader(str(hf))
    index["weight_map"]["layer0.w"] = "../etc/passwd.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match="not a plain"):
        open_reader(str(hf))
    index["weight_map"]["layer0.w"] = shard
    index["weight_map"]["ghost"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match="ghost"):
        open_reader(str(hf))


def test_unknown_formats_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "junk.dat").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(UnknownFormatError, match="junk.dat"):
        open_reader(str(tmp_path / "junk.dat"))
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "emptydir" / "readme.txt").write_text("x")
    with pytest.raises(UnknownFormatError, match="pass --from"):
        open_reader(str(tmp_path / "emptydir"))
    with pytest.raises(UnknownFormatError, match="does not exist"):
        open_reader(str(tmp_path / "nothing"))
    res = _cli("convert", str(tmp_path / "junk.dat"), str(tmp_path / "o.safetensors"))
    assert res.returncode == 1 and "junk.dat" in res.stderr
    res = _cli("inspect", str(tmp_path / "junk.dat"))
    assert res.returncode == 1 and "cannot tell" in res.stderr
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(FormatError, match="not a readable torch.save file"):
        open_reader(str(tmp_path / "bad.pt"))


def test_destinations_are_never_overwritten_and_failures_leave_nothing(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(4)}, tmp_path / "w.pt")
    (tmp_path / "out.safetensors").write_bytes(b"precious")
    with pytest.raises(DestinationExistsError):
        convert(str(tmp_path / "w.pt"), str(tmp_path / "out.safetensors"))
    assert (tmp_path / "out.safetensors").read_bytes() == b"precious"
    convert(str(tmp_path / "w.pt"), str(tmp_path / "u"), dst_format="universal", step=3)
    with pytest.raises(DestinationExistsError, match="step 3 is already committed"):
        convert(str(tmp_path / "w.pt"), str(tmp_path / "u"), dst_format="universal", step=3)
    convert(str(tmp_path / "w.pt"), str(tmp_path / "u"), dst_format="universal", step=4)  # a new step is fine
    # a source that breaks half way: the destination never appears, temporaries are removed
    torch.save({"a": torch.ones(4), "b": torch.ones(4)}, tmp_path / "two.pt")
    convert(str(tmp_path / "two.pt"), str(tmp_path / "two.safetensors"))
    data = bytearray((tmp_path / "two.safetensors").read_bytes())
    (tmp_path / "cut.safetensors").write_bytes(bytes(data))
    os.truncate(tmp_path / "two.safetensors", len(data) - 1)
    for fmt, name in (("hf", "h"), ("dcp", "d"), ("safetensors", "s.safetensors"), ("universal", "u2"), ("torch", "t.pt")):
        with pytest.raises(FormatError):
            convert(str(tmp_path / "two.safetensors"), str(tmp_path / name), dst_format=fmt)
        assert not (tmp_path / name).exists() or fmt == "universal"
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_failure_mid_write_aborts_and_removes_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt.formats.safetensors import SafetensorsReader

    torch.save({f"t{i}": torch.full((1000,), float(i)) for i in range(8)}, tmp_path / "w.pt")
    convert(str(tmp_path / "w.pt"), str(tmp_path / "w.safetensors"))
    calls = {"n": 0}
    real = SafetensorsReader.read

    def flaky(self: Any, name: str) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("injected: disk vanished")
        return real(self, name)

    monkeypatch.setattr(SafetensorsReader, "read", flaky)
    for fmt, name in (("hf", "h"), ("dcp", "d"), ("universal", "u"), ("safetensors", "s.safetensors")):
        calls["n"] = 0
        with pytest.raises(OSError, match="injected"):
            convert(str(tmp_path / "w.safetensors"), str(tmp_path / name), dst_format=fmt)
        if fmt == "universal":
            assert not (tmp_path / name / "manifests").exists() or not list((tmp_path / name / "manifests").iterdir())
            assert not list((tmp_path / name / "data").glob("*/*")) if (tmp_path / name / "data").exists() else True
        else:
            assert not (tmp_path / name).exists()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
