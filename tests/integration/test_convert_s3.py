"""Conversions with S3 sources and destinations, on the loopback moto server.

Reads are ranged (safetensors headers and tensors, universal chunks, DCP items); outputs commit
atomically: a failed upload leaves no object, a directory-like output (hf, dcp) has no index or
``.metadata`` until every data object is in, and a universal save has no manifest.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.cli import main
from ckpt.convert import convert, diff
from ckpt.formats import open_reader

pytestmark = pytest.mark.s3


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "model.emb": torch.randn(300, 64, generator=g),
        "model.norm": torch.randn(64, generator=g).to(torch.bfloat16),
        "model.ids": torch.arange(17, dtype=torch.int64),
        "model.flag": torch.tensor([True, False, True]),
    }


def _fs(opts: dict[str, Any]) -> Any:
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    fs.invalidate_cache()
    return fs


def test_local_to_s3_to_s3_to_local_every_format(s3_url: tuple[str, dict], tmp_path: Path) -> None:
    url, opts = s3_url
    state = _state()
    torch.save({**state, "step": 4}, tmp_path / "src.pt")
    hops = [
        (str(tmp_path / "src.pt"), f"{url}/st/model.safetensors", "safetensors"),
        (f"{url}/st/model.safetensors", f"{url}/uni", "universal"),
        (f"{url}/uni", f"{url}/hf", "hf"),
        (f"{url}/hf", f"{url}/dcp", "dcp"),
        (f"{url}/dcp", f"{url}/t/model.pt", "torch"),
        (f"{url}/t/model.pt", str(tmp_path / "back.safetensors"), "safetensors"),
    ]
    for src, dst, fmt in hops:
        report = convert(src, dst, dst_format=fmt, storage_options=opts, max_shard_size=20000 if fmt == "hf" else None)
        assert report.dst_format == fmt and report.tensors == len(state), (src, dst)
        with open_reader(dst, storage_options=opts if dst.startswith("s3://") else None) as r:
            assert r.format == fmt
            for name, want in state.items():
                assert torch.equal(r.read(name), want), (fmt, name)
            assert r.plain_state().get("step") == 4, fmt
    fs = _fs(opts)
    root = url[len("s3://"):]
    assert fs.exists(f"{root}/hf/model.safetensors.index.json") and len(fs.glob(f"{root}/hf/*.safetensors")) > 1
    assert fs.exists(f"{root}/dcp/.metadata")
    _, manifest = ckpt.open_manifest(f"{url}/uni", storage_options=opts)
    codecs = {c["name"] for t in manifest.tensors.values() for ch in t.chunks for c in ch.codecs}
    assert "zstd" in codecs, "object stores compress by default, as ckpt.save does"
    assert diff(str(tmp_path / "src.pt"), str(tmp_path / "back.safetensors")).equal
    assert ckpt.verify(f"{url}/uni", storage_options=opts).ok


def test_failed_conversion_to_s3_publishes_nothing(s3_url: tuple[str, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt.formats.torchsave import TorchReader

    url, opts = s3_url
    torch.save({f"t{i}": torch.full((5000,), float(i)) for i in range(6)}, tmp_path / "w.pt")
    real = TorchReader.read
    calls = {"n": 0}

    def flaky(self: Any, name: str) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("injected: network down")
        return real(self, name)

    monkeypatch.setattr(TorchReader, "read", flaky)
    fs = _fs(opts)
    root = url[len("s3://"):]
    for fmt, name in (("safetensors", "x.safetensors"), ("hf", "hf"), ("dcp", "dcp"), ("universal", "uni")):
        calls["n"] = 0
        with pytest.raises(OSError, match="injected"):
            convert(str(tmp_path / "w.pt"), f"{url}/{name}", dst_format=fmt, storage_options=opts, max_shard_size=40000 if fmt == "hf" else None)
        fs.invalidate_cache()
        assert fs.find(f"{root}/{name}") == [], f"{fmt}: partial output left behind: {fs.find(f'{root}/{name}')}"


def test_cli_convert_and_diff_on_s3(s3_url: tuple[str, dict], s3_server: Any, tmp_path: Path) -> None:
    url, opts = s3_url
    torch.save(_state(), tmp_path / "w.pt")
    out, err = io.StringIO(), io.StringIO()
    common = ["--endpoint-url", s3_server.endpoint_url]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["convert", str(tmp_path / "w.pt"), f"{url}/w.safetensors", *common]) == 0, err.getvalue()
        assert main(["inspect", f"{url}/w.safetensors", *common]) == 0, err.getvalue()
        assert main(["verify", f"{url}/w.safetensors", *common]) == 0, err.getvalue()
        assert main(["diff", str(tmp_path / "w.pt"), f"{url}/w.safetensors", *common]) == 0, err.getvalue()
    text = out.getvalue()
    assert "format safetensors" in text and "EQUAL" in text and "no checksums" in text
