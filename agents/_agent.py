"""The per-rank agent: owns the shared-memory snapshot slots of one trainer rank.

It creates the segments the trainer's hook asks for (over a Unix socket in the run directory,
JSON lines), keeps them while the trainer dies and restarts, persists every ``persist_every``-th
complete snapshot (read from the slot table) with ``ckpt.save`` in a background thread, and exits
when its trainer has been gone for longer than the grace period, unlinking every segment it made.

Under ``torch.distributed`` the agents of all ranks persist together, as one checkpoint of the
job, without the trainers: the persist entry carries the job's settings (``"job"``: world size,
a token naming the trainers' incarnation, layout, rules, rank-local keys, the timeout, and the
address of a ``TCPStore`` that rank 0's agent hosts, opened at the hook's ``store`` request).
Each agent runs ``ckpt.save(..., comm=StoreComm(store, rank, world, "ckpt-persist/<token>/<step>"))``;
an agent that never gets that step makes the others time out (logged, nothing committed), and
the next persist uses fresh keys. A client reconnects when the store's host (agent 0) restarted.

Files in the run directory (rank R): ``agent-rR.sock`` (the channel), ``agent-rR.pid`` (written
once the channel listens), ``trainer-rR.pid`` (written by the hook), ``slots.json`` (slot table,
written by the hook; see ``ckpt.snapshot._shm``).
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from agents._ports import pick_store_port
from ckpt.snapshot._shm import PERSIST_NAME, TABLE_NAME, SharedMemoryFullError, SharedSnapshot, create_segment, pid_alive, read_pid, read_table, segment_prefix

__all__ = ["AgentConfig", "Agent", "pid_alive"]

log = logging.getLogger("agents")

_MAX_LINE = 1 << 16
_MAX_SLOTS = 16


@dataclass(frozen=True)
class AgentConfig:
    """Args of one agent (see ``python -m agents --help``)."""

    run_dir: str
    rank: int = 0
    grace_s: float = 30.0
    persist_url: Optional[str] = None
    persist_every: int = 0
    poll_s: float = 0.05
    shm_limit: int = 0  # bytes of shared memory all slots together may hold (0: what /dev/shm has)


def decode_tree(node: Any, tensors: dict[str, Any]) -> Any:
    """Rebuild a plain nested state from a flattened tree, tensors taken from ``tensors``; saving
    it with ``ckpt.save`` gives the same tree and tensor names as saving the original state."""
    import base64

    if isinstance(node, list):
        return [decode_tree(x, tensors) for x in node]
    if isinstance(node, dict):
        ((tag, val),) = node.items()
        if tag == "$tensor":
            return tensors[val]
        if tag == "$ndarray":
            return tensors[val].numpy()
        if tag == "$float":
            return float(val)
        if tag == "$tuple":
            return tuple(decode_tree(x, tensors) for x in val)
        if tag == "$bytes":
            return base64.b64decode(val)
        if tag == "$dict":
            return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in val}
        raise ValueError(f"snapshot tree tag {tag!r} is not supported by the agent's persister")
    return node


def _dtensor_rules(rules: Any, dtensors: Any) -> Any:
    """``rules`` (or identity mappings) for the plain tensors, the recorded placements for the
    tensors that were DTensors' local shards in the trainer (``{name: DTensorInfo as JSON}``)."""
    from dataclasses import dataclass

    from ckpt.mapping import TensorMapping
    from ckpt.rules import Rules, mapping_from_placements

    if not isinstance(dtensors, dict):
        raise ValueError("persist entry: 'dtensors' must be an object {name: placement info}")

    @dataclass(frozen=True)
    class _DTensorRules(Rules):
        placed: tuple = ()
        inner: Any = None

        def resolve(self, local: Any, layout: Any, *, global_shapes: Any = None) -> dict[str, Any]:
            placed = dict(self.placed)
            out = {
                n: mapping_from_placements(n, s, info["global_shape"], layout, info["mesh_axes"], [tuple(p) for p in info["placements"]])
                for n, s in local.items()
                if (info := placed.get(n)) is not None
            }
            rest = {n: s for n, s in local.items() if n not in placed}
            if self.inner is not None:
                out.update(self.inner.resolve(rest, layout, global_shapes=global_shapes))
            else:
                out.update({n: TensorMapping.identity(n, tuple(s)) for n, s in rest.items()})
            return {n: out[n] for n in local}

        def to_json(self) -> Any:  # recorded in the manifest: the user's rules, if any
            return None if self.inner is None else self.inner.to_json()

    name = rules.name if rules is not None else "dtensors"
    return _DTensorRules(name=name, placed=tuple(dtensors.items()), inner=rules)


def _warm_up() -> None:
    try:
        import ckpt  # noqa: F401  (torch, codecs, the save path)
        import ckpt.codecs  # noqa: F401
    except Exception:  # imported again (and failing loudly) when persisting
        log.exception("warm-up import failed")


class Agent:
    """One rank's agent. ``serve()`` runs until the trainer is gone for ``grace_s`` or SIGTERM."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.sock_path = self.dir / f"agent-r{cfg.rank}.sock"
        self.pid_path = self.dir / f"agent-r{cfg.rank}.pid"
        self.trainer_pid_path = self.dir / f"trainer-r{cfg.rank}.pid"
        self.ack_path = self.dir / f"persist-ack-r{cfg.rank}"
        self.prefix = segment_prefix(cfg.run_dir, cfg.rank)
        self._segs: dict[int, Any] = {}
        self._gen = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: Optional[socket.socket] = None
        self._persist_thread: Optional[threading.Thread] = None
        self._persist_lock = threading.Lock()
        self._pending: queue.Queue = queue.Queue(maxsize=2)  # copied snapshots waiting to be saved
        self._persisted = -1
        self._persisting = -1
        self._token: Optional[str] = None  # the job token of the last snapshot taken to persist
        self._job_token: Optional[str] = None  # the token of the trainer's current incarnation
        self._store: Any = None  # rank 0: the TCPStore server the agents persist through
        self._client: Any = None  # other ranks: a client of it
        self._client_addr: Optional[tuple[str, int]] = None
        self._stale_keys: tuple[str, ...] = ()  # own keys of the last save, deleted by the next
        self._last_comm: Any = None

    # ------------------------------------------------------------ slots
    def alloc(self, slot: int, nbytes: int) -> str:
        if not (0 <= slot < _MAX_SLOTS) or nbytes < 0:
            raise ValueError(f"bad slot request: slot {slot}, {nbytes} bytes")
        with self._lock:
            seg = self._segs.get(slot)
            if seg is not None and seg.size >= nbytes:
                return seg.name
            self._check_limit(slot, nbytes)
            if seg is not None:
                self._segs.pop(slot)
                try:
                    seg.close()
                except BufferError:
                    pass
                seg.unlink()
            self._gen += 1
            seg = create_segment(f"{self.prefix}s{slot}-g{self._gen}", nbytes)
            self._segs[slot] = seg
            log.info("rank %d: slot %d is segment %s (%d bytes)", self.cfg.rank, slot, seg.name, seg.size)
            return seg.name

    def _check_limit(self, slot: int, nbytes: int) -> None:
        """Refuse a slot that would take the agent's segments past ``shm_limit`` (the slot's old
        segment, replaced by the new one, does not count)."""
        limit = self.cfg.shm_limit
        if not limit:
            return
        size = max(1, (nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE)
        others = sum(s.size for k, s in self._segs.items() if k != slot)
        if others + size > limit:
            mib = 2**20
            raise SharedMemoryFullError(
                errno.ENOSPC,
                f"snapshot slot {slot} needs {size / mib:.1f} MiB, but this agent may hold {limit / mib:.1f} MiB of shared "
                f"memory and its other slots hold {others / mib:.1f} MiB: raise the hook's shm_limit (--shm-limit) or "
                "snapshot less state",
            )

    def _unlink_all(self) -> None:
        with self._lock:
            segs, self._segs = list(self._segs.values()), {}
        for seg in segs:
            try:
                seg.close()
            except BufferError:
                pass
            try:
                seg.unlink()
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------ channel
    def _handle(self, conn: socket.socket) -> None:
        try:
            self._serve_conn(conn)
        except OSError as e:  # the trainer died mid-request (SIGKILL): nothing to answer
            log.debug("rank %d: channel closed: %r", self.cfg.rank, e)

    def _serve_conn(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30.0)
            f = conn.makefile("rwb")
            for line in f:
                if len(line) > _MAX_LINE:
                    break
                try:
                    req = json.loads(line)
                    op = req.get("op")
                    if op == "ping":
                        resp = {"ok": True, "pid": os.getpid()}
                    elif op == "alloc":
                        resp = {"ok": True, "name": self.alloc(int(req["slot"]), int(req["nbytes"]))}
                    elif op == "job":  # a trainer (re)started: saves of older incarnations are moot
                        self._job_token = str(req["token"])
                        resp = {"ok": True}
                    elif op == "store":  # rank 0: host the agents' store
                        resp = {"ok": True, "port": self.open_store(str(req.get("host", "127.0.0.1")), int(req.get("port", 0)))}
                    elif op == "persist":  # persist.json was just written: copy it now
                        self._maybe_persist()
                        resp = {"ok": True, "acked": self._persisting}
                    elif op == "status":
                        resp = {"ok": True, "persisted": self._persisted, "slots": {str(k): v.name for k, v in self._segs.items()}}
                    else:
                        resp = {"ok": False, "error": f"unknown op {op!r}"}
                except Exception as e:  # answer, never die on a bad request
                    resp = {"ok": False, "error": repr(e)}
                f.write(json.dumps(resp).encode() + b"\n")
                f.flush()

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    # ------------------------------------------------------------ persisting
    def _maybe_persist(self) -> None:
        with self._persist_lock:
            self._maybe_persist_locked()

    def _maybe_persist_locked(self) -> None:
        cfg = self.cfg
        if not cfg.persist_url or cfg.persist_every <= 0:
            return
        if self._pending.full():
            return  # the hook keeps the slot pinned until we copied it
        entry = read_table(self.dir, PERSIST_NAME)
        if entry is None or entry["step"] % cfg.persist_every:
            return
        token = (entry.get("job") or {}).get("token")
        if token == self._token and entry["step"] <= max(self._persisted, self._persisting):
            return  # taken already (a new token: restarted trainers, steps start over)
        with self._lock:
            seg = self._segs.get(entry["slot"])
        if seg is None:
            return
        try:
            with SharedSnapshot(entry, segment=seg) as snap:
                # a private copy: the trainer may reuse the slot once a newer entry is published
                copies = {n: b.copy() for n, b in snap.buffers.items()}
                snap.buffers = copies
                bad = snap.verify()
                if bad:
                    log.warning("rank %d: step %d changed while copied for persisting (%s); skipped", cfg.rank, entry["step"], bad[:3])
                    self._persisting, self._token = entry["step"], token
                    self._ack(entry["step"], token)
                    return
                tensors = {n: snap.tensor(n) for n in copies}
            self._ack(entry["step"], token)
        except (FileNotFoundError, ValueError) as e:
            log.warning("rank %d: cannot read step %d: %r", cfg.rank, entry["step"], e)
            return
        self._persisting, self._token = entry["step"], token
        self._pending.put((entry, tensors))

    def _ack(self, step: int, token: Optional[str]) -> None:
        """Tell the hook the bytes of ``step`` are copied (it may reuse that slot now)."""
        tmp = self.ack_path.with_suffix(".tmp")
        tmp.write_text(f"{step} {token}" if token else str(step))
        os.replace(tmp, self.ack_path)

    def _persist_loop(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            self._persist(*item)

    def _persist(self, entry: dict[str, Any], tensors: dict[str, Any]) -> None:
        import ckpt

        step, job = entry["step"], entry.get("job") or {}
        try:
            state = decode_tree(entry["tree"], tensors)
            ckpt.save(state, self.cfg.persist_url, step=step, **self._save_args(job, step))
            self._persisted = step
            log.info("rank %d: persisted step %d to %s", self.cfg.rank, step, self.cfg.persist_url)
        except Exception:  # a failed save is logged (and, with a comm, failed on every agent)
            log.exception("rank %d: persisting step %d failed; nothing committed for it", self.cfg.rank, step)
        finally:
            if self._last_comm is not None:
                self._stale_keys, self._last_comm = self._last_comm.leftover_keys(), None

    def _save_args(self, job: dict[str, Any], step: int) -> dict[str, Any]:
        """``ckpt.save`` keyword arguments from the persist entry's job settings."""
        from ckpt._comm import LocalComm, StoreComm
        from ckpt.layout import Layout, parse_layout
        from ckpt.rules import Rules

        world = job.get("world_size", 1)
        if type(world) is not int or world < 1:
            raise ValueError(f"persist entry: bad world_size {world!r}")
        if world > 1 and job.get("rank") != self.cfg.rank:
            raise ValueError(f"persist entry is for rank {job.get('rank')}, this agent serves rank {self.cfg.rank}")
        args: dict[str, Any] = {}
        if job.get("layout") is not None:
            args["layout"] = parse_layout(job["layout"], rank=self.cfg.rank, where="persist entry layout")
        if job.get("rules") is not None:
            args["rules"] = Rules.from_json(job["rules"])
        if job.get("dtensors"):  # the snapshot holds their local shards as plain tensors
            args["rules"] = _dtensor_rules(args.get("rules"), job["dtensors"])
            if "layout" not in args and world > 1:
                args["layout"] = Layout.grid(dp=world, rank=self.cfg.rank)
        if world == 1:
            args["comm"] = LocalComm()
            return args
        timeout = timedelta(seconds=float(job.get("timeout_s", 300.0)))
        store = self._store_for(job, timeout)
        token = job.get("token")
        store.set(f"ckpt-persist/{token}/started/{self.cfg.rank}", str(step))  # see _abandon

        def abandon(missing: list[int]) -> Optional[str]:
            return self._abandon(store, token, step, missing)

        comm = StoreComm(store, self.cfg.rank, world, f"ckpt-persist/{token}/{step}", timeout, stale=self._stale_keys, should_abort=abandon)
        self._stale_keys = ()
        self._last_comm = comm
        args.update(comm=comm, rank_local=tuple(str(k) for k in job.get("rank_local", ())))
        return args

    def _abandon(self, store: Any, token: Any, step: int, missing: list[int]) -> Optional[str]:
        """Why a save of ``step`` waiting for ``missing`` ranks cannot complete, or None: this
        rank's trainers restarted (a new job token: the missing ranks' trainers died before
        handing the step over), or a missing rank has started a later save (it skipped this
        step, e.g. under back-pressure)."""
        current = self._job_token or ((read_table(self.dir, PERSIST_NAME) or {}).get("job") or {}).get("token")
        if current is not None and current != token:
            return f"the trainers restarted (job token {current}); rank(s) {missing} never handed over step {step}"
        for r in missing:
            key = f"ckpt-persist/{token}/started/{r}"
            if store.check([key]) and int(store.get(key)) > step:
                return f"rank {r} skipped step {step} (it is saving step {int(store.get(key))})"
        return None

    # ------------------------------------------------------------ the agents' store
    def open_store(self, host: str, port: int) -> int:
        """Rank 0: host the ``TCPStore`` the agents persist through (``port`` 0: a free port
        outside the kernel's ephemeral range, see ``agents._ports``; an open store is kept);
        return its port.

        Raises:
            OSError: ``port`` is taken (the message names it).
        """
        import torch.distributed as dist

        def listen(p: int) -> Any:
            return dist.TCPStore(host, p, None, True, timeout=timedelta(seconds=60), wait_for_workers=False)

        with self._lock:
            if self._store is None:
                if port:
                    try:
                        self._store = listen(port)
                    except (RuntimeError, OSError) as e:  # torch raises DistNetworkError (a RuntimeError)
                        raise OSError(f"cannot host the agents' store on port {port}: {e}; free that port or pass another store_port") from e
                else:
                    for attempt in range(3):  # another process may take a picked port before we bind it
                        try:
                            self._store = listen(pick_store_port())
                            break
                        except (RuntimeError, OSError):
                            if attempt == 2:
                                self._store = listen(0)
                log.info("rank %d: agents' store listening on port %d", self.cfg.rank, self._store.port)
            return int(self._store.port)

    def _store_for(self, job: dict[str, Any], timeout: timedelta) -> Any:
        """The store of the job's agents: rank 0 hosts it, the others connect (again when the
        connection broke, e.g. agent 0 restarted)."""
        import torch.distributed as dist

        addr = job.get("store")
        if not (isinstance(addr, list) and len(addr) == 2 and isinstance(addr[0], str) and type(addr[1]) is int):
            raise ValueError("persist entry names no agents' store: rank 0's agent could not open one (see its hook's log)")
        host, port = addr
        if self.cfg.rank == 0:
            self.open_store(host, port)
            return self._store
        if self._client is not None and self._client_addr == (host, port):
            try:
                self._client.check(["ckpt-persist/ping"])
                return self._client
            except Exception:
                log.warning("rank %d: connection to the agents' store %s:%d broke; reconnecting", self.cfg.rank, host, port)
        self._client, self._client_addr, self._stale_keys = None, None, ()
        self._client = dist.TCPStore(host, port, None, False, timeout=min(timeout, timedelta(seconds=60)), wait_for_workers=False)
        self._client_addr = (host, port)
        return self._client

    # ------------------------------------------------------------ main loop
    def serve(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.sock_path.unlink()
        except FileNotFoundError:
            pass
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.sock_path))
        self._server.listen(16)
        self._server.settimeout(0.2)
        accept = threading.Thread(target=self._accept_loop, name="agent-accept", daemon=True)
        accept.start()
        self._persist_thread = threading.Thread(target=self._persist_loop, name="agent-persist", daemon=True)
        self._persist_thread.start()
        if self.cfg.persist_url and self.cfg.persist_every > 0:
            # import what taking a snapshot to persist needs now, not while the trainer's copier
            # waits for the persist hand-off (seconds on a busy machine)
            threading.Thread(target=_warm_up, name="agent-warm-up", daemon=True).start()
        tmp = self.pid_path.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, self.pid_path)
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        log.info("rank %d: agent %d serving on %s", self.cfg.rank, os.getpid(), self.sock_path)
        gone_since: Optional[float] = None
        try:
            while not self._stop.is_set():
                pid = read_pid(self.trainer_pid_path)
                if pid is not None and pid_alive(pid):
                    gone_since = None
                elif gone_since is None:
                    gone_since = time.monotonic()
                elif time.monotonic() - gone_since > self.cfg.grace_s:
                    log.info("rank %d: trainer gone for %.1f s; exiting", self.cfg.rank, self.cfg.grace_s)
                    break
                self._maybe_persist()
                self._stop.wait(self.cfg.poll_s)
            self._maybe_persist()  # a persist handed over just before the trainer left
        finally:
            self._stop.set()
            self._server.close()
            accept.join(5)
            if self._persist_thread is not None:
                self._pending.put(None)  # after the copies already queued
                self._persist_thread.join(120)
            if read_pid(self.pid_path) == os.getpid():
                for p in (self.pid_path, self.sock_path, self.dir / TABLE_NAME, self.dir / PERSIST_NAME, self.ack_path):
                    try:
                        p.unlink()
                    except FileNotFoundError:
                        pass
            self._unlink_all()
        return 0
