"""Metrics and structured logs of the coordinator: scrape /metrics of a real server on port 0
after a register/fail cycle; JSON log lines carry job, rank, generation and event."""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.request

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from ckpt.layout import Layout  # noqa: E402
from ckpt.regions import Box  # noqa: E402
from recovery import wire  # noqa: E402
from recovery._logging import JsonFormatter  # noqa: E402
from recovery._proto import coordinator_pb2 as pb  # noqa: E402
from recovery._proto import coordinator_pb2_grpc as pb_grpc  # noqa: E402
from recovery.model import HeldRegion, SnapshotReport  # noqa: E402
from recovery.server import build_server  # noqa: E402

DEADLINE = 5.0
LAYOUT = Layout.grid(dp=2)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_scrape_after_register_report_and_failure(tmp_path) -> None:
    srv, port = build_server("127.0.0.1:0", state_dir=tmp_path, interval=0.05, timeout=0.2,
                             metrics_bind="127.0.0.1:0")
    srv.start()
    try:
        assert srv.metrics_port and srv.metrics_port != port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            gens = {}
            for r in range(2):
                gens[r] = stub.Register(pb.RegisterRequest(
                    job="j", rank=r, node="n", agent_address=f"h:{r + 1}",
                    layout=wire.layout_to_pb(LAYOUT.with_rank(r), with_coords=True)), timeout=DEADLINE).generation
            for r in range(2):
                stub.ReportSnapshot(wire.snapshot_to_pb(SnapshotReport(
                    "j", r, gens[r], 7, LAYOUT.with_rank(r), (HeldRegion("w", Box((0,), (4,)), 1, 16),))),
                    timeout=DEADLINE)
            stub.ReportCommitted(pb.ReportCommittedRequest(member=pb.MemberId(job="j", rank=0, generation=gens[0]),
                                                           step=5, manifest_key="m/5"), timeout=DEADLINE)
            m = scrape(srv.metrics_port)
            assert m[("ckpt_coordinator_members", ())] == 2
            assert m[("ckpt_coordinator_registrations_total", (("job", "j"),))] == 2
            assert m[("ckpt_coordinator_latest_recoverable_step", (("job", "j"),))] == 7
            assert m[("ckpt_coordinator_latest_committed_step", (("job", "j"),))] == 5
            assert m[("ckpt_coordinator_rpc_latency_seconds_count", (("code", "OK"), ("method", "Register")))] == 2
            with pytest.raises(grpc.RpcError):
                stub.GetLatestSteps(pb.GetLatestStepsRequest(job="nojob"), timeout=DEADLINE)
            # rank 1 stays silent: rank 0 keeps heartbeating until rank 1 is declared failed
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                stub.Heartbeat(pb.HeartbeatRequest(member=pb.MemberId(job="j", rank=0, generation=gens[0])),
                               timeout=DEADLINE)
                if scrape(srv.metrics_port).get(("ckpt_coordinator_failures_total", (("job", "j"),))):
                    break
                time.sleep(0.02)
        m = scrape(srv.metrics_port)
        assert m[("ckpt_coordinator_failures_total", (("job", "j"),))] == 1
        assert m[("ckpt_coordinator_members", ())] == 1
        assert m[("ckpt_coordinator_detection_latency_seconds_count", ())] == 1
        assert 0.2 <= m[("ckpt_coordinator_detection_latency_seconds_sum", ())] < 2.0
        assert m[("ckpt_coordinator_rpc_latency_seconds_count",
                  (("code", "NOT_FOUND"), ("method", "GetLatestSteps")))] == 1
        assert m[("ckpt_coordinator_rpc_latency_seconds_count", (("code", "OK"), ("method", "Heartbeat")))] >= 1
    finally:
        srv.stop(1)
    with pytest.raises(OSError):
        scrape(srv.metrics_port)  # the endpoint stops with the server


def test_two_servers_in_one_process_do_not_share_metrics(tmp_path) -> None:
    a, _ = build_server("127.0.0.1:0", state_dir=None)
    b, _ = build_server("127.0.0.1:0", state_dir=None)
    assert a.metrics.registry is not b.metrics.registry
    a.stop(0)
    b.stop(0)


def test_json_log_lines_carry_job_rank_generation_event() -> None:
    from recovery.coordinator import Coordinator
    from recovery.detector import FailureDetector
    from recovery.model import Member
    from recovery.registry import Registry

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("recovery.coordinator")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        core = Coordinator(Registry(None), FailureDetector(1.0, 2.0))
        core.register(Member("j", 1, "n", "h:1", LAYOUT.with_rank(1), 0), now=0.0)
        core.sweep(now=10.0)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [(x["event"], x["job"], x["rank"], x["generation"]) for x in lines] == [("registered", "j", 1, 1),
                                                                                  ("failed", "j", 1, 1)]
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])
