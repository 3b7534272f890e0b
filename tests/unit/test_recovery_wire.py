"""recovery.wire: protobuf <-> domain round trips and field-naming validation errors."""

from __future__ import annotations

import pytest

pytest.importorskip("google.protobuf")

from ckpt.layout import Layout
from ckpt.regions import Box
from recovery import wire
from recovery._proto import coordinator_pb2 as pb
from recovery.model import HeldRegion, InvalidRequest, Member, PlanItem, RestorePlan, SnapshotReport, Source, SourceKind

LAYOUT = Layout.grid(pp=2, dp=2, tp=2, rank=5)


def _register(**kw) -> pb.RegisterRequest:
    base = dict(job="job1", rank=5, node="n1", agent_address="10.0.0.1:7000",
                layout=wire.layout_to_pb(LAYOUT, with_coords=True), generation=0)
    base.update(kw)
    return pb.RegisterRequest(**base)


def test_member_round_trip() -> None:
    m = wire.member_from_pb(_register())
    assert m == Member("job1", 5, "n1", "10.0.0.1:7000", LAYOUT, 0)
    assert wire.member_from_pb(wire.member_to_pb(m)) == m


def test_snapshot_round_trip() -> None:
    r = SnapshotReport("job1", 5, 3, 100, LAYOUT, (HeldRegion("w", Box((0, 4), (8, 4)), 123, 128),),
                       True, "g0", True)
    assert wire.snapshot_from_pb(wire.snapshot_to_pb(r)) == r


def test_plan_round_trip() -> None:
    plan = RestorePlan(7, {0: (PlanItem("w", Box((0,), (4,)), Source(SourceKind.PEER_REPLICA, (3,), "h:1")),)},
                       ("because",))
    back = wire.plan_from_pb(wire.plan_to_pb(plan))
    assert back == plan and back.explain() == "because"


@pytest.mark.parametrize("kw, field", [
    (dict(job=""), "job"),
    (dict(job="bad job"), "job"),
    (dict(node=""), "node"),
    (dict(node="x" * 300), "node"),
    (dict(agent_address="nohostport"), "agent_address"),
    (dict(rank=4), "rank"),
    (dict(layout=pb.LayoutSpec(axes=[pb.LayoutAxis(name="tp", size=2)], coords=[2])), "layout.coords[0]"),
    (dict(layout=pb.LayoutSpec(axes=[pb.LayoutAxis(name="tp", size=0)], coords=[0])), "layout.axes"),
    (dict(layout=pb.LayoutSpec(axes=[pb.LayoutAxis(name="tp", size=2)])), "layout.coords"),
])
def test_register_rejects_with_the_field_named(kw, field) -> None:
    with pytest.raises(InvalidRequest, match=field.replace("[", r"\[").replace("]", r"\]")):
        wire.member_from_pb(_register(**kw))


def test_layout_without_field_is_rejected() -> None:
    msg = _register()
    msg.ClearField("layout")
    with pytest.raises(InvalidRequest, match="layout is missing"):
        wire.member_from_pb(msg)


def _snapshot(**kw) -> pb.ReportSnapshotRequest:
    r = SnapshotReport("job1", 5, 3, 100, LAYOUT, (HeldRegion("w", Box((0, 4), (8, 4))),), False, "", True)
    msg = wire.snapshot_to_pb(r)
    for k, v in kw.items():
        if k == "region":
            msg.regions[0].region.CopyFrom(v)
        elif k == "tensor":
            msg.regions[0].tensor = v
        else:
            setattr(msg, k, v)
    return msg


@pytest.mark.parametrize("kw, field", [
    (dict(tensor=""), r"regions\[0\]\.tensor"),
    (dict(region=pb.Region(offsets=[0], sizes=[1, 2])), r"regions\[0\]\.region"),
    (dict(region=pb.Region(offsets=[1 << 60], sizes=[1])), r"regions\[0\]\.region"),
    (dict(parity_held=True), "parity_group"),
    (dict(step=1 << 63), "step"),
])
def test_snapshot_rejects_with_the_field_named(kw, field) -> None:
    with pytest.raises(InvalidRequest, match=field):
        wire.snapshot_from_pb(_snapshot(**kw))


def test_heartbeat_needs_member_and_generation() -> None:
    with pytest.raises(InvalidRequest, match="member is missing"):
        wire.heartbeat_from_pb(pb.HeartbeatRequest())
    with pytest.raises(InvalidRequest, match="member.generation"):
        wire.heartbeat_from_pb(pb.HeartbeatRequest(member=pb.MemberId(job="j", rank=0, generation=0)))
    hb = wire.heartbeat_from_pb(pb.HeartbeatRequest(member=pb.MemberId(job="j", rank=2, generation=4)))
    assert (hb.job, hb.rank, hb.generation) == ("j", 2, 4)


def test_plan_request_validation() -> None:
    target = wire.layout_to_pb(Layout.grid(tp=4), with_coords=False)
    req = wire.plan_request_from_pb(pb.GetRestorePlanRequest(job="j", target_layout=target, failed_ranks=[3, 1, 3],
                                                              for_rank=2))
    assert req.failed_ranks == (1, 3) and req.for_rank == 2 and req.target_layout.world_size == 4
    with pytest.raises(InvalidRequest, match="for_rank"):
        wire.plan_request_from_pb(pb.GetRestorePlanRequest(job="j", target_layout=target, for_rank=4))
    with pytest.raises(InvalidRequest, match="target_layout.coords"):
        wire.plan_request_from_pb(pb.GetRestorePlanRequest(
            job="j", target_layout=wire.layout_to_pb(Layout.grid(tp=4, rank=1), with_coords=True)))


def test_commit_needs_manifest_key() -> None:
    with pytest.raises(InvalidRequest, match="manifest_key"):
        wire.commit_from_pb(pb.ReportCommittedRequest(member=pb.MemberId(job="j", rank=0, generation=1), step=3))


def test_invalid_request_is_a_value_error() -> None:
    assert issubclass(InvalidRequest, ValueError)


def test_targets_round_trip_and_validation() -> None:
    from ckpt.mapping import TensorMapping

    tg = {0: {"w": TensorMapping.identity("w", (4, 4))}, 1: {"b": TensorMapping.identity("b", (4,))}}
    req = pb.GetRestorePlanRequest(job="j", target_layout=wire.layout_to_pb(Layout.grid(dp=2), with_coords=False),
                                   targets=wire.targets_to_pb(tg))
    back = wire.targets_from_pb(req, 2)
    assert {r: [(p.name, p.region) for m in maps.values() for p in m.pieces] for r, maps in back.items()} == {
        0: [("w", Box((0, 0), (4, 4)))], 1: [("b", Box((0,), (4,)))]}
    assert wire.targets_from_pb(pb.GetRestorePlanRequest(job="j"), 2) is None
    req.targets[1].rank = 5
    with pytest.raises(InvalidRequest, match=r"targets\[1\]\.rank"):
        wire.targets_from_pb(req, 2)
    req.targets[1].rank = 0
    with pytest.raises(InvalidRequest, match="twice"):
        wire.targets_from_pb(req, 2)


def test_event_to_pb() -> None:
    from recovery.model import MembershipEvent

    msg = wire.event_to_pb(MembershipEvent(3, "FAILED", "j", 2, "n1", 7, 1234))
    assert (msg.sequence, msg.kind, msg.rank, msg.generation) == (3, pb.MembershipEvent.FAILED, 2, 7)
