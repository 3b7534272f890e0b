"""recovery.server: a real gRPC coordinator on port 0 (in-process): auth, health, validation,
the register/report/plan round trip, failure detection with fencing, restart from the state dir."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")

from ckpt.layout import Layout  # noqa: E402
from ckpt.regions import Box  # noqa: E402
from recovery import wire  # noqa: E402
from recovery._proto import coordinator_pb2 as pb  # noqa: E402
from recovery._proto import coordinator_pb2_grpc as pb_grpc  # noqa: E402
from recovery._proto import health_pb2, health_pb2_grpc  # noqa: E402
from recovery.model import HeldRegion, SnapshotReport, SourceKind  # noqa: E402
from recovery.server import build_server  # noqa: E402

TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
DEADLINE = 5.0
LAYOUT = Layout.grid(dp=2, tp=2)


@pytest.fixture()
def server(tmp_path: Path):
    srv, port = build_server("127.0.0.1:0", state_dir=tmp_path / "state", token=TOKEN, interval=0.05, timeout=0.3)
    srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield srv, port, pb_grpc.CoordinatorStub(channel), channel
    channel.close()
    srv.stop(1)


def register(stub, rank: int, gen: int = 0) -> int:
    req = pb.RegisterRequest(job="job1", rank=rank, node=f"node{rank // 2}", agent_address=f"127.0.0.1:{7000 + rank}",
                             layout=wire.layout_to_pb(LAYOUT.with_rank(rank), with_coords=True), generation=gen)
    return stub.Register(req, timeout=DEADLINE, metadata=AUTH).generation


def report(stub, rank: int, gen: int, step: int):
    r = SnapshotReport("job1", rank, gen, step, LAYOUT.with_rank(rank),
                       (HeldRegion("w", Box(((rank % 2) * 4, 0), (4, 8)), 7, 128),))
    return stub.ReportSnapshot(wire.snapshot_to_pb(r), timeout=DEADLINE, metadata=AUTH)


def test_health_is_open_and_calls_need_the_token(server) -> None:
    _, _, stub, channel = server
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        stub.GetLatestSteps(pb.GetLatestStepsRequest(job="job1"), timeout=DEADLINE)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.GetLatestSteps(pb.GetLatestStepsRequest(job="job1"), timeout=DEADLINE, metadata=(("authorization", "Bearer no"),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        next(iter(stub.WatchMembership(pb.WatchMembershipRequest(job="job1"), timeout=DEADLINE)))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_hostile_requests_get_invalid_argument_naming_the_field(server) -> None:
    _, _, stub, _ = server
    cases = [
        (stub.Register, pb.RegisterRequest(job="", rank=0), "job"),
        (stub.Register, pb.RegisterRequest(job="j", rank=9, node="n", agent_address="h:1",
                                           layout=wire.layout_to_pb(LAYOUT, with_coords=True)), "rank"),
        (stub.Heartbeat, pb.HeartbeatRequest(), "member"),
        (stub.ReportSnapshot, pb.ReportSnapshotRequest(member=pb.MemberId(job="j", rank=0, generation=1), step=1,
                                                       layout=wire.layout_to_pb(LAYOUT, with_coords=True),
                                                       regions=[pb.HeldRegion(tensor="", region=pb.Region())]),
         "regions[0].tensor"),
        (stub.GetRestorePlan, pb.GetRestorePlanRequest(job="j"), "target_layout"),
    ]
    for call, req, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=DEADLINE, metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, e.value.details())
        assert field in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.GetLatestSteps(pb.GetLatestStepsRequest(job="nojob"), timeout=DEADLINE, metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_register_report_commit_plan(server) -> None:
    _, _, stub, _ = server
    gens = {r: register(stub, r) for r in range(4)}
    assert len(set(gens.values())) == 4
    for r in range(3):
        assert not report(stub, r, gens[r], 10).has_recoverable
    resp = report(stub, 3, gens[3], 10)
    assert resp.has_recoverable and resp.latest_recoverable_step == 10
    stub.ReportCommitted(pb.ReportCommittedRequest(member=pb.MemberId(job="job1", rank=0, generation=gens[0]), step=10,
                                                   manifest_key="run/10/manifest.json"), timeout=DEADLINE, metadata=AUTH)
    latest = stub.GetLatestSteps(pb.GetLatestStepsRequest(job="job1"), timeout=DEADLINE, metadata=AUTH)
    assert (latest.latest_recoverable_step, latest.latest_committed_step) == (10, 10)
    for r in range(4):
        stub.Heartbeat(pb.HeartbeatRequest(member=pb.MemberId(job="job1", rank=r, generation=gens[r])),
                       timeout=DEADLINE, metadata=AUTH)
    plan = wire.plan_from_pb(stub.GetRestorePlan(pb.GetRestorePlanRequest(
        job="job1", target_layout=wire.layout_to_pb(LAYOUT, with_coords=False)), timeout=DEADLINE, metadata=AUTH))
    assert plan.step == 10 and {i.source.kind for items in plan.ranks.values() for i in items} == {SourceKind.OWN_MEMORY}
    # a new layout with explicit targets: tp=1 needs the whole tensor on each of 2 ranks
    from ckpt.mapping import TensorMapping

    tg = {r: {"w": TensorMapping.identity("w", (8, 8))} for r in range(2)}
    resp = stub.GetRestorePlan(pb.GetRestorePlanRequest(
        job="job1", target_layout=wire.layout_to_pb(Layout.grid(dp=2), with_coords=False), targets=wire.targets_to_pb(tg),
        for_rank=1), timeout=DEADLINE, metadata=AUTH)
    plan = wire.plan_from_pb(resp)
    assert list(plan.ranks) == [1] and sum(i.box.numel for i in plan.ranks[1]) == 64 and resp.explanation


def test_failure_detected_and_stale_member_fenced(server) -> None:
    srv, _, stub, _ = server
    t_sent = time.monotonic()  # rank 0's only contact (its Register) happens after this...
    g0 = register(stub, 0)
    t_last = time.monotonic()  # ...and before this
    g1 = register(stub, 1)
    events = stub.WatchMembership(pb.WatchMembershipRequest(job="job1"), timeout=DEADLINE, metadata=AUTH)
    failed = None
    deadline = time.monotonic() + 30
    while failed is None and time.monotonic() < deadline:
        stub.Heartbeat(pb.HeartbeatRequest(member=pb.MemberId(job="job1", rank=1, generation=g1)),
                       timeout=DEADLINE, metadata=AUTH)
        for e in events:
            if e.kind == pb.MembershipEvent.FAILED:
                failed = e
            break
    events.cancel()
    now = time.monotonic()
    assert failed is not None and failed.rank == 0 and failed.generation == g0
    # never before the timeout after rank 0's last contact; the upper bound (timeout + one
    # interval) is measured by tests/benchmarks/bench_coordinator.py, not asserted on a busy machine
    assert now - t_sent >= 0.3, (now - t_sent, now - t_last)
    # a late report from the failed process is fenced
    with pytest.raises(grpc.RpcError) as e:
        report(stub, 0, g0, 11)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "re-register" in e.value.details()
    assert register(stub, 0, g0) > g0


def test_restart_from_state_dir_keeps_records_and_generations(tmp_path: Path) -> None:
    state = tmp_path / "state"
    srv, port = build_server("127.0.0.1:0", state_dir=state, interval=0.05, timeout=0.3)
    srv.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        gens = {r: register(stub, r) for r in range(4)}
        for r in range(4):
            report(stub, r, gens[r], 5)
    srv.stop(1)
    srv, port = build_server("127.0.0.1:0", state_dir=state, interval=0.05, timeout=0.3)
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            latest = stub.GetLatestSteps(pb.GetLatestStepsRequest(job="job1"), timeout=DEADLINE)
            assert latest.has_recoverable and latest.latest_recoverable_step == 5
            assert register(stub, 0) > max(gens.values())
    finally:
        srv.stop(1)


def _spawn(state: Path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "recovery", "--listen", "127.0.0.1:0", "--state-dir", str(state)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, int(line.rsplit(":", 1)[1])


def test_coordinator_subprocess_sigkill_and_restart_loses_nothing(tmp_path: Path) -> None:
    import os
    import signal

    state = tmp_path / "state"
    proc, port = _spawn(state)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            gens = {r: register(stub, r) for r in range(4)}
            for step in (1, 2):
                for r in range(4):
                    report(stub, r, gens[r], step)
            stub.ReportCommitted(pb.ReportCommittedRequest(member=pb.MemberId(job="job1", rank=0, generation=gens[0]),
                                                           step=1, manifest_key="m1"), timeout=DEADLINE)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    proc, port = _spawn(state)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            latest = stub.GetLatestSteps(pb.GetLatestStepsRequest(job="job1"), timeout=DEADLINE)
            assert (latest.latest_recoverable_step, latest.latest_committed_step) == (2, 1)
            assert latest.latest_committed_manifest_key == "m1"
            assert register(stub, 2) > max(gens.values())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
