"""Running real rank processes for multi-process tests: start, watch, kill, report logs.

One place for the hang watchdog: every rank must exit 0 before the deadline; on the first
failure or at the deadline every rank is killed and the test fails with each rank's log tail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import pytest

__all__ = ["rank_env", "start_rank", "stop", "terminate_pids", "logs", "wait_all"]


def rank_env() -> dict[str, str]:
    """The environment for a rank: one OpenMP thread (2-core machines), gloo on loopback."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the host name resolves to
    return env


def start_rank(argv: Sequence[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``python argv...`` with stdout and stderr into ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, *map(str, argv)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)


def stop(procs: Sequence[subprocess.Popen]) -> None:
    """Kill every rank still running and reap all of them."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def terminate_pids(pids: Iterable[int], grace_s: float = 30.0) -> list[int]:
    """SIGTERM processes we did not start as children (agents), wait up to ``grace_s`` for them
    to exit, SIGKILL the rest; returns the pids still alive after that (should be none)."""
    from ckpt.snapshot._shm import pid_alive

    pids = list(pids)
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    return [p for p in pids if pid_alive(p)]


def logs(log_dir: Path, world: int) -> str:
    parts = []
    for rank in range(world):
        log = log_dir / f"rank{rank}.log"
        text = log.read_text(errors="replace") if log.exists() else "(no log)"
        parts.append(f"--- rank {rank} ---\n{text[-4000:]}")
    return "\n".join(parts)


def wait_all(procs: Sequence[subprocess.Popen], what: str, log_dir: Path, deadline_s: float) -> None:
    """Poll until every rank exits 0; kill all and fail on the first failure or the deadline."""
    deadline = time.monotonic() + deadline_s
    while any(p.poll() is None for p in procs):
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            stop(procs)
            pytest.fail(f"{what}: rank(s) {failed} failed\n{logs(log_dir, len(procs))}")
        if time.monotonic() > deadline:
            stop(procs)
            pytest.fail(f"{what}: ranks still running after {deadline_s} s (hang)\n{logs(log_dir, len(procs))}")
        time.sleep(0.05)
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        pytest.fail(f"{what}: exit codes {codes}\n{logs(log_dir, len(procs))}")
