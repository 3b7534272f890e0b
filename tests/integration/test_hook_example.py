"""``examples/train_gpt.py`` runs, persists through its agent, and resumes from agent memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ckpt
from ckpt.snapshot._shm import pid_alive
from ckpt.snapshot._shm import job_id

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 300.0


def _run(tmp_path: Path, steps: int) -> str:
    cmd = [sys.executable, str(ROOT / "examples" / "train_gpt.py"), "--storage", str(tmp_path / "store"), "--run-dir", str(tmp_path / "run"), "--steps", str(steps), "--persist-every", "3", "--ctx", "16", "--batch", "4"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr


def test_train_gpt_example_persists_and_resumes_from_memory(tmp_path: Path) -> None:
    run = tmp_path / "run" / "rank0"
    agent = None
    try:
        out = _run(tmp_path, 7)
        assert "starting at step 0" in out
        agent = int((run / "agent-r0.pid").read_text())
        out = _run(tmp_path, 9)
        assert "starting at step 7 (restored from memory)" in out
        assert int((run / "agent-r0.pid").read_text()) == agent
        deadline = time.monotonic() + 60
        while ckpt.list_steps(str(tmp_path / "store")) != [0, 3, 6] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ckpt.list_steps(str(tmp_path / "store")) == [0, 3, 6]
        assert ckpt.verify(str(tmp_path / "store")).ok
    finally:
        if agent is not None and pid_alive(agent):
            os.kill(agent, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while pid_alive(agent) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(agent):
                os.kill(agent, signal.SIGKILL)
    assert agent is not None and not pid_alive(agent)
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"ckpt-{job_id(run)}-")] == []
