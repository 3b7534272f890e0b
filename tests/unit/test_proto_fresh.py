"""The checked-in generated protocol code (recovery/_proto) matches what the .proto produces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "recovery" / "_proto"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (pip install -e '.[test]')")
    out = tmp_path / "_proto"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    fresh = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    have = {p.name: p.read_text() for p in CHECKED_IN.iterdir() if p.is_file()}
    stale = sorted(n for n in fresh.keys() | have.keys() if fresh.get(n) != have.get(n))
    from importlib.metadata import version

    assert not stale, (
        f"recovery/_proto is stale ({', '.join(stale)}): run `python scripts/gen_proto.py` and commit the result "
        f"(generated here with grpcio-tools {version('grpcio-tools')}; pyproject pins the version CI uses)")


def test_generated_code_imports_as_a_subpackage() -> None:
    pytest.importorskip("grpc")
    from recovery._proto import coordinator_pb2, coordinator_pb2_grpc

    assert coordinator_pb2.DESCRIPTOR.package == "ckpt.coordinator.v1"
    assert hasattr(coordinator_pb2_grpc, "CoordinatorServicer")
