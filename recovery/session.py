"""A member's session with the coordinator: register, heartbeat, and re-register on its own.

Agents (and tools) hold one ``MemberSession`` per rank. ``start()`` registers and starts a
background heartbeat thread; when the coordinator says the member must re-register (it was
restarted, or it declared this generation failed and fenced it) or cannot be reached, the
session keeps trying with a bounded backoff and registers again, getting a new generation.
Every call has a deadline. The constructor only assigns.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

import grpc

from ckpt.layout import Layout
from recovery import wire
from recovery._proto import coordinator_pb2 as pb
from recovery._proto import coordinator_pb2_grpc as pb_grpc

__all__ = ["MemberSession"]

log = logging.getLogger(__name__)

#: Answers after which the member registers again.
_REREGISTER = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
#: Answers after which the member waits and retries (the coordinator is down or restarting).
_RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class MemberSession:
    """Register a rank with the coordinator at ``address`` and keep it alive.

    Args:
        address: ``host:port`` of the coordinator.
        job, rank, node, agent_address: who this member is.
        layout: the job's layout with this member's rank.
        token: the shared token, if the coordinator requires one.
        credentials: gRPC channel credentials for TLS (``None``: plaintext).
        interval_s: heartbeat interval.
        deadline_s: deadline of every call.
        max_backoff_s: longest wait between attempts while the coordinator is unreachable.
        on_registered: called with each new generation (e.g. to re-report held snapshots).
    """

    def __init__(
        self,
        address: str,
        *,
        job: str,
        rank: int,
        node: str,
        agent_address: str,
        layout: Layout,
        token: Optional[str] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        interval_s: float = 0.5,
        deadline_s: float = 5.0,
        max_backoff_s: float = 2.0,
        on_registered: Optional[Callable[[int], None]] = None,
    ) -> None:
        self.address, self.job, self.rank, self.node = address, job, rank, node
        self.agent_address, self.layout = agent_address, layout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials = credentials
        self.interval_s, self.deadline_s, self.max_backoff_s = interval_s, deadline_s, max_backoff_s
        self._on_registered = on_registered
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._channel: Optional[grpc.Channel] = None
        self._stub: Optional[pb_grpc.CoordinatorStub] = None
        self.generation = 0
        self.registrations = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> int:
        """Connect, register (retrying while the coordinator is unreachable, up to ``deadline_s``
        per attempt), start heartbeating; returns the generation."""
        target = self.address
        self._channel = (grpc.secure_channel(target, self._credentials) if self._credentials
                         else grpc.insecure_channel(target))
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._register_until_done()
        self._thread = threading.Thread(target=self._loop, name=f"ckpt-member-r{self.rank}", daemon=True)
        self._thread.start()
        return self.generation

    def close(self) -> None:
        """Stop heartbeating and close the channel (the coordinator then times the member out)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.deadline_s + self.interval_s + 5)
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> "MemberSession":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------
    def _register(self) -> int:
        req = pb.RegisterRequest(
            job=self.job, rank=self.rank, node=self.node, agent_address=self.agent_address,
            layout=wire.layout_to_pb(self.layout, with_coords=True), generation=self.generation,
        )
        gen = self._stub.Register(req, timeout=self.deadline_s, metadata=self._metadata).generation  # type: ignore[union-attr]
        self.generation, self.registrations = gen, self.registrations + 1
        log.info("rank %d of job %s registered with generation %d", self.rank, self.job, gen)
        if self._on_registered is not None:
            self._on_registered(gen)
        return gen

    def _register_until_done(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                self._register()
                return
            except grpc.RpcError as e:
                if e.code() not in _RETRY:
                    raise
                log.warning("rank %d: coordinator %s unreachable (%s); retrying", self.rank, self.address, e.code().name)
            self._stop.wait(backoff)
            backoff = min(self.max_backoff_s, backoff * 2)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._stub.Heartbeat(  # type: ignore[union-attr]
                    pb.HeartbeatRequest(member=pb.MemberId(job=self.job, rank=self.rank, generation=self.generation)),
                    timeout=self.deadline_s, metadata=self._metadata,
                )
            except grpc.RpcError as e:
                if e.code() in _REREGISTER or e.code() in _RETRY:
                    log.warning("rank %d: heartbeat refused (%s: %s); registering again",
                                self.rank, e.code().name, e.details())
                    try:
                        self._register_until_done()
                    except grpc.RpcError:
                        log.exception("rank %d: registering again failed", self.rank)
                else:
                    log.error("rank %d: heartbeat failed: %s %s", self.rank, e.code().name, e.details())
            except Exception:  # the heartbeat thread must not die
                log.exception("rank %d: heartbeat loop error", self.rank)
