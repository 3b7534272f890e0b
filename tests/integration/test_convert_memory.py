"""Peak memory of a conversion stays near twice the largest tensor, not the checkpoint size.

A checkpoint of 16 tensors of 32 MiB (512 MiB, 1.6x the allowed peak) is converted in a fresh
subprocess, which reports its peak resident set (``VmHWM`` from ``/proc/self/status``) after
importing everything and after converting. The bound: ``2 x largest tensor + 256 MiB`` for the
whole process (``import torch`` alone is ~220 MiB of it), and no more than ``2 x largest + 48 MiB``
above the process's footprint before the conversion started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import torch

from ckpt.formats import TensorInfo, open_writer

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
TENSOR_BYTES = 32 * MiB
COUNT = 16

pytestmark = [pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)"), pytest.mark.timeout(300)]

CHILD = r"""
import json, sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import torch, numpy, ckpt, ckpt.convert, ckpt._read, ckpt._save, ckpt.formats.dcp, ckpt.formats.universal, ckpt.formats.safetensors
base = hwm()
from ckpt.convert import convert
r = convert(sys.argv[1], sys.argv[2], dst_format=sys.argv[3])
print(json.dumps({"base": base, "peak": hwm(), "largest": r.largest_tensor_bytes, "bytes": r.bytes_in, "seconds": r.seconds}))
"""


def _source(path: Path) -> None:
    """A DCP checkpoint of COUNT x 32 MiB tensors, written tensor by tensor (bounded here too)."""
    infos = [TensorInfo(f"layer{i:02d}.weight", "float32", (TENSOR_BYTES // 4 // 1024, 1024)) for i in range(COUNT)]
    w = open_writer(str(path), format="dcp")
    w.set_plain_state({"step": 1})
    w.begin(infos)
    for i, info in enumerate(infos):
        w.write(info.name, torch.full(info.shape, float(i)))
    w.commit()


def _convert(src: Path, dst: Path, fmt: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), fmt], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture
def work_dir(tmp_path: Path) -> Iterator[Path]:
    """A RAM-backed directory when there is one (the test measures memory, not the disk)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 * COUNT * TENSOR_BYTES:
        path = Path(tempfile.mkdtemp(prefix="ckpt-convert-mem-", dir=shm))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path


def test_peak_rss_is_bounded_by_the_largest_tensor_not_the_checkpoint(work_dir: Path) -> None:
    tmp_path = work_dir
    _source(tmp_path / "dcp")
    total = COUNT * TENSOR_BYTES
    limit = 2 * TENSOR_BYTES + 256 * MiB
    assert total > 1.5 * limit, "the checkpoint must be several times the allowed peak"
    for src, dst, fmt in ((tmp_path / "dcp", tmp_path / "u", "universal"), (tmp_path / "u", tmp_path / "s.safetensors", "safetensors")):
        got = _convert(src, dst, fmt)
        assert got["largest"] == TENSOR_BYTES and got["bytes"] == total
        above = got["peak"] - got["base"]
        assert got["peak"] <= limit, f"{fmt}: peak RSS {got['peak'] / MiB:.0f} MiB > limit {limit / MiB:.0f} MiB ({got})"
        assert above <= 2 * TENSOR_BYTES + 48 * MiB, f"{fmt}: {above / MiB:.0f} MiB above the post-import footprint ({got})"
    from ckpt.formats import open_reader

    with open_reader(str(tmp_path / "s.safetensors")) as r:
        assert [i.name for i in r.tensors()] == [f"layer{i:02d}.weight" for i in range(COUNT)]
        assert torch.equal(r.read("layer07.weight"), torch.full((TENSOR_BYTES // 4 // 1024, 1024), 7.0))
        assert r.plain_state() == {"step": 1}
