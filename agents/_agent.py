"""The per-rank agent: owns the shared-memory snapshot slots of one trainer rank.

It creates the segments the trainer's hook asks for (over a Unix socket in the run directory,
JSON lines), keeps them while the trainer dies and restarts, persists every ``persist_every``-th
complete snapshot (read from the slot table) with ``ckpt.save`` in a background thread, and exits
when its trainer has been gone for longer than the grace period, unlinking every segment it made.

Files in the run directory (rank R): ``agent-rR.sock`` (the channel), ``agent-rR.pid`` (written
once the channel listens), ``trainer-rR.pid`` (written by the hook), ``slots.json`` (slot table,
written by the hook; see ``ckpt.snapshot._shm``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ckpt.snapshot._shm import PERSIST_NAME, TABLE_NAME, SharedSnapshot, create_segment, pid_alive, read_pid, read_table, segment_prefix

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

    # ------------------------------------------------------------ slots
    def alloc(self, slot: int, nbytes: int) -> str:
        if not (0 <= slot < _MAX_SLOTS) or nbytes < 0:
            raise ValueError(f"bad slot request: slot {slot}, {nbytes} bytes")
        with self._lock:
            seg = self._segs.get(slot)
            if seg is not None and seg.size >= nbytes:
                return seg.name
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
        if entry is None or entry["step"] % cfg.persist_every or entry["step"] <= max(self._persisted, self._persisting):
            return
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
                    self._persisting = entry["step"]
                    self._ack(entry["step"])
                    return
                tensors = {n: snap.tensor(n) for n in copies}
            self._ack(entry["step"])
        except (FileNotFoundError, ValueError) as e:
            log.warning("rank %d: cannot read step %d: %r", cfg.rank, entry["step"], e)
            return
        self._persisting = entry["step"]
        self._pending.put((entry, tensors))

    def _ack(self, step: int) -> None:
        """Tell the hook the bytes of ``step`` are copied (it may reuse that slot now)."""
        tmp = self.ack_path.with_suffix(".tmp")
        tmp.write_text(str(step))
        os.replace(tmp, self.ack_path)

    def _persist_loop(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            self._persist(*item)

    def _persist(self, entry: dict[str, Any], tensors: dict[str, Any]) -> None:
        import ckpt

        try:
            state = decode_tree(entry["tree"], tensors)
            ckpt.save(state, self.cfg.persist_url, step=entry["step"])
            self._persisted = entry["step"]
            log.info("rank %d: persisted step %d to %s", self.cfg.rank, entry["step"], self.cfg.persist_url)
        except Exception:
            log.exception("rank %d: persisting step %d failed", self.cfg.rank, entry["step"])

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
