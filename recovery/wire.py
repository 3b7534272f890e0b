"""The one place that converts protocol messages (``ckpt.coordinator.v1``) to domain types and back.

Every ``*_from_pb`` validates untrusted input field by field and raises ``InvalidRequest`` whose
message names the field (``regions[3].region.sizes``) and says what is wrong; the servicer maps
it to ``INVALID_ARGUMENT``. ``*_to_pb`` trusts the domain objects (they were validated on the
way in or built by the core).
"""

from __future__ import annotations

import re
from typing import Optional

from ckpt.layout import Layout
from ckpt.mapping import Piece, TensorMapping
from ckpt.regions import Box
from recovery._proto import coordinator_pb2 as pb
from recovery.model import (
    CommitReport,
    Heartbeat,
    HeldRegion,
    InvalidRequest,
    LatestSteps,
    Member,
    MembershipEvent,
    PlanItem,
    RestorePlan,
    RestorePlanRequest,
    SnapshotReport,
    Source,
    SourceKind,
)

__all__ = [
    "MAX_NAME", "MAX_TENSOR_NAME", "MAX_REGIONS", "MAX_NDIM", "MAX_DIM", "MAX_STEP",
    "parse_job", "layout_from_pb", "layout_to_pb", "member_from_pb", "heartbeat_from_pb", "snapshot_from_pb",
    "commit_from_pb", "plan_request_from_pb", "latest_to_pb", "plan_to_pb", "plan_from_pb",
    "snapshot_to_pb", "member_to_pb", "targets_from_pb", "targets_to_pb", "event_to_pb", "MAX_TARGET_REGIONS",
]

MAX_NAME = 256  #: job, node, agent address, parity group
MAX_TENSOR_NAME = 1024
MAX_MANIFEST_KEY = 4096
MAX_REGIONS = 1 << 20  #: regions one report may list
MAX_NDIM = 32
MAX_DIM = 1 << 48  #: largest offset + size along one dimension
MAX_STEP = (1 << 63) - 1
MAX_GENERATION = (1 << 63) - 1
MAX_TARGET_REGIONS = 1 << 22  #: regions one plan request may list over all ranks
_JOB = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


def _name(value: str, where: str, *, limit: int = MAX_NAME, pattern: Optional[re.Pattern] = None) -> str:
    if not value:
        raise InvalidRequest(f"{where} is empty; give a non-empty name")
    if len(value) > limit:
        raise InvalidRequest(f"{where} has {len(value)} characters; at most {limit} are allowed")
    if pattern is not None and not pattern.match(value):
        raise InvalidRequest(f"{where} {value[:64]!r} must be letters, digits and . _ : / - (starting with a letter or digit)")
    if any(ord(c) < 32 for c in value):
        raise InvalidRequest(f"{where} contains control characters")
    return value


def _job(value: str, where: str = "job") -> str:
    return _name(value, where, pattern=_JOB)


def parse_job(value: str, where: str = "job") -> str:
    """A job name: non-empty, at most ``MAX_NAME`` characters of ``[A-Za-z0-9._:/-]``."""
    return _job(value, where)


def _int(value: int, where: str, *, hi: int, lo: int = 0) -> int:
    if not lo <= value <= hi:
        raise InvalidRequest(f"{where} is {value}; it must be in [{lo}, {hi}]")
    return int(value)


def layout_from_pb(msg: "pb.LayoutSpec", where: str, *, with_coords: bool) -> Layout:
    """A ``Layout`` (positioned at the rank its coordinates name when ``with_coords``)."""
    axes = tuple((a.name, a.size) for a in msg.axes)
    if len(axes) > MAX_NDIM:
        raise InvalidRequest(f"{where}.axes has {len(axes)} axes; at most {MAX_NDIM}")
    try:
        layout = Layout(axes, 0)
    except ValueError as e:
        raise InvalidRequest(f"{where}.axes: {e}") from None
    coords = tuple(msg.coords)
    if not with_coords:
        if coords:
            raise InvalidRequest(f"{where}.coords must be empty (a target layout is not one rank's)")
        return layout
    if len(coords) != len(axes):
        raise InvalidRequest(f"{where}.coords has {len(coords)} entries for {len(axes)} axes")
    for i, ((name, size), c) in enumerate(zip(axes, coords)):
        if c >= size:
            raise InvalidRequest(f"{where}.coords[{i}] is {c} but axis {name!r} has size {size}")
    return layout.with_rank(layout.rank_of(dict(zip(layout.names, coords))))


def layout_to_pb(layout: Layout, *, with_coords: bool) -> "pb.LayoutSpec":
    msg = pb.LayoutSpec(axes=[pb.LayoutAxis(name=n, size=s) for n, s in layout.axes])
    if with_coords:
        msg.coords.extend(layout.coords[n] for n in layout.names)
    return msg


def _rank_layout(msg, rank: int, where: str) -> Layout:
    if not msg.HasField("layout"):
        raise InvalidRequest(f"{where}layout is missing")
    layout = layout_from_pb(msg.layout, f"{where}layout", with_coords=True)
    if layout.rank != rank:
        raise InvalidRequest(f"{where}layout.coords place the member at rank {layout.rank}, but rank is {rank}")
    return layout


def member_from_pb(msg: "pb.RegisterRequest") -> Member:
    job = _job(msg.job)
    node = _name(msg.node, "node")
    addr = _name(msg.agent_address, "agent_address")
    if ":" not in addr:
        raise InvalidRequest(f"agent_address {addr[:64]!r} must be host:port")
    _int(msg.generation, "generation", hi=MAX_GENERATION)
    layout = _rank_layout(msg, msg.rank, "")
    return Member(job, msg.rank, node, addr, layout, msg.generation)


def member_to_pb(m: Member) -> "pb.RegisterRequest":
    return pb.RegisterRequest(job=m.job, rank=m.rank, node=m.node, agent_address=m.agent_address,
                              layout=layout_to_pb(m.layout, with_coords=True), generation=m.generation)


def _member_id(msg, where: str = "member") -> tuple[str, int, int]:
    if not msg.HasField("member"):
        raise InvalidRequest(f"{where} is missing")
    m = msg.member
    job = _job(m.job, f"{where}.job")
    _int(m.rank, f"{where}.rank", hi=(1 << 20) - 1)
    _int(m.generation, f"{where}.generation", hi=MAX_GENERATION, lo=1)
    return job, m.rank, m.generation


def heartbeat_from_pb(msg: "pb.HeartbeatRequest") -> Heartbeat:
    return Heartbeat(*_member_id(msg))


def _box(msg: "pb.Region", where: str) -> Box:
    offsets, sizes = tuple(msg.offsets), tuple(msg.sizes)
    if len(offsets) != len(sizes):
        raise InvalidRequest(f"{where}: offsets has {len(offsets)} entries but sizes has {len(sizes)}")
    if len(sizes) > MAX_NDIM:
        raise InvalidRequest(f"{where} has {len(sizes)} dimensions; at most {MAX_NDIM}")
    for d, (o, s) in enumerate(zip(offsets, sizes)):
        if o + s > MAX_DIM:
            raise InvalidRequest(f"{where}: dimension {d} ends at {o + s}, beyond the limit {MAX_DIM}")
    return Box(offsets, sizes)


def _box_to_pb(box: Box) -> "pb.Region":
    return pb.Region(offsets=box.offsets, sizes=box.sizes)


def snapshot_from_pb(msg: "pb.ReportSnapshotRequest") -> SnapshotReport:
    job, rank, generation = _member_id(msg)
    step = _int(msg.step, "step", hi=MAX_STEP)
    layout = _rank_layout(msg, rank, "")
    if len(msg.regions) > MAX_REGIONS:
        raise InvalidRequest(f"regions lists {len(msg.regions)} regions; at most {MAX_REGIONS}")
    regions = []
    for i, r in enumerate(msg.regions):
        where = f"regions[{i}]"
        tensor = _name(r.tensor, f"{where}.tensor", limit=MAX_TENSOR_NAME)
        if not r.HasField("region"):
            raise InvalidRequest(f"{where}.region is missing")
        regions.append(HeldRegion(tensor, _box(r.region, f"{where}.region"), r.crc32c, r.nbytes))
    group = msg.parity_group
    if group:
        _name(group, "parity_group")
    elif msg.parity_held:
        raise InvalidRequest("parity_held is set but parity_group is empty; name the erasure-coding group")
    return SnapshotReport(job, rank, generation, step, layout, tuple(regions), msg.parity_held, group, msg.complete)


def snapshot_to_pb(r: SnapshotReport) -> "pb.ReportSnapshotRequest":
    return pb.ReportSnapshotRequest(
        member=pb.MemberId(job=r.job, rank=r.rank, generation=r.generation), step=r.step,
        layout=layout_to_pb(r.layout, with_coords=True),
        regions=[pb.HeldRegion(tensor=h.tensor, region=_box_to_pb(h.box), crc32c=h.crc32c, nbytes=h.nbytes)
                 for h in r.regions],
        parity_held=r.parity_held, parity_group=r.parity_group, complete=r.complete)


def commit_from_pb(msg: "pb.ReportCommittedRequest") -> CommitReport:
    job, rank, generation = _member_id(msg)
    step = _int(msg.step, "step", hi=MAX_STEP)
    key = _name(msg.manifest_key, "manifest_key", limit=MAX_MANIFEST_KEY)
    return CommitReport(job, rank, generation, step, key)


def plan_request_from_pb(msg: "pb.GetRestorePlanRequest") -> RestorePlanRequest:
    job = _job(msg.job)
    if not msg.HasField("target_layout"):
        raise InvalidRequest("target_layout is missing")
    layout = layout_from_pb(msg.target_layout, "target_layout", with_coords=False)
    failed = tuple(sorted(set(msg.failed_ranks)))
    for r in failed:
        _int(r, "failed_ranks[]", hi=(1 << 20) - 1)
    for_rank = None
    if msg.HasField("for_rank"):
        for_rank = _int(msg.for_rank, "for_rank", hi=layout.world_size - 1)
    return RestorePlanRequest(job, layout, failed, msg.allow_approximate, for_rank)


def latest_to_pb(latest: LatestSteps) -> "pb.GetLatestStepsResponse":
    return pb.GetLatestStepsResponse(
        has_recoverable=latest.recoverable is not None, latest_recoverable_step=latest.recoverable or 0,
        has_committed=latest.committed is not None, latest_committed_step=latest.committed or 0,
        latest_committed_manifest_key=latest.committed_manifest_key)


def _source_to_pb(s: Source) -> "pb.PlanSource":
    return pb.PlanSource(kind=int(s.kind), ranks=s.ranks, agent_address=s.agent_address,
                         manifest_key=s.manifest_key, parity_group=s.parity_group)


def plan_to_pb(plan: RestorePlan) -> "pb.GetRestorePlanResponse":
    return pb.GetRestorePlanResponse(
        step=plan.step, approximate=plan.approximate, explanation=plan.reasons,
        ranks=[pb.RankPlan(rank=r, items=[pb.PlanItem(tensor=i.tensor, region=_box_to_pb(i.box),
                                                      source=_source_to_pb(i.source), approximate=i.approximate)
                                          for i in items])
               for r, items in sorted(plan.ranks.items())])


def plan_from_pb(msg: "pb.GetRestorePlanResponse") -> RestorePlan:
    """Client side: the plan a coordinator sent, validated like any other input."""
    ranks: dict[int, tuple[PlanItem, ...]] = {}
    for j, rp in enumerate(msg.ranks):
        items = []
        for i, it in enumerate(rp.items):
            where = f"ranks[{j}].items[{i}]"
            if it.source.kind not in SourceKind._value2member_map_:
                raise InvalidRequest(f"{where}.source.kind {it.source.kind} is unknown")
            s = it.source
            src = Source(SourceKind(s.kind), tuple(s.ranks), s.agent_address, s.manifest_key, s.parity_group)
            items.append(PlanItem(_name(it.tensor, f"{where}.tensor", limit=MAX_TENSOR_NAME),
                                  _box(it.region, f"{where}.region"), src))
        ranks[rp.rank] = tuple(items)
    return RestorePlan(msg.step, ranks, tuple(msg.explanation))


def targets_from_pb(msg: "pb.GetRestorePlanRequest", world_size: int) -> Optional[dict[int, dict[str, TensorMapping]]]:
    """The regions each new rank needs, as planner targets; ``None`` when the request lists none."""
    if not msg.targets:
        return None
    total = sum(len(t.regions) for t in msg.targets)
    if total > MAX_TARGET_REGIONS:
        raise InvalidRequest(f"targets list {total} regions; at most {MAX_TARGET_REGIONS}")
    out: dict[int, dict[str, TensorMapping]] = {}
    for j, t in enumerate(msg.targets):
        rank = _int(t.rank, f"targets[{j}].rank", hi=world_size - 1)
        if rank in out:
            raise InvalidRequest(f"targets[{j}].rank {rank} is listed twice")
        maps = out[rank] = {}
        for i, r in enumerate(t.regions):
            where = f"targets[{j}].regions[{i}]"
            tensor = _name(r.tensor, f"{where}.tensor", limit=MAX_TENSOR_NAME)
            if not r.HasField("region"):
                raise InvalidRequest(f"{where}.region is missing")
            box = _box(r.region, f"{where}.region")
            local = Box((0,) * box.ndim, box.sizes)
            maps[f"{tensor}#{i}"] = TensorMapping(f"{tensor}#{i}", box.sizes, (Piece(local, tensor, box),),
                                                  {tensor: box.ends}, "requested")
    return out


def targets_to_pb(targets) -> list["pb.RankTarget"]:
    """Planner targets (``{rank: {local: TensorMapping}}``) as the request's ``targets`` field."""
    return [pb.RankTarget(rank=r, regions=[pb.TargetRegion(tensor=p.name, region=_box_to_pb(p.region))
                                           for m in targets[r].values() for p in m.pieces])
            for r in sorted(targets)]


def event_to_pb(e: MembershipEvent) -> "pb.MembershipEvent":
    return pb.MembershipEvent(sequence=e.sequence, kind=pb.MembershipEvent.Kind.Value(e.kind), job=e.job, rank=e.rank,
                              node=e.node, generation=e.generation, time_unix_ms=e.time_unix_ms)
