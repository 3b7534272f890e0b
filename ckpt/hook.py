"""The training hook: per-step lazy snapshots into the per-rank agent's shared memory.

``CheckpointHook`` wraps a training loop::

    with CheckpointHook(state={"model": m, "optim": o, "sched": s}, storage=url) as hook:
        for step in range(hook.restore(), steps):
            train_step()
            hook.step(step)          # after the optimizer step; returns at once

``restore()`` takes the cheapest source first: the newest complete snapshot in the shared memory
of this rank's live agent (no storage I/O), else the latest committed checkpoint under
``storage`` (``ckpt.load``), else nothing; it returns the step to start at (the restored step
plus one, or 0). ``step()`` hands the state to a ``SnapshotEngine`` whose slots are segments the
agent created; each snapshot is published in the run directory's slot table (written last,
atomically) by the engine's publisher thread as soon as its copy is complete, so a trainer killed right
after a copy finished loses nothing. Under ``torch.distributed`` the table also names the
snapshot before the latest (both kept intact), so ranks that died one step apart still share a
step to restore. Shared memory per rank: 3 state-sized slots for one process, 4 under
``torch.distributed``, plus the slots a restarted trainer keeps off (``hook.memory_bytes``).

The agent (``python -m agents``, started here by module name in its own session and restarted
if it dies) persists every ``persist_every``-th published snapshot with ``ckpt.save``; the
trainer does no storage I/O after ``restore()``. Under ``torch.distributed`` (more than one
rank) the agents of all ranks persist together, as one checkpoint of the job: ``start()`` is a
one-time collective in which rank 0's agent opens a ``TCPStore`` and every rank learns its
address; each persist then runs ``ckpt.save(..., layout=, rules=, comm=StoreComm(...))`` in the
agents (see ``agents._agent``). ``restore()`` is then a collective too: every rank restores the
same step (the newest one every rank holds in memory, else the latest committed one).

Python, numpy and torch (and CUDA) RNG states are captured automatically; under
``torch.distributed`` they are saved per rank (``rank_local``).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ckpt._agent_client import AgentClient, AgentUnavailableError
from ckpt._hook_load import _walk
from ckpt.snapshot._engine import SnapshotEngine
from ckpt.snapshot._records import Snapshot, SnapshotPolicy
from ckpt.snapshot._restore import restore_from_snapshot
from ckpt.snapshot._shm import (
    PERSIST_NAME,
    TABLE_NAME,
    SharedMemoryBuffers,
    SharedSnapshot,
    job_id,
    read_table,
    write_table,
)

__all__ = ["CheckpointHook", "RNGState", "AgentUnavailableError"]

log = logging.getLogger("ckpt.hook")

# engine slots: the latest snapshot (pinned, in the table), one being filled, one more so the next
# can start while the agent still copies one handed over for persisting; under
# torch.distributed one more: the previous snapshot stays pinned too (ranks restore the newest
# step every rank holds, and ranks die up to a step apart)
_SLOTS = {False: 3, True: 4}
_TABLE_SLOTS = {False: 1, True: 2}  # slots the table names, which a restarted trainer keeps off


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



class CheckpointHook:
    """Per-step lazy snapshots into the agent's shared memory, periodic persistence, restore.

    Args:
        state: the training state (modules, optimizers, schedulers, objects with
            ``state_dict``/``load_state_dict``, nested dicts of tensors and plain values).
        storage: URL or path of the persistent checkpoints (written by the agents).
        run_dir: the local directory shared with the agent (default: a directory under the
            system temp dir derived from ``storage``).
        snapshot_every: snapshot every this many steps.
        persist_every: the agents persist snapshots whose step is a multiple of this (0: never);
            the same on every rank.
        rules, layout: this rank's sharding rules and place in the layout: passed to
            ``ckpt.save`` by the agents and to ``ckpt.load`` for a restore from storage.
        rank: this rank (default: ``torch.distributed`` rank or 0).
        grace_s: how long the agent outlives a dead trainer.
        policy: the snapshot engine's policy.
        agent_timeout_s: how long to wait for the agent to start or answer.
        persist_wait_s: how long a persist step waits for the agent to have copied the previous
            one (back-pressure; then that step is not persisted, logged).
        group: the process group of the job (default: the world) for the one-time collectives
            of ``start()`` and ``restore()``.
        store_host: the address other hosts reach rank 0's agent store at (default:
            ``MASTER_ADDR``, else this host's name); used with more than one rank.
        persist_timeout_s: how long one agent-side save waits for the slowest agent.
        store_port: the port rank 0's agent hosts that store on (default: a free port outside
            the kernel's ephemeral range, kept when the agent restarts); set it where a
            firewall allows only chosen ports.
        shm_limit: bytes of shared memory this rank's agent may hold for its snapshot slots
            (0: as much as ``/dev/shm`` has). A slot over the limit is refused like a full
            ``/dev/shm``: the snapshot fails, is logged, and training goes on (see ``policy``).
            It applies to an agent the hook starts, not to a running one it reattaches to.

    The constructor only assigns; ``start()`` (called by ``restore``/``step`` or ``with``) starts
    the agent and the engine; with more than one rank it is a collective (every rank calls it).
    ``close()`` is mandatory (or use ``with``).
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
        group: Any = None,
        store_host: Optional[str] = None,
        persist_timeout_s: float = 300.0,
        store_port: int = 0,
        shm_limit: int = 0,
    ) -> None:
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, not {snapshot_every}")
        if persist_every < 0:
            raise ValueError(f"persist_every must be >= 0, not {persist_every}")
        if not 0 <= store_port <= 65535:
            raise ValueError(f"store_port must be a TCP port (1-65535) or 0 for a free one, not {store_port}")
        if shm_limit < 0:
            raise ValueError(f"shm_limit must be >= 0 bytes (0: no limit), not {shm_limit}")
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
        self.group = group
        self.store_host = store_host
        self.persist_timeout_s = persist_timeout_s
        self.shm_limit = shm_limit
        self.full_state = {"state": state, "rng": RNGState()}
        #: counters: agent_restarts, published, restored_from ("memory", "storage" or None),
        #: restored_step
        self.stats: dict[str, Any] = dict(agent_restarts=0, published=0, restored_from=None, restored_step=None)
        self._engine: Optional[SnapshotEngine] = None
        self._buffers: Optional[SharedMemoryBuffers] = None
        self._agent: Optional[AgentClient] = None  # set by start()
        self._comm: Any = None  # the trainers' collectives (start/restore only), None alone
        self._job: dict[str, Any] = {}  # how the agents persist: see _setup_job
        self._store_port = store_port  # the first one asked for; then the one it got
        self._engine_token: Optional[object] = None  # on_complete of an older engine is ignored
        # publication state, owned by the engine's publisher thread (on_complete, under _lock)
        self._lock = threading.Lock()
        self._pins: dict[int, Snapshot] = {}  # step -> pinned snapshot
        self._latest: Optional[dict[str, Any]] = None  # table entry of the latest published
        self._previous: Optional[dict[str, Any]] = None  # and of the one before
        self._persist_step: Optional[int] = None  # the last step handed to the agent to persist
        self._has_dtensors = False
        self._dtensors: tuple[int, dict[str, Any]] = (-1, {})  # (step, DTensor placements)
        self._started = False
        self._closed = False

    # ------------------------------------------------------------ paths
    @property
    def _dir(self) -> Path:
        if self.run_dir is None:
            raise RuntimeError("CheckpointHook is not started")
        return Path(self.run_dir)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> CheckpointHook:
        """Write this trainer's pid file and make sure the agent runs (idempotent). With more
        than one rank, a collective: agree on the agents' store and the persist settings.

        Raises:
            ValueError: the ranks disagree on ``persist_every``, or ``rank`` is not the
                process group's rank.
            AgentUnavailableError: the agent did not start.
        """
        if self._closed:
            raise RuntimeError("CheckpointHook is closed")
        if self._started:
            return self
        if self.rank is None:
            self.rank = _default_rank(self.group)
        if self.run_dir is None:
            self.run_dir = os.path.join(tempfile.gettempdir(), f"ckpt-run-{job_id(self.storage)}")
        self._dir.mkdir(parents=True, exist_ok=True)
        tmp = self._dir / f".trainer-r{self.rank}.tmp"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, self._dir / f"trainer-r{self.rank}.pid")
        self._agent = AgentClient(self._dir, self.rank, grace_s=self.grace_s, timeout_s=self.agent_timeout_s, persist_url=self.storage, persist_every=self.persist_every, shm_limit=self.shm_limit)
        self._ensure_agent()
        self._setup_job()
        self._started = True
        return self

    def _setup_job(self) -> None:
        """Agree (one collective under ``torch.distributed``) on what the agents need to persist
        together: the world size, a token naming this incarnation of the job, and the address
        of the ``TCPStore`` that rank 0's agent hosts."""
        from ckpt._comm import default_comm
        from ckpt._sharding import resolve_rules

        comm = default_comm(self.group)
        world = comm.world_size
        if world > 1 and comm.rank != self.rank:
            raise ValueError(f"rank={self.rank} but this process is rank {comm.rank} of its process group; leave rank unset")
        self._comm = comm if world > 1 else None
        rules = resolve_rules(self.rules)
        job: dict[str, Any] = {
            "world_size": world,
            "rank": self.rank,
            "token": secrets.token_hex(8),
            "store": None,
            "layout": None if self.layout is None else self.layout.to_json(),
            "rules": None if rules is None else rules.to_json(),
            # per rank under torch.distributed; with rules, also alone (no rule need cover them)
            "rank_local": ["rng"] if world > 1 or rules is not None else [],
            "timeout_s": self.persist_timeout_s,
        }
        if self._comm is not None:
            every = self._comm.all_gather_json(self.persist_every)
            if len(set(every)) > 1:
                raise ValueError(f"persist_every differs between ranks ({every}); the agents persist together: pass the same value on every rank")
            shared: dict[str, Any] = {"token": job["token"], "store": None, "error": None}
            if self.rank == 0 and self.persist_every:
                try:
                    shared["store"] = [self._store_host(), self._open_agent_store()]
                except (OSError, ValueError, AgentUnavailableError) as e:  # persists fail, training goes on
                    shared["error"] = repr(e)
            shared = self._comm.broadcast_json(shared if self.rank == 0 else None, src=0)
            if shared["error"]:
                log.error("rank %s: rank 0's agent could not open the store the agents persist through (%s); nothing will be persisted", self.rank, shared["error"])
            job.update(token=shared["token"], store=shared["store"])
        self._job = job
        try:  # the agent abandons saves of an earlier incarnation that other agents never got
            self._request({"op": "job", "token": job["token"]}, timeout=self.agent_timeout_s)
        except (OSError, ValueError, AgentUnavailableError) as e:
            log.warning("rank %s: agent did not take the job token: %r", self.rank, e)
        self._has_dtensors = bool(self.persist_every) and bool(self._dtensor_json())

    def _dtensor_json(self) -> dict[str, Any]:
        """Where each DTensor's local shard lies (``{}``: none, or the state cannot be flattened:
        logged; the snapshot raises that error where it belongs)."""
        try:
            from ckpt._hook_load import dtensor_json

            return dtensor_json(self.full_state)
        except Exception as e:
            log.warning("rank %s: cannot list the state's DTensors: %r", self.rank, e)
            return {}

    def _store_host(self) -> str:
        return self.store_host or os.environ.get("MASTER_ADDR") or socket.gethostname()

    def _open_agent_store(self) -> int:
        """Rank 0: have the agent host the agents' ``TCPStore`` (on the port it used before, if
        any: the other agents know that one); return its port."""
        self._store_port = int(self._request({"op": "store", "host": self._store_host(), "port": self._store_port})["port"])
        return self._store_port

    def __enter__(self) -> CheckpointHook:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish the snapshot in flight (it is published when complete), stop the engine. The
        agent keeps the snapshots for ``grace_s`` after this process exits. Idempotent."""
        if self._closed:
            return
        try:
            if self._engine is not None:
                try:
                    self._engine.wait()
                except Exception:
                    log.exception("rank %s: last snapshot failed at close", self.rank)
        finally:
            with self._lock:
                self._closed = True
            if self._engine is not None:
                self._engine.close()
            self._release_all()
            if self._agent is not None:
                self._agent.forget_exited()

    def _release_all(self) -> None:
        with self._lock:
            pins, self._pins = list(self._pins.values()), {}
            self._latest = self._previous = None
            self._persist_step = None
        for snap in pins:
            snap.release()

    # ------------------------------------------------------------ agent
    @property
    def _client(self) -> AgentClient:
        if self._agent is None:
            raise RuntimeError("CheckpointHook is not started")
        return self._agent

    def _request(self, req: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        return self._client.request(req, timeout=timeout)

    def agent_pid(self, timeout: float = 2.0) -> Optional[int]:
        """The pid of the live agent answering on this rank's channel, or None."""
        return None if self._agent is None else self._agent.ping(timeout)

    def _ensure_agent(self) -> None:
        if self._client.ensure() and self._started:
            self.stats["agent_restarts"] += 1
            log.warning("rank %s: agent was gone; started a new one (restart %d)", self.rank, self.stats["agent_restarts"])

    def _alloc(self, slot: int, nbytes: int) -> str:
        # on the copier thread: a failure is latched by the engine; the next step() restarts a
        # dead agent (and the engine with it)
        return self._client.alloc(slot, nbytes)

    # ------------------------------------------------------------ restore
    def _memory_entries(self) -> dict[int, dict[str, Any]]:
        """Complete snapshots this rank's live agent holds, by step (latest and the one before)."""
        entry = read_table(self._dir, TABLE_NAME)
        if entry is None or self._client.live() is None:
            return {}
        out = {entry["step"]: entry}
        prev = entry.get("previous")
        if isinstance(prev, dict) and isinstance(prev.get("step"), int) and prev["step"] < entry["step"]:
            out[prev["step"]] = prev
        return out

    def restore(self) -> int:
        """Restore the newest state available, cheapest source first; return the step to start
        at (restored step + 1, or 0 when there is nothing to restore). With more than one rank
        a collective: every rank restores the same step (the newest every rank holds in its
        agent's memory, else the latest committed one).

        Raises:
            StateMismatchError: the source does not fit the state.
        """
        self.start()
        entries = self._memory_entries()
        steps = set(entries)
        if self._comm is not None:
            for other in self._comm.all_gather_json(sorted(steps)):
                steps &= set(other)
        ok, step = False, max(steps) if steps else None
        log.info("rank %s: snapshots in agent memory: steps %s; restoring %s", self.rank, sorted(entries), "step %d" % step if step is not None else "from storage")
        if step is not None:
            try:
                with SharedSnapshot(entries[step]) as snap:
                    restore_from_snapshot(self.full_state, snap)  # verifies checksums
                ok = True
            except (FileNotFoundError, ValueError) as e:
                log.warning("rank %s: snapshot of step %d in memory unusable (%r); trying storage", self.rank, step, e)
        if self._comm is not None:
            ok = all(self._comm.all_gather_json(ok))
        if ok and step is not None:
            self.stats.update(restored_from="memory", restored_step=step)
            with self._lock:  # the restored slot stays intact (the engine keeps off it)
                self._previous = {k: v for k, v in entries[step].items() if k != "previous"}
            log.info("rank %s: restored step %d from agent memory", self.rank, step)
            return step + 1
        from ckpt.errors import CheckpointNotFoundError

        try:
            result = self._load_storage()
        except CheckpointNotFoundError:
            return 0
        self.stats.update(restored_from="storage", restored_step=result.step)
        log.info("rank %s: restored step %d from %s", self.rank, result.step, self.storage)
        return result.step + 1

    def _load_storage(self) -> Any:
        """``ckpt.load`` the latest committed step into the state (see ``_hook_load``)."""
        from ckpt._hook_load import load_hook_state

        return load_hook_state(self.state, self.full_state["rng"], self.storage, layout=self.layout, rules=self.rules, comm=self._comm, rank=self.rank or 0)

    # ------------------------------------------------------------ snapshots
    def _ensure_engine(self) -> SnapshotEngine:
        if self._engine is None:
            self.start()
            entry = read_table(self._dir, TABLE_NAME) or {}
            prev = entry.get("previous") if isinstance(entry.get("previous"), dict) else {}
            avoid = {entry.get("slot"), prev.get("slot")}
            multi = self._comm is not None
            owner = [s for s in range(_SLOTS[multi] + _TABLE_SLOTS[multi]) if s not in avoid][: _SLOTS[multi]]
            self._buffers = SharedMemoryBuffers(self._alloc, dict(enumerate(owner)))
            token = object()
            self._engine_token = token
            self._engine = SnapshotEngine(
                self.full_state, buffers=self._buffers, policy=self.policy, slots=_SLOTS[multi], on_complete=lambda snap: self._on_complete(snap, token)
            ).start()
            for obj in _walk(self.state):
                if isinstance(obj, torch.optim.Optimizer):
                    self._engine.register_guard(obj)
        return self._engine

    def step(self, step: int) -> bool:
        """Call after the optimizer step of ``step``: snapshot this step lazily (every
        ``snapshot_every`` steps); it is published when its copy completes. Returns True when a
        snapshot was taken. Never raises for a snapshot failure unless the policy's
        ``max_failures`` consecutive snapshots failed."""
        engine = self._ensure_engine()
        if step % self.snapshot_every:
            return False
        if self._agent_dead():
            # its segments died with it: a new agent, a new engine with new slots
            self._reset_engine()
            self._ensure_agent()
            if self.rank == 0 and self._job.get("store"):
                try:
                    self._open_agent_store()
                except (OSError, ValueError, AgentUnavailableError) as e:
                    log.error("rank 0: the restarted agent could not open the agents' store: %r", e)
            engine = self._ensure_engine()
        if self._has_dtensors and self.persist_every and step % self.persist_every == 0:
            # where each DTensor's local shard lies (the optimizer's appear at its first step)
            self._dtensors = (step, self._dtensor_json())
        return engine.snapshot(step)

    def _agent_dead(self) -> bool:
        return self._agent is not None and self._agent.dead()

    def _reset_engine(self) -> None:
        engine, self._engine = self._engine, None
        self._engine_token = None
        if engine is not None:
            try:
                engine.wait()
            except Exception as e:  # latched copier error: the old slots are gone anyway
                log.warning("rank %s: snapshot in flight lost with the agent: %r", self.rank, e)
            engine.close()
        self._release_all()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until the snapshots in flight are complete and published; re-raise a latched
        snapshot error (once)."""
        if self._engine is not None:
            self._engine.wait(timeout)  # on_complete (publishing) runs before a job is finished

    # ------------------------------------------------------------ publishing (the engine's publisher thread)
    def _on_complete(self, snap: Snapshot, token: object) -> None:
        """The engine's ``on_complete``: publish ``snap`` (we own its pin) at once."""
        try:
            with self._lock:
                if self._closed or token is not self._engine_token:
                    snap.release()
                    return
                self._publish_locked(snap)
        except Exception:
            log.exception("rank %s: publishing the snapshot of step %d failed", self.rank, snap.step)
            with self._lock:
                if self._pins.get(snap.step) is not snap:
                    snap.release()

    def _publish_locked(self, snap: Snapshot) -> None:
        assert self._buffers is not None
        if self._latest is not None and snap.step <= self._latest["step"]:
            snap.release()
            return
        entry = _entry(snap, self._buffers)
        prev = (self._latest or self._previous) if self._comm is not None else None
        if prev is not None:
            entry["previous"] = prev
        write_table(self._dir, entry, TABLE_NAME)  # the commit of this snapshot
        self._pins[snap.step] = snap
        self._previous = prev
        self._latest = {k: v for k, v in entry.items() if k != "previous"}
        self.stats["published"] += 1
        if self.persist_every and snap.step % self.persist_every == 0:
            if self._wait_persist_ack():
                step, placed = self._dtensors
                job = dict(self._job, dtensors=placed) if step == snap.step and placed else self._job
                write_table(self._dir, dict(entry, job=job), PERSIST_NAME)
                self._persist_step = snap.step
                self._notify_persist()
            else:
                log.warning("rank %s: agent still copying step %s; step %d not persisted", self.rank, self._persist_step, snap.step)
        keep = {self._latest["step"]}
        if self._previous is not None:
            keep.add(self._previous["step"])
        if self._persist_step is not None and not self._acked(self._persist_step) and not self._agent_dead():
            keep.add(self._persist_step)  # kept from reuse until the agent copied it
        for step in [s for s in self._pins if s not in keep]:
            self._pins.pop(step).release()

    def _notify_persist(self) -> None:
        """Tell the agent a snapshot to persist is waiting, without waiting for it: it copies
        the snapshot and then writes ``persist-ack-rR``, which keeps the slot pinned until then
        (a slow or stopped agent must not hold up publishing)."""
        try:
            self._client.send({"op": "persist"}, timeout=min(5.0, self.persist_wait_s))
        except OSError as e:
            log.warning("rank %s: agent did not take the snapshot to persist: %r", self.rank, e)

    def _wait_persist_ack(self) -> bool:
        """Back-pressure: True once the agent has copied the previous snapshot handed to it for
        persisting (waiting at most ``persist_wait_s``; False then, and this one is skipped)."""
        if self._persist_step is None:
            return True
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.persist_wait_s:
            if self._acked(self._persist_step) or self._agent_dead():
                return True
            time.sleep(0.005)
        log.warning("rank %s: agent has not copied step %d after %.1f s", self.rank, self._persist_step, self.persist_wait_s)
        return False

    def _acked(self, step: int) -> bool:
        """The agent has copied ``step`` of this incarnation (``persist-ack-rR``: step, token)."""
        try:
            parts = (self._dir / f"persist-ack-r{self.rank}").read_text().split()
            return int(parts[0]) >= step and parts[1:] == [self._job.get("token")]
        except (OSError, ValueError, IndexError):
            return False

    @property
    def memory_bytes(self) -> int:
        """Bytes of shared memory this rank's snapshots hold."""
        return 0 if self._buffers is None else self._buffers.memory_bytes


def _default_rank(group: Any = None) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(group)
    return 0


def _entry(snap: Snapshot, buffers: SharedMemoryBuffers) -> dict[str, Any]:
    from ckpt.snapshot._shm import snapshot_entry

    return snapshot_entry(snap, buffers)
