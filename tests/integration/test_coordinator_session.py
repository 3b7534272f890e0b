"""A member session re-registers on its own after the coordinator is killed and restarted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")

from ckpt.layout import Layout  # noqa: E402
from recovery.session import MemberSession  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(state: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "recovery", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state),
                             "--heartbeat-interval-ms", "100", "--heartbeat-timeout-ms", "10000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc


def _wait(cond, deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"{what} within {deadline_s} s")
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_member_re_registers_after_coordinator_sigkill_and_restart(tmp_path: Path) -> None:
    state, port = tmp_path / "state", _free_port()
    proc = _spawn(state, port)
    seen: list[int] = []
    session = MemberSession(f"127.0.0.1:{port}", job="job1", rank=1, node="node0", agent_address="127.0.0.1:7001",
                            layout=Layout.grid(dp=2, rank=1), interval_s=0.1, deadline_s=2.0, on_registered=seen.append)
    try:
        first = session.start()
        assert first >= 1 and session.registrations == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc = _spawn(state, port)  # same address, same state dir
        _wait(lambda: session.registrations >= 2, 60, "the member did not register again")
        assert session.generation > first and seen[-1] == session.generation
        regs = session.registrations
        time.sleep(1.0)  # heartbeats with the new generation are accepted: no further re-registration
        assert session.registrations == regs
    finally:
        session.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
