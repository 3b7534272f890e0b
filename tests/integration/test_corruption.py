"""Bit flips, truncation and missing objects are caught by load, verify and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt.errors import CorruptChunkError

ROOT = Path(__file__).resolve().parents[2]


def _save(tmp_path: Path, compression=None) -> tuple[str, dict]:
    url = str(tmp_path / "ckpt")
    state = {"w": torch.randn(64, 64), "b": torch.randn(64), "opt": {"exp_avg": torch.randn(64, 64)}}
    ckpt.save(state, url, step=7, compression=compression)
    return url, state


def _object_of(url: str, tensor: str) -> tuple[Path, int, int]:
    _, m = ckpt.open_manifest(url)
    chunk = m.tensors[tensor].chunks[0]
    return Path(url) / (m.data_prefix + chunk.object), chunk.byte_offset, chunk.byte_length


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_bit_flip_is_detected_by_load_and_names_the_chunk(tmp_path, compression) -> None:
    url, state = _save(tmp_path, compression)
    path, off, length = _object_of(url, "opt.exp_avg")
    _flip(path, off + length // 2)
    target = {"w": torch.zeros(64, 64), "b": torch.zeros(64), "opt": {"exp_avg": torch.zeros(64, 64)}}
    with pytest.raises(CorruptChunkError) as err:
        ckpt.load(target, url)
    (failure,) = err.value.failures
    assert failure.tensor == "opt.exp_avg"
    assert failure.object.endswith(path.name) and failure.byte_offset == off and failure.byte_length == length
    assert f"[{off}, {off + length})" in str(err.value)
    # verify=False skips checksums (benchmarks only): an uncompressed flip then loads silently
    if compression is None:
        ckpt.load(target, url, verify=False)


def test_verify_reports_each_bad_chunk_and_cli_exits_3(tmp_path) -> None:
    url, _ = _save(tmp_path)
    assert ckpt.verify(url).ok
    ok = _cli("verify", url)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    for name in ("w", "b"):
        path, off, _ = _object_of(url, name)
        _flip(path, off + 3)
    report = ckpt.verify(url)
    assert not report.ok and {f.tensor for f in report.failures} == {"w", "b"}
    bad = _cli("verify", url)
    assert bad.returncode == 3
    assert "tensor 'w'" in bad.stdout and "tensor 'b'" in bad.stdout and "checksum mismatch" in bad.stdout
    js = _cli("verify", url, "--json")
    assert js.returncode == 3
    doc = json.loads(js.stdout)
    assert doc["ok"] is False and len(doc["steps"][0]["corrupt"]) == 2


def test_truncated_and_missing_objects_are_named(tmp_path) -> None:
    url, _ = _save(tmp_path)
    path, off, length = _object_of(url, "w")
    os.truncate(path, off + length // 2)
    with pytest.raises(CorruptChunkError, match="truncated"):
        ckpt.load({"w": torch.zeros(64, 64), "b": torch.zeros(64), "opt": {"exp_avg": torch.zeros(64, 64)}}, url)
    path.unlink()
    report = ckpt.verify(url)
    assert not report.ok and all("missing" in f.reason or "truncated" in f.reason for f in report.failures)
    assert _cli("verify", url).returncode == 3


def test_corrupt_manifest_fails_verify_with_exit_3_and_load_cleanly(tmp_path) -> None:
    url, _ = _save(tmp_path)
    manifest = next((Path(url) / "manifests").iterdir())
    manifest.write_bytes(manifest.read_bytes().replace(b'"step":7', b'"step":"7"'))
    res = _cli("verify", url)
    assert res.returncode == 3 and "field step" in res.stdout
    with pytest.raises(ckpt.ManifestError, match="field step: must be an integer"):
        ckpt.load({}, url)


def test_cli_ls_inspect_and_errors(tmp_path) -> None:
    url, _ = _save(tmp_path)
    ls = _cli("ls", url)
    assert ls.returncode == 0 and ls.stdout.split() == ["7"]
    ins = _cli("inspect", url, "--json")
    assert ins.returncode == 0, ins.stderr
    info = json.loads(ins.stdout)
    assert info["step"] == 7 and info["tensors"]["opt.exp_avg"]["shape"] == [64, 64]
    assert info["checksums"] == ["crc32c"]
    human = _cli("inspect", url)
    assert "opt.exp_avg" in human.stdout and "float32" in human.stdout
    missing = _cli("inspect", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "no committed checkpoint" in missing.stderr
    usage = _cli("verify", url, "--step", "x")
    assert usage.returncode == 2
    bad_step = _cli("verify", url, "--step", "8")
    assert bad_step.returncode == 1 and "step 8 is not committed" in bad_step.stderr


def test_partial_reads_verify_every_block_they_fetch(tmp_path) -> None:
    """A rank that reads part of a chunk verifies the 256 KiB blocks it fetched (and only those)."""
    import threading

    from ckpt._comm import ThreadGroup
    from ckpt.layout import Layout
    from ckpt.rules import Rules, Split

    url = str(tmp_path / "ckpt")
    w = torch.randn(1024, 512)  # 2 MiB: one chunk of 8 blocks
    ckpt.save({"w": w}, url, step=1)
    path, off, length = _object_of(url, "w")
    _flip(path, off + length - 1000)  # inside block 7, which only rank 1 reads
    rules = Rules(shards=(Split("w", dim=0),))
    group = ThreadGroup(2)
    outcome: dict[int, object] = {}

    def rank(r: int) -> None:
        target = {"w": torch.zeros(512, 512)}
        try:
            res = ckpt.load(target, url, layout=Layout.grid(tp=2, rank=r), rules=rules, comm=group.comm(r))
            outcome[r] = (res.bytes_read, target["w"])
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert isinstance(outcome[1], CorruptChunkError) and "block 7" in str(outcome[1])
    assert isinstance(outcome[0], ckpt.CheckpointError) and "rank(s) [1]" in str(outcome[0])
    # without the flip each rank reads exactly its half
    _flip(path, off + length - 1000)
    outcome.clear()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for r in range(2):
        nbytes, got = outcome[r]
        assert nbytes == 512 * 512 * 4 and torch.equal(got, w[r * 512 : (r + 1) * 512])
