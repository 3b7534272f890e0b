"""recovery.coordinator: the transport-free core, driven with explicit time."""

from __future__ import annotations

import pytest

from ckpt.layout import Layout
from ckpt.regions import Box
from recovery.coordinator import Coordinator, UnknownJob
from recovery.detector import FailureDetector
from recovery.model import FencedError, Heartbeat, HeldRegion, InvalidRequest, Member, RestorePlanRequest, SnapshotReport, SourceKind
from recovery.registry import Registry

LAYOUT = Layout.grid(dp=2, tp=2)


def _core() -> tuple[Coordinator, dict[int, int]]:
    core = Coordinator(Registry(), FailureDetector(1.0, 3.0), wall_clock=lambda: 0.0)
    gens = {r: core.register(Member("j", r, f"n{r}", f"h{r}:1", LAYOUT.with_rank(r)), 0.0) for r in range(4)}
    for r in range(4):
        core.report_snapshot(SnapshotReport("j", r, gens[r], 10, LAYOUT.with_rank(r),
                                            (HeldRegion("w", Box(((r % 2) * 4,), (4,))),)), 0.5)
    return core, gens


def test_failed_member_is_planned_from_a_replica_and_fenced() -> None:
    core, gens = _core()
    assert core.latest("j").recoverable == 10
    for t in (1.0, 2.0, 3.0):
        for r in (0, 2, 3):
            core.heartbeat(_hb(r, gens[r]), t)
        assert core.sweep(t) == []
    (f,) = core.sweep(3.5)
    assert f.rank == 1
    plan = core.plan(RestorePlanRequest("j", LAYOUT))
    assert {i.source.kind for i in plan.ranks[1]} == {SourceKind.PEER_REPLICA}
    assert {i.source.ranks for i in plan.ranks[1]} == {(3,)} and plan.ranks[1][0].source.agent_address == "h3:1"
    with pytest.raises(FencedError):
        core.report_snapshot(SnapshotReport("j", 1, gens[1], 11, LAYOUT.with_rank(1)), 4.0)
    kinds = [e.kind for e in core.events("j", 0, 0.0)]
    assert kinds.count("JOINED") == 4 and kinds[-1] == "FAILED"


def test_unknown_job_and_layout_mismatch() -> None:
    core, _ = _core()
    with pytest.raises(UnknownJob):
        core.latest("other")
    with pytest.raises(InvalidRequest, match="targets"):
        core.plan(RestorePlanRequest("j", Layout.grid(tp=4)))


def _hb(rank: int, gen: int):
    from recovery.model import Heartbeat

    return Heartbeat("j", rank, gen)


class _CountingStore:
    """A RegistryStore that records epoch writes (each one is an fsync in SQLite)."""

    def __init__(self) -> None:
        self.epochs: list[tuple[str, int]] = []

    def load(self):
        return [], [], {}

    def put_report(self, report) -> None: ...

    def put_commit(self, job, commit) -> None: ...

    def forget_steps(self, job, steps) -> None: ...

    def put_epoch(self, job: str, generation: int) -> None:
        self.epochs.append((job, generation))


def test_a_sweep_persists_each_jobs_epoch_once_however_many_fail() -> None:
    store = _CountingStore()
    core = Coordinator(Registry(store), FailureDetector(1.0, 3.0), wall_clock=lambda: 0.0)
    lay = Layout.grid(dp=100)
    for r in range(100):
        core.register(Member("big", r, "n", "h:1", lay.with_rank(r)), 0.0)
    core.register(Member("small", 0, "n", "h:1", LAYOUT.with_rank(0)), 0.0)
    store.epochs.clear()
    failed = core.sweep(10.0)
    assert len(failed) == 101
    assert store.epochs == [("big", 200), ("small", 2)]  # the final epochs, one write each
    with pytest.raises(FencedError):
        core.heartbeat(Heartbeat("big", 5, 6), 10.5)
