"""``ckpt convert``/``diff`` and ``inspect``/``verify`` on every format: output, exit codes, progress.

Exit codes: 0 ok, 1 operational error, 2 usage, 3 verification failed; ``diff``: 0 equal, 1
different. Commands run in-process (``ckpt.cli.main``) except one real ``python -m ckpt``.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def pt(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    torch.save({"model.w": torch.randn(32, 16, generator=g), "model.b": torch.zeros(16).bfloat16(), "step": 12}, tmp_path / "w.pt")
    return tmp_path / "w.pt"


def test_python_m_ckpt_convert_is_quiet_when_piped(pt: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "ckpt", "convert", str(pt), str(tmp_path / "out"), "--to", "dcp"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "converted" in res.stdout and "(dcp)" in res.stdout
    assert "\r" not in res.stderr and "[#" not in res.stderr, "no progress bar when stderr is not a terminal"


def test_progress_bar_with_bytes_and_rate_on_a_terminal(pt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    err.isatty = lambda: True  # type: ignore[method-assign]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["convert", str(pt), str(tmp_path / "o.safetensors")]) == 0
    assert "\r" in err.getvalue() and "100.0%" in err.getvalue() and "/s" in err.getvalue() and "KiB" in err.getvalue()


def test_convert_json_dry_run_and_every_format(pt: Path, tmp_path: Path) -> None:
    code, out, _ = run("convert", str(pt), str(tmp_path / "h"), "--to", "hf", "--dry-run", "--json")
    report = json.loads(out)
    assert code == 0 and report["dry_run"] and report["plan"]["files"][-1] == "model.safetensors.index.json"
    assert not (tmp_path / "h").exists()
    code, out, _ = run("convert", str(pt), str(tmp_path / "u"), "--to", "universal", "--step", "12", "--dtype", "bfloat16", "--json")
    report = json.loads(out)
    assert code == 0 and report["bytes_out"] < report["bytes_in"] and report["plan"]["step"] == 12
    for fmt, name in (("dcp", "d"), ("hf", "h"), ("safetensors", "s.safetensors"), ("torch", "t.pt")):
        assert run("convert", str(tmp_path / "u"), str(tmp_path / name), "--to", fmt)[0] == 0
        code, out, err = run("inspect", str(tmp_path / name), "--json")
        info = json.loads(out)
        assert code == 0 and info["format"] == fmt and info["tensors"]["model.w"] == {"dtype": "bfloat16", "shape": [32, 16], "bytes": 1024}
        assert info["plain"]["step"] == 12 and info["checksums"] is False
        code, out, _ = run("verify", str(tmp_path / name))
        assert code == 0 and "OK" in out and "no checksums" in out
        code, out, _ = run("verify", str(tmp_path / name), "--json")
        assert code == 0 and json.loads(out)["ok"] is True
    code, out, _ = run("inspect", str(tmp_path / "u"), "--json")
    assert code == 0 and json.loads(out)["step"] == 12, "universal inspect keeps its own report"
    code, out, _ = run("inspect", str(tmp_path / "d"), "--from", "dcp")
    assert code == 0 and "format dcp" in out and "model.w" in out


def test_diff_exit_codes_and_report(pt: Path, tmp_path: Path) -> None:
    assert run("convert", str(pt), str(tmp_path / "same.safetensors"))[0] == 0
    code, out, _ = run("diff", str(pt), str(tmp_path / "same.safetensors"))
    assert code == 0 and "EQUAL" in out
    other = torch.load(pt, weights_only=True)
    other["model.w"][3, 4] += 0.5
    del other["model.b"]
    torch.save(other, tmp_path / "other.pt")
    code, out, _ = run("diff", str(pt), str(tmp_path / "other.pt"))
    assert code == 1 and "DIFFERENT" in out and "only in A  model.b" in out and "max |a-b| = 0.5" in out
    code, out, _ = run("diff", str(pt), str(tmp_path / "other.pt"), "--json")
    doc = json.loads(out)
    assert code == 1 and doc["equal"] is False and {t["status"] for t in doc["tensors"]} == {"different", "only_a"}


def test_usage_errors_exit_2_and_operational_errors_exit_1(pt: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        run("convert", str(pt), str(tmp_path / "x"), "--to", "nope")
    assert e.value.code == 2
    code, _, err = run("convert", str(pt), str(tmp_path / "x"), "--to", "universal", "--layout", "tp=2")
    assert code == 2 and "--rules" in err
    code, _, err = run("convert", str(pt), str(tmp_path / "x.safetensors"), "--dtype", "int8")
    assert code == 2 and "--dtype" in err
    code, _, err = run("convert", str(pt), str(tmp_path / "h"), "--to", "hf", "--max-shard-size", "lots")
    assert code == 2 and "lots" in err
    code, _, err = run("convert", str(pt), str(tmp_path / "noext"))
    assert code == 1 and "pass --to" in err
    code, _, err = run("convert", str(tmp_path / "missing.pt"), str(tmp_path / "o.safetensors"))
    assert code == 1 and "missing.pt" in err
    code, _, err = run("inspect", str(pt), "--step", "3")
    assert code == 2 and "--step" in err
