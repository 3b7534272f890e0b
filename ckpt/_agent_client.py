"""The trainer's side of the per-rank agent: start it, find it, talk to it.

One ``AgentClient`` per rank, owned by ``CheckpointHook``. The agent (``python -m agents``) is
started by module name in its own process session, so it outlives the trainer; its pid file and
Unix socket live in the run directory (``agent-r{rank}.pid``, ``agent-r{rank}.sock``). Requests
are one JSON line each way (see docs/protocol.md, "Agent local protocol").

A live agent is never doubled: ``ensure()`` first looks for the pid file's process and waits for
it to answer (a busy agent may be slow), and starts a new one only when that process is gone.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ckpt.snapshot._shm import pid_alive, read_pid

__all__ = ["AgentClient", "AgentUnavailableError"]

log = logging.getLogger("ckpt.hook")


class AgentUnavailableError(RuntimeError):
    """The per-rank agent could not be started, did not answer, or refused a request."""


class AgentClient:
    """Starts and talks to the agent of ``rank`` in ``run_dir``.

    Args:
        run_dir: the directory shared with the agent.
        rank: the rank the agent serves.
        grace_s: how long the agent outlives a dead trainer.
        timeout_s: how long to wait for the agent to start or answer.
        persist_url, persist_every: where and how often the agent persists (``persist_every``
            0: never; then ``persist_url`` is not passed).
        shm_limit: bytes of shared memory the agent's slots may hold (0: no limit); applies to
            an agent this client starts, not to one already running.
    """

    def __init__(self, run_dir: Path, rank: int, *, grace_s: float, timeout_s: float, persist_url: str, persist_every: int, shm_limit: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self.persist_url = persist_url
        self.persist_every = persist_every
        self.shm_limit = shm_limit
        self.process: Optional[subprocess.Popen] = None  # the agent this client started, if any
        self.pid: Optional[int] = None  # the agent found or started by the last ensure()

    @property
    def socket_path(self) -> Path:
        return self.run_dir / f"agent-r{self.rank}.sock"

    @property
    def log_path(self) -> Path:
        return self.run_dir / f"agent-r{self.rank}.log"

    def request(self, req: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Send one request, return the agent's answer.

        Raises:
            OSError: no agent listens, or it did not answer within ``timeout``.
            AgentUnavailableError: the agent refused the request (its error is in the message).
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket_path))
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("agent closed the channel")
                buf += chunk
        resp = json.loads(buf)
        if not resp.get("ok"):
            raise AgentUnavailableError(f"agent of rank {self.rank} refused {req.get('op')}: {resp.get('error')}")
        return resp

    def send(self, req: dict[str, Any], timeout: float = 5.0) -> None:
        """Send one request and do not wait for the answer (the agent still acts on it).

        Raises:
            OSError: no agent listens, or the request could not be sent within ``timeout``.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket_path))
            s.sendall(json.dumps(req).encode() + b"\n")

    def ping(self, timeout: float = 2.0) -> Optional[int]:
        """The pid of the live agent answering on this rank's channel, or None."""
        try:
            return int(self.request({"op": "ping"}, timeout=timeout)["pid"])
        except (OSError, ValueError, KeyError, AgentUnavailableError):
            return None

    def live(self) -> Optional[int]:
        """The pid of this rank's agent if its pid file names a live process, once it answers
        (waiting up to ``timeout_s``: a live agent may be slow, and is never doubled).

        Raises:
            AgentUnavailableError: the process lives but did not answer in time.
        """
        pid = read_pid(self.run_dir / f"agent-r{self.rank}.pid")
        if pid is None or not pid_alive(pid):
            return None
        deadline = time.monotonic() + self.timeout_s
        while pid_alive(pid):
            answered = self.ping(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            if answered == pid:
                return pid
            if time.monotonic() >= deadline:
                raise AgentUnavailableError(f"agent {pid} of rank {self.rank} is alive but did not answer within {self.timeout_s} s")
            time.sleep(0.05)
        return None

    def ensure(self) -> bool:
        """Make sure the agent runs; True if a new one had to be started.

        Raises:
            AgentUnavailableError: the new agent did not answer within ``timeout_s`` (its log
                file is named in the message).
        """
        self.pid = self.live()
        if self.pid is not None:
            return False
        cmd = [sys.executable, "-m", "agents", "--run-dir", str(self.run_dir), "--rank", str(self.rank), "--grace-s", str(self.grace_s)]
        if self.persist_every:
            cmd += ["--persist-url", self.persist_url, "--persist-every", str(self.persist_every)]
        if self.shm_limit:
            cmd += ["--shm-limit", str(self.shm_limit)]
        logf = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        finally:
            logf.close()
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if read_pid(self.run_dir / f"agent-r{self.rank}.pid") == self.process.pid:
                self.pid = self.ping(timeout=max(0.1, deadline - time.monotonic()))
                if self.pid == self.process.pid:
                    log.info("rank %s: agent %d started", self.rank, self.process.pid)
                    return True
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AgentUnavailableError(f"agent of rank {self.rank} did not start within {self.timeout_s} s; see {self.log_path}")

    def dead(self) -> bool:
        """True once the agent found or started by ``ensure()`` has exited."""
        if self.process is not None and self.process.poll() is not None:
            return True
        pid = self.pid if self.pid is not None else (self.process.pid if self.process is not None else None)
        # a killed multi-threaded agent is a zombie before waitpid can reap it: ask /proc
        return pid is not None and not pid_alive(pid)

    def forget_exited(self) -> None:
        """Drop the handle of a started agent that has exited (reaped)."""
        if self.process is not None and self.process.poll() is not None:
            self.process = None

    def alloc(self, slot: int, nbytes: int) -> str:
        """Have the agent (re)allocate slot ``slot`` of at least ``nbytes``; its segment name."""
        return self.request({"op": "alloc", "slot": slot, "nbytes": nbytes})["name"]
