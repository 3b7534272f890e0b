"""The training hook: per-step lazy snapshots into the per-rank agent's shared memory.

``CheckpointHook`` wraps a training loop::

    with CheckpointHook(state={"model": m, "optim": o, "sched": s}, storage=url) as hook:
        for step in range(hook.restore(), steps):
            train_step()
            hook.step(step)          # after the optimizer step; returns at once

``restore()`` takes the cheapest source first: the latest complete snapshot in the shared memory
of this rank's live agent (no storage I/O), else the latest committed checkpoint under
``storage`` (``ckpt.load``), else nothing; it returns the step to start at (the restored step
plus one, or 0). ``step()`` hands the state to a ``SnapshotEngine`` whose slots are segments the
agent created; a complete snapshot is published in the run directory's slot table (written last,
atomically) at the next ``step()``/``wait()``/``close()``. The agent (``python -m agents``,
started here by module name in its own session and restarted if it dies) persists every
``persist_every``-th published snapshot with ``ckpt.save``; the trainer does no storage I/O after
``restore()``. Python, numpy and torch (and CUDA) RNG states are captured automatically.

Persisting from the agent is implemented for single-process jobs (the agent saves the rank's
state alone); under ``torch.distributed`` each rank gets its own agent and in-memory restore.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ckpt.snapshot._engine import Snapshot, SnapshotEngine, SnapshotPolicy
from ckpt.snapshot._restore import restore_from_snapshot
from ckpt.snapshot._shm import (
    PERSIST_NAME,
    TABLE_NAME,
    SharedMemoryBuffers,
    SharedSnapshot,
    job_id,
    pid_alive,
    read_pid,
    read_table,
    write_table,
)

__all__ = ["CheckpointHook", "RNGState", "AgentUnavailableError"]

log = logging.getLogger("ckpt.hook")

_SLOTS = 3  # published (pinned) + latest complete + being filled
_OWNER_SLOTS = _SLOTS + 1  # one more, so a restarted trainer keeps off the slot it restored


class AgentUnavailableError(RuntimeError):
    """The per-rank agent did not start or does not answer (its log is in the run directory)."""


class RNGState:
    """Python, numpy, torch (and CUDA) global RNG states as a stateful object."""

    def state_dict(self) -> dict[str, Any]:
        ver, internal, gauss = random.getstate()
        np_state = np.random.get_state()
        sd: dict[str, Any] = {
            "python": {"version": ver, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "torch": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            sd["cuda"] = list(torch.cuda.get_rng_state_all())
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        p = sd["python"]
        random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
        n = sd["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        torch.random.set_rng_state(sd["torch"])
        if "cuda" in sd and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(sd["cuda"])


def _default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class CheckpointHook:
    """Per-step lazy snapshots into the agent's shared memory, periodic persistence, restore.

    Args:
        state: the training state (modules, optimizers, schedulers, objects with
            ``state_dict``/``load_state_dict``, nested dicts of tensors and plain values).
        storage: URL or path of the persistent checkpoints (written by the agent).
        run_dir: the local directory shared with the agent (default: a directory under the
            system temp dir derived from ``storage``).
        snapshot_every: snapshot every this many steps.
        persist_every: the agent persists snapshots whose step is a multiple of this (0: never).
        rules, layout: passed to ``ckpt.load`` for a restore from storage.
        rank: this rank (default: ``torch.distributed`` rank or 0).
        grace_s: how long the agent outlives a dead trainer.
        policy: the snapshot engine's policy.
        agent_timeout_s: how long to wait for the agent to start or answer.
        persist_wait_s: how long a persist step waits for the agent to have copied the previous
            one (back-pressure; then that step is not persisted, logged).

    The constructor only assigns; ``start()`` (called by ``restore``/``step`` or ``with``) starts
    the agent and the engine. ``close()`` is mandatory (or use ``with``).
    """

    def __init__(
        self,
        state: Any,
        storage: str,
        run_dir: Optional[str] = None,
        snapshot_every: int = 1,
        persist_every: int = 100,
        rules: Any = None,
        layout: Any = None,
        *,
        rank: Optional[int] = None,
        grace_s: float = 30.0,
        policy: Optional[SnapshotPolicy] = None,
        agent_timeout_s: float = 60.0,
        persist_wait_s: float = 30.0,
    ) -> None:
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, not {snapshot_every}")
        if persist_every < 0:
            raise ValueError(f"persist_every must be >= 0, not {persist_every}")
        self.state = state
        self.storage = str(storage)
        self.run_dir = run_dir
        self.snapshot_every = snapshot_every
        self.persist_every = persist_every
        self.rules, self.layout = rules, layout
        self.rank = rank
        self.grace_s = grace_s
        self.policy = policy
        self.agent_timeout_s = agent_timeout_s
        self.persist_wait_s = persist_wait_s
        self.full_state = {"state": state, "rng": RNGState()}
        #: counters: agent_restarts, published, restored_from ("memory", "storage" or None)
        self.stats: dict[str, Any] = dict(agent_restarts=0, published=0, restored_from=None)
        self._engine: Optional[SnapshotEngine] = None
        self._buffers: Optional[SharedMemoryBuffers] = None
        self._agent: Optional[subprocess.Popen] = None
        self._agent_pid: Optional[int] = None
        self._published: Optional[Snapshot] = None
        self._persist_pin: Optional[Snapshot] = None
        self._started = False
        self._closed = False

    # ------------------------------------------------------------ paths
    @property
    def _dir(self) -> Path:
        assert self.run_dir is not None
        return Path(self.run_dir)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> CheckpointHook:
        """Write this trainer's pid file and make sure the agent runs (idempotent)."""
        if self._closed:
            raise RuntimeError("CheckpointHook is closed")
        if self._started:
            return self
        if self.rank is None:
            self.rank = _default_rank()
        if self.run_dir is None:
            self.run_dir = os.path.join(tempfile.gettempdir(), f"ckpt-run-{job_id(self.storage)}")
        self._dir.mkdir(parents=True, exist_ok=True)
        tmp = self._dir / f".trainer-r{self.rank}.tmp"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, self._dir / f"trainer-r{self.rank}.pid")
        self._ensure_agent()
        self._started = True
        return self

    def __enter__(self) -> CheckpointHook:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish the snapshot in flight, publish it, stop the engine. The agent keeps the
        snapshots for ``grace_s`` after this process exits. Idempotent."""
        if self._closed:
            return
        try:
            if self._engine is not None:
                try:
                    self._engine.wait()
                    self._publish()
                except Exception:
                    log.exception("rank %s: last snapshot failed at close", self.rank)
        finally:
            self._closed = True
            for snap in (self._published, self._persist_pin):
                if snap is not None:
                    snap.release()
            self._published = self._persist_pin = None
            if self._engine is not None:
                self._engine.close()
            if self._agent is not None and self._agent.poll() is not None:
                self._agent = None

    # ------------------------------------------------------------ agent
    def _request(self, req: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self._dir / f"agent-r{self.rank}.sock"))
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

    def agent_pid(self, timeout: float = 2.0) -> Optional[int]:
        """The pid of the live agent answering on this rank's channel, or None."""
        try:
            return int(self._request({"op": "ping"}, timeout=timeout)["pid"])
        except (OSError, ValueError, KeyError, AgentUnavailableError):
            return None

    def _live_agent(self) -> Optional[int]:
        """The pid of this rank's agent if its pid file names a live process, once it answers
        (waiting up to ``agent_timeout_s``: a live agent may be slow, and is never doubled)."""
        pid = read_pid(self._dir / f"agent-r{self.rank}.pid")
        if pid is None or not pid_alive(pid):
            return None
        deadline = time.monotonic() + self.agent_timeout_s
        while pid_alive(pid):
            answered = self.agent_pid(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            if answered == pid:
                return pid
            if time.monotonic() >= deadline:
                raise AgentUnavailableError(f"agent {pid} of rank {self.rank} is alive but did not answer within {self.agent_timeout_s} s")
            time.sleep(0.05)
        return None

    def _ensure_agent(self) -> None:
        self._agent_pid = self._live_agent()
        if self._agent_pid is not None:
            return
        if self._started:
            self.stats["agent_restarts"] += 1
            log.warning("rank %s: agent is gone; starting a new one (restart %d)", self.rank, self.stats["agent_restarts"])
        cmd = [sys.executable, "-m", "agents", "--run-dir", str(self._dir), "--rank", str(self.rank), "--grace-s", str(self.grace_s)]
        if self.persist_every:
            cmd += ["--persist-url", self.storage, "--persist-every", str(self.persist_every)]
        logf = open(self._dir / f"agent-r{self.rank}.log", "ab")
        try:
            self._agent = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        finally:
            logf.close()
        deadline = time.monotonic() + self.agent_timeout_s
        while time.monotonic() < deadline:
            if read_pid(self._dir / f"agent-r{self.rank}.pid") == self._agent.pid:
                self._agent_pid = self.agent_pid(timeout=max(0.1, deadline - time.monotonic()))
                if self._agent_pid == self._agent.pid:
                    log.info("rank %s: agent %d started", self.rank, self._agent.pid)
                    return
            if self._agent.poll() is not None:
                break
            time.sleep(0.05)
        raise AgentUnavailableError(f"agent of rank {self.rank} did not start within {self.agent_timeout_s} s; see {self._dir / f'agent-r{self.rank}.log'}")

    def _alloc(self, slot: int, nbytes: int) -> str:
        # on the copier thread: a failure is latched by the engine; the next step() restarts a
        # dead agent (and the engine with it)
        return self._request({"op": "alloc", "slot": slot, "nbytes": nbytes})["name"]

    # ------------------------------------------------------------ restore
    def restore(self) -> int:
        """Restore the newest state available, cheapest source first; return the step to start
        at (restored step + 1, or 0 when there is nothing to restore).

        Raises:
            StateMismatchError: the source does not fit the state.
        """
        self.start()
        entry = read_table(self._dir, TABLE_NAME)
        if entry is not None and self._live_agent() is not None:
            try:
                with SharedSnapshot(entry) as snap:
                    restore_from_snapshot(self.full_state, snap)  # verifies checksums
                self.stats["restored_from"] = "memory"
                log.info("rank %s: restored step %d from agent memory", self.rank, entry["step"])
                return entry["step"] + 1
            except (FileNotFoundError, ValueError) as e:
                log.warning("rank %s: snapshot of step %d in memory unusable (%r); trying storage", self.rank, entry["step"], e)
        import ckpt
        from ckpt.errors import CheckpointNotFoundError

        try:
            result = ckpt.load(self.full_state, self.storage, layout=self.layout, rules=self.rules)
        except CheckpointNotFoundError:
            return 0
        self.stats["restored_from"] = "storage"
        log.info("rank %s: restored step %d from %s", self.rank, result.step, self.storage)
        return result.step + 1

    # ------------------------------------------------------------ snapshots
    def _ensure_engine(self) -> SnapshotEngine:
        if self._engine is None:
            self.start()
            entry = read_table(self._dir, TABLE_NAME)
            avoid = entry["slot"] if entry is not None else None
            owner = [s for s in range(_OWNER_SLOTS) if s != avoid][:_SLOTS]
            self._buffers = SharedMemoryBuffers(self._alloc, dict(enumerate(owner)))
            self._engine = SnapshotEngine(self.full_state, buffers=self._buffers, policy=self.policy, slots=_SLOTS).start()
            for obj in _walk(self.state):
                if isinstance(obj, torch.optim.Optimizer):
                    self._engine.register_guard(obj)
        return self._engine

    def step(self, step: int) -> bool:
        """Call after the optimizer step of ``step``: publish the last complete snapshot, then
        snapshot this step lazily (every ``snapshot_every`` steps). Returns True when a snapshot
        was taken. Never raises for a snapshot failure unless the policy's ``max_failures``
        consecutive snapshots failed."""
        engine = self._ensure_engine()
        self._publish()
        if step % self.snapshot_every:
            return False
        if self._agent_dead():
            # its segments died with it: a new agent, a new engine with new slots
            self._reset_engine()
            self._ensure_agent()
            engine = self._ensure_engine()
        return engine.snapshot(step)

    def _agent_dead(self) -> bool:
        if self._agent is not None and self._agent.poll() is not None:
            return True
        pid = self._agent_pid if self._agent_pid is not None else (self._agent.pid if self._agent is not None else None)
        # a killed multi-threaded agent is a zombie before waitpid can reap it: ask /proc
        return pid is not None and not pid_alive(pid)

    def _reset_engine(self) -> None:
        engine, self._engine = self._engine, None
        for snap in (self._published, self._persist_pin):
            if snap is not None:
                snap.release()
        self._published = self._persist_pin = None
        if engine is not None:
            try:
                engine.wait()
            except Exception as e:  # latched copier error: the old slots are gone anyway
                log.warning("rank %s: snapshot in flight lost with the agent: %r", self.rank, e)
            engine.close()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until the snapshots in flight are complete and published; re-raise a latched
        snapshot error (once)."""
        if self._engine is not None:
            self._engine.wait(timeout)
            self._publish()

    def _publish(self) -> None:
        assert self._engine is not None and self._buffers is not None
        self._release_persist_pin()
        snap = self._engine.latest_complete()
        if snap is None:
            return
        if self._published is not None and snap.step <= self._published.step:
            snap.release()
            return
        entry = _entry(snap, self._buffers)
        write_table(self._dir, entry, TABLE_NAME)  # the commit of this snapshot
        old, self._published = self._published, snap
        if self.persist_every and snap.step % self.persist_every == 0:
            self._wait_persist_ack()
            if self._persist_pin is None:
                write_table(self._dir, entry, PERSIST_NAME)
                self._notify_persist()
            else:
                log.warning("rank %s: agent still copying step %d; step %d not persisted", self.rank, self._persist_pin.step, snap.step)
        if old is not None:
            if self.persist_every and old.step % self.persist_every == 0 and self._persist_pin is None and not self._acked(old.step):
                self._persist_pin = old  # kept from reuse until the agent copied it
            else:
                old.release()
        self.stats["published"] += 1

    def _notify_persist(self) -> None:
        """Tell the agent a snapshot to persist is waiting (it copies it before answering)."""
        try:
            self._request({"op": "persist"}, timeout=self.persist_wait_s)
        except (OSError, ValueError, AgentUnavailableError) as e:
            log.warning("rank %s: agent did not take the snapshot to persist: %r", self.rank, e)

    def _wait_persist_ack(self) -> None:
        """Back-pressure: the agent has not copied the previous snapshot to persist yet; wait
        for it at most ``persist_wait_s`` (then that persist is skipped, logged)."""
        pin = self._persist_pin
        if pin is None:
            return
        t0 = time.monotonic()
        while not self._acked(pin.step) and time.monotonic() - t0 < self.persist_wait_s:
            if self._agent is not None and self._agent.poll() is not None:
                break
            time.sleep(0.005)
        self._release_persist_pin()
        if self._persist_pin is None:
            return
        log.warning("rank %s: agent has not copied step %d after %.1f s", self.rank, pin.step, self.persist_wait_s)

    def _acked(self, step: int) -> bool:
        try:
            return int((self._dir / f"persist-ack-r{self.rank}").read_text()) >= step
        except (OSError, ValueError):
            return False

    def _release_persist_pin(self) -> None:
        pin = self._persist_pin
        if pin is None:
            return
        if self._acked(pin.step) or (self._agent is not None and self._agent.poll() is not None):
            pin.release()
            self._persist_pin = None

    @property
    def memory_bytes(self) -> int:
        """Bytes of shared memory this rank's snapshots hold."""
        return 0 if self._buffers is None else self._buffers.memory_bytes


def _entry(snap: Snapshot, buffers: SharedMemoryBuffers) -> dict[str, Any]:
    from ckpt.snapshot._shm import snapshot_entry

    return snapshot_entry(snap, buffers)


def _walk(obj: Any, depth: int = 0) -> Any:
    yield obj
    if depth < 8 and isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v, depth + 1)
    elif depth < 8 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v, depth + 1)
