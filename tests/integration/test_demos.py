"""The demos the README sends a new user to run (``scripts/demo.sh``) pass as they are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("script", ["quickstart.py", "crash_demo.py"])
def test_demo_runs_and_says_ok(tmp_path: Path, script: str) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--dir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    assert "demo OK" in p.stdout and "FAILED" not in p.stdout, p.stdout[-6000:]
