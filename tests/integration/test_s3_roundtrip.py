"""ckpt.save/load/verify and the CLI against S3, through s3fs and a loopback moto server."""

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

pytestmark = pytest.mark.s3
ROOT = Path(__file__).resolve().parents[2]


def _state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    return {"model": model.state_dict(), "bf16": torch.randn(128, 16).to(torch.bfloat16), "step": 9, "note": "s3"}


def test_save_load_verify_on_s3_compresses_by_default(s3_url) -> None:
    url, opts = s3_url
    state = _state()
    res = ckpt.save(state, url, step=9, storage_options=opts, keep_last=2)
    assert res.step == 9
    store, manifest = ckpt.open_manifest(url, storage_options=opts)
    codecs = {c["name"] for t in manifest.tensors.values() for ch in t.chunks for c in ch.codecs}
    assert codecs == {"byteshuffle", "zstd"}, "object stores compress by default"
    target = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "bf16": torch.zeros(128, 16, dtype=torch.bfloat16), "step": None, "note": None}
    loaded = ckpt.load(target, url, storage_options=opts)
    assert loaded.state["step"] == 9 and loaded.state["note"] == "s3"
    for k, v in state["model"].items():
        assert torch.equal(target["model"][k], v)
    assert torch.equal(target["bf16"], state["bf16"])
    assert ckpt.verify(url, storage_options=opts).ok
    for step in (10, 11):
        ckpt.save(state, url, step=step, storage_options=opts, keep_last=2)
    assert ckpt.list_steps(url, storage_options=opts) == [10, 11]
    assert not [k for k in store.list("data/") if "step-000000000009" in k], "retention removed step 9's data"


def test_corruption_on_s3_is_detected(s3_url) -> None:
    url, opts = s3_url
    ckpt.save({"w": torch.randn(256, 256)}, url, step=1, storage_options=opts, compression=None)
    store, manifest = ckpt.open_manifest(url, storage_options=opts)
    chunk = manifest.tensors["w"].chunks[0]
    key = manifest.data_prefix + chunk.object
    data = bytearray(store.get(key))
    data[chunk.byte_offset + 1000] ^= 0xFF
    store.put(key, bytes(data))
    with pytest.raises(CorruptChunkError, match="'w'"):
        ckpt.load({"w": torch.zeros(256, 256)}, url, storage_options=opts)


def test_cli_against_s3(s3_url, s3_server) -> None:
    url, opts = s3_url
    ckpt.save(_state(), url, step=3, storage_options=opts)
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "ckpt"]
    ls = subprocess.run(cmd + ["ls", url, "--endpoint-url", s3_server.endpoint_url], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ls.returncode == 0, ls.stderr
    assert ls.stdout.split() == ["3"]
    ver = subprocess.run(cmd + ["verify", url, "--endpoint-url", s3_server.endpoint_url, "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ver.returncode == 0, ver.stderr
    assert json.loads(ver.stdout)["ok"] is True
