"""Prometheus metrics of the coordinator, in a registry of their own (one per server).

``Metrics`` holds the instruments; the transport (``recovery.server``) records into them and
``serve`` exposes them over HTTP (``prometheus_client.start_http_server``) when asked. A registry
per server keeps two servers in one process (tests) from colliding in the global registry.
"""

from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics"]

#: seconds; heartbeat RPCs take ~0.1-10 ms, plans up to ~1 s
_RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: seconds from a member's last heartbeat to its detection (defaults: 2.5-3 s)
_DETECT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 7.5, 10.0, 30.0)


class Metrics:
    """The coordinator's instruments (names prefixed ``ckpt_coordinator_``).

    Args:
        live_members: returns the number of live members (read at scrape time).
    """

    def __init__(self, live_members: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.members = Gauge("ckpt_coordinator_members", "Live members over all jobs", registry=r)
        self.members.set_function(lambda: float(live_members()))
        self.registrations = Counter("ckpt_coordinator_registrations", "Register calls admitted", ["job"], registry=r)
        self.failures = Counter("ckpt_coordinator_failures", "Members declared failed by the sweeper", ["job"],
                                registry=r)
        self.detection_latency = Histogram("ckpt_coordinator_detection_latency_seconds",
                                           "Seconds from a failed member's last heartbeat to its detection",
                                           buckets=_DETECT_BUCKETS, registry=r)
        self.step_recoverable = Gauge("ckpt_coordinator_latest_recoverable_step",
                                      "Latest recoverable (in-memory) step per job", ["job"], registry=r)
        self.step_committed = Gauge("ckpt_coordinator_latest_committed_step",
                                    "Latest committed (persisted) step per job", ["job"], registry=r)
        self.rpc_latency = Histogram("ckpt_coordinator_rpc_latency_seconds", "Server-side RPC handling time",
                                     ["method", "code"], buckets=_RPC_BUCKETS, registry=r)
        self._httpd = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP ``/metrics`` endpoint on ``host:port`` (0: a free port); return the port."""
        self._httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._httpd.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if started."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def observe_latest(self, job: str, recoverable: Optional[int], committed: Optional[int]) -> None:
        if recoverable is not None:
            self.step_recoverable.labels(job).set(recoverable)
        if committed is not None:
            self.step_committed.labels(job).set(committed)
