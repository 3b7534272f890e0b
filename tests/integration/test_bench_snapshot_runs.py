"""The snapshot benchmarks run end to end (tiny state, one round): every mode, the JSON they
write, and no agent or shared-memory segment left behind. Their figures are not checked here:
performance is measured by running them, never asserted in a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
MODES = "none,bare_copy,snapshot,snapshot_yield,snapshot_shm,hook,hook_yield,dcp_async,torch_save"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("ckpt-")}


def _run(args: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_bench_snapshot_runs_every_mode(tmp_path: Path) -> None:
    before = _shm()
    out = tmp_path / "snapshot.json"
    _run([str(BENCH / "bench_snapshot.py"), "--gib", "0.02", "--rounds", "1", "--steps", "2", "--warmup", "3", "--modes", MODES, "--json", str(out)], tmp_path)
    record = json.loads(out.read_text())
    assert set(record["results"]) == set(MODES.split(","))
    for mode in ("snapshot", "snapshot_yield", "snapshot_shm", "hook", "hook_yield"):
        assert record["results"][mode]["completed"] >= 2, mode  # every measured step was snapshotted
    assert record["summary"]["copy_bw_ratio"] > 0 and record["summary"]["copy_bw_ratio_shm"] > 0
    assert _shm() == before, "the benchmark left shared-memory segments behind"


def test_bench_snapshot_cuda_checks_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "cuda.json"
    _run([str(BENCH / "bench_snapshot_cuda.py"), "--device", "cpu", "--gib", "0.02", "--rounds", "1", "--steps", "2", "--json", str(out)], tmp_path)
    summary = json.loads(out.read_text())["summary"]
    assert summary["device"] == "cpu" and summary["snapshot_idle_s"] > 0 and "throughput_ratio" in summary
