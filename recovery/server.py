"""The thin gRPC transport of the coordinator: validate and convert (``wire``), call the core
(``recovery.coordinator``), map errors to status codes (``_status``, the one place).

``build_server(bind, ...) -> (server, port)``: bind ``"127.0.0.1:0"`` for an ephemeral port.
The constructor only assigns; ``start()`` opens the port and starts the sweeper thread that
declares silent members failed (at the earliest member deadline, at least every interval); ``stop(grace)`` is graceful.

Security: with ``token`` set, every call except the standard health service must carry
``authorization: Bearer <token>`` metadata (checked in constant time) or is rejected with
UNAUTHENTICATED; with ``tls=(private_key_pem, certificate_chain_pem)`` the port is TLS.

Metrics (``recovery._metrics``) are always recorded; ``metrics_bind="HOST:PORT"`` also serves
them over HTTP from ``start()`` (``server.metrics_port`` is the real port when ``:0`` was asked).
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Optional, Union

import grpc

from recovery import wire
from recovery._metrics import Metrics
from recovery._proto import coordinator_pb2 as pb
from recovery._proto import coordinator_pb2_grpc as pb_grpc
from recovery._proto import health_pb2, health_pb2_grpc
from recovery.coordinator import Coordinator, UnknownJob
from recovery.detector import DEFAULT_INTERVAL, DEFAULT_TIMEOUT, Duration, FailureDetector
from recovery.model import FencedError, InvalidRequest, UnrecoverableError
from recovery.registry import Registry
from recovery.store_sqlite import SqliteStore

__all__ = ["CoordinatorServer", "build_server", "SERVICE_NAME"]

log = logging.getLogger(__name__)
SERVICE_NAME = "ckpt.coordinator.v1.Coordinator"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
#: longest a WatchMembership stream waits before re-checking that the client is still there
_WATCH_POLL_S = 0.5

#: error type -> (status code, what to tell the caller)
_STATUS: list[tuple[type, grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (FencedError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownJob, grpc.StatusCode.NOT_FOUND),
    (UnrecoverableError, grpc.StatusCode.FAILED_PRECONDITION),
]


def _status(fn: Callable) -> Callable:
    """Map the core's errors to gRPC status codes (the one place that does)."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        t0, code = time.perf_counter(), "OK"
        try:
            return fn(self, request, context)
        except Exception as e:  # noqa: BLE001 - mapped to a status, never swallowed
            for kind, status in _STATUS:
                if isinstance(e, kind):
                    code = status.name
                    context.abort(status, str(e)[:4000])
            code = "INTERNAL"
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {fn.__name__}: {type(e).__name__}")
        finally:
            self.metrics.rpc_latency.labels(fn.__name__, code).observe(time.perf_counter() - t0)

    return wrapper


class _Servicer(pb_grpc.CoordinatorServicer):
    def __init__(self, core: Coordinator, clock: Callable[[], float], stopping: threading.Event,
                 metrics: Metrics) -> None:
        self.core, self.clock, self.stopping, self.metrics = core, clock, stopping, metrics

    @_status
    def Register(self, request, context):
        member = wire.member_from_pb(request)
        gen = self.core.register(member, self.clock())
        self.metrics.registrations.labels(member.job).inc()
        d = self.core.detector
        return pb.RegisterResponse(generation=gen, heartbeat_interval_ms=int(d.interval * 1000),
                                   heartbeat_timeout_ms=int(d.timeout * 1000))

    @_status
    def Heartbeat(self, request, context):
        return pb.HeartbeatResponse(generation=self.core.heartbeat(wire.heartbeat_from_pb(request), self.clock()))

    @_status
    def ReportSnapshot(self, request, context):
        report = wire.snapshot_from_pb(request)
        latest = self.core.report_snapshot(report, self.clock())
        self.metrics.observe_latest(report.job, latest.recoverable, latest.committed)
        return pb.ReportSnapshotResponse(has_recoverable=latest.recoverable is not None,
                                         latest_recoverable_step=latest.recoverable or 0)

    @_status
    def ReportCommitted(self, request, context):
        commit = wire.commit_from_pb(request)
        self.core.report_committed(commit, self.clock())
        self.metrics.observe_latest(commit.job, None, self.core.latest(commit.job).committed)
        return pb.ReportCommittedResponse()

    @_status
    def GetLatestSteps(self, request, context):
        job = wire.parse_job(request.job)
        return wire.latest_to_pb(self.core.latest(job))

    @_status
    def GetRestorePlan(self, request, context):
        req = wire.plan_request_from_pb(request)
        targets = wire.targets_from_pb(request, req.target_layout.world_size)
        return wire.plan_to_pb(self.core.plan(req, targets))

    @_status
    def WatchMembership(self, request, context):
        return self._watch(wire.parse_job(request.job), request.after_sequence, context)

    def _watch(self, job: str, after: int, context):
        while context.is_active() and not self.stopping.is_set():
            for e in self.core.events(job, after, _WATCH_POLL_S):
                after = e.sequence
                yield wire.event_to_pb(e)


class _Health(health_pb2_grpc.HealthServicer):
    def __init__(self, stopping: threading.Event) -> None:
        self.stopping = stopping

    def _status(self, service: str):
        if service not in ("", SERVICE_NAME):
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        return health_pb2.HealthCheckResponse.NOT_SERVING if self.stopping.is_set() else health_pb2.HealthCheckResponse.SERVING

    def Check(self, request, context):
        status = self._status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, request, context):
        yield health_pb2.HealthCheckResponse(status=self._status(request.service))


class _TokenAuth(grpc.ServerInterceptor):
    """Reject calls without ``authorization: Bearer <token>`` (the health service is open)."""

    def __init__(self, token: str) -> None:
        self._want = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        if details.method.startswith(_HEALTH_PREFIX):
            return continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._want):
            return continuation(details)
        handler = continuation(details)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token: send 'authorization: Bearer <token>'")

        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


class CoordinatorServer:
    """A gRPC coordinator and its failure sweeper (``start``/``stop``)."""

    def __init__(self, server: grpc.Server, core: Coordinator, store: Optional[SqliteStore],
                 clock: Callable[[], float], stopping: threading.Event, metrics: Metrics,
                 metrics_bind: Optional[tuple[str, int]] = None) -> None:
        self.grpc, self.core, self._store, self._clock, self._stopping = server, core, store, clock, stopping
        self.metrics, self._metrics_bind = metrics, metrics_bind
        #: the HTTP metrics port once started (``None``: not served)
        self.metrics_port: Optional[int] = None
        self._sweeper: Optional[threading.Thread] = None

    def start(self) -> "CoordinatorServer":
        if self._metrics_bind is not None:
            self.metrics_port = self.metrics.serve(*self._metrics_bind)
        self.grpc.start()
        self._sweeper = threading.Thread(target=self._sweep, name="ckpt-coordinator-sweeper", daemon=True)
        self._sweeper.start()
        return self

    def _sweep(self) -> None:
        """Sweep at the earliest member deadline, and at least every interval (no drift: a dead
        member is declared failed right after ``timeout``, well inside ``timeout + interval``)."""
        interval = self.core.detector.interval
        while True:
            try:
                deadline = self.core.next_deadline()
                wait = interval if deadline is None else min(interval, max(deadline - self._clock(), 0.001))
            except Exception:  # noqa: BLE001 - fall back to the fixed period, never stop detecting
                log.exception("could not compute the next failure deadline")
                wait = interval
            if self._stopping.wait(wait):
                return
            try:
                for f in self.core.sweep(self._clock()):
                    self.metrics.failures.labels(f.job).inc()
                    self.metrics.detection_latency.observe(f.latency)
            except Exception:  # noqa: BLE001 - a sweep failure must not stop detection
                log.exception("failure sweep failed")

    def stop(self, grace: Optional[float] = 5.0) -> None:
        """Stop accepting calls, let running ones finish within ``grace`` s, close the store."""
        self._stopping.set()
        self.grpc.stop(grace).wait()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        if self._store is not None:
            self._store.close()
        self.metrics.close()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self.grpc.wait_for_termination(timeout)


def build_server(bind: str, *, state_dir: Union[str, Path, None] = None, token: Optional[str] = None,
                 tls: Optional[tuple[bytes, bytes]] = None, interval: Duration = DEFAULT_INTERVAL,
                 timeout: Duration = DEFAULT_TIMEOUT, max_workers: int = 16,
                 clock: Callable[[], float] = time.monotonic,
                 metrics_bind: Optional[str] = None) -> tuple[CoordinatorServer, int]:
    """Build (not start) a coordinator listening on ``bind`` (``host:0`` picks a free port).

    Args:
        state_dir: where the SQLite registry lives; ``None`` keeps it in memory only.
        token: shared secret every non-health call must present.
        tls: ``(private_key_pem, certificate_chain_pem)`` to serve TLS.
        interval, timeout: heartbeat interval and failure timeout.
        metrics_bind: ``"HOST:PORT"`` to serve Prometheus metrics on from ``start()`` (PORT 0
            picks a free one); ``None`` records them without serving.

    Returns:
        ``(server, port)``: call ``server.start()``, later ``server.stop()``.
    """
    store = SqliteStore(state_dir) if state_dir is not None else None
    core = Coordinator(Registry(store), FailureDetector(interval, timeout))
    stopping = threading.Event()
    interceptors = [_TokenAuth(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ckpt-coordinator"),
                         interceptors=interceptors,
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    metrics = Metrics(core.detector.live_count)
    pb_grpc.add_CoordinatorServicer_to_server(_Servicer(core, clock, stopping, metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(_Health(stopping), server)
    if tls is not None:
        port = server.add_secure_port(bind, grpc.ssl_server_credentials([tls]))
    else:
        port = server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"could not bind the coordinator to {bind!r}")
    mbind = None
    if metrics_bind is not None:
        host, _, mport = metrics_bind.rpartition(":")
        mbind = (host.strip("[]") or "127.0.0.1", int(mport))
    return CoordinatorServer(server, core, store, clock, stopping, metrics, mbind), port
