"""The coordinator's core: membership, detection, registry and planning behind one lock.

No gRPC here (``recovery.server`` is the thin transport) and time is an argument of every call,
so the whole control plane is testable without sockets or sleeps. Thread-safe: the gRPC server
calls it from its worker pool and the sweeper thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping, Optional

from ckpt.mapping import Piece, TensorMapping
from ckpt.regions import Box
from recovery.detector import Failure, FailureDetector
from recovery.model import (
    CommitReport,
    Heartbeat,
    InvalidRequest,
    LatestSteps,
    Member,
    MembershipEvent,
    RestorePlan,
    RestorePlanRequest,
    SnapshotReport,
    UnrecoverableError,
)
from recovery.planner import RestoreView, plan_restore, view_from_registry
from recovery.registry import Registry

__all__ = ["Coordinator", "UnknownJob"]

log = logging.getLogger(__name__)


class UnknownJob(LookupError):
    """No member of this job ever registered or reported; check the job name."""


class Coordinator:
    """Membership, failure detection, the snapshot registry and restore planning of many jobs.

    Args:
        registry: the (persistent) registry; its epochs seed the detector so a restarted
            coordinator never reissues a generation.
        detector: the failure detector (its interval/timeout are what members are told).
        parity_tolerance: members an erasure-coding group may lose and still decode.
        max_events: membership events kept per job for ``WatchMembership``.
        wall_clock: Unix time for event timestamps only; every decision uses the ``now``
            arguments (monotonic seconds in the server).
    """

    def __init__(self, registry: Registry, detector: FailureDetector, *, parity_tolerance: int = 1,
                 max_events: int = 10_000, wall_clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.detector = detector
        self.parity_tolerance = parity_tolerance
        self.max_events = max_events
        self._wall = wall_clock
        self._lock = threading.Condition()
        self._members: dict[tuple[str, int], Member] = {}
        self._events: dict[str, list[MembershipEvent]] = {}
        self._seq = 0
        for job, gen in registry.epochs.items():
            detector.restore_epoch(job, gen)

    # -- membership ------------------------------------------------------------------------------
    def register(self, member: Member, now: float) -> int:
        """Admit ``member`` (fencing any older process of its rank); return its generation."""
        with self._lock:
            gen = self.detector.admit(member, now)
            self.registry.set_epoch(member.job, gen)
            self._members[member.key] = Member(member.job, member.rank, member.node, member.agent_address,
                                               member.layout, gen)
            self._event("JOINED", member.job, member.rank, member.node, gen, now)
            log.info("job %s rank %d registered from %s generation %d", member.job, member.rank, member.node, gen,
                     extra={"job": member.job, "rank": member.rank, "generation": gen, "event": "registered"})
            return gen

    def heartbeat(self, hb: Heartbeat, now: float) -> int:
        with self._lock:
            self.detector.observe(hb, now)
            return self.detector.epoch(hb.job)

    def sweep(self, now: float) -> list[Failure]:
        """Declare silent members failed (called every interval by the server's sweeper)."""
        with self._lock:
            failed = self.detector.expired(now)
            for job in sorted({f.job for f in failed}):  # one write per job, not per failure
                self.registry.set_epoch(job, self.detector.epoch(job))
            for f in failed:
                m = self._members.get((f.job, f.rank))
                self._event("FAILED", f.job, f.rank, m.node if m else "", f.generation, now)
                log.warning("job %s rank %d failed: silent for %.2f s (generation %d fenced)",
                            f.job, f.rank, f.latency, f.generation,
                            extra={"job": f.job, "rank": f.rank, "generation": f.generation, "event": "failed"})
            return failed

    def next_deadline(self) -> Optional[float]:
        """The earliest ``now`` at which ``sweep`` may declare someone failed (``None``: nobody live)."""
        with self._lock:
            return self.detector.next_deadline()

    # -- snapshots -------------------------------------------------------------------------------
    def report_snapshot(self, r: SnapshotReport, now: float) -> LatestSteps:
        with self._lock:
            self.detector.observe(r, now)  # FencedError for a stale generation
            self.registry.report(r)
            return self.registry.job(r.job).latest()

    def report_committed(self, c: CommitReport, now: float) -> None:
        with self._lock:
            self.detector.observe(c, now)
            self.registry.report_committed(c.job, c.step, c.manifest_key)

    def latest(self, job: str) -> LatestSteps:
        with self._lock:
            self._known(job)
            return self.registry.job(job).latest()

    # -- planning --------------------------------------------------------------------------------
    def plan(self, req: RestorePlanRequest, targets: Optional[Mapping[int, Mapping[str, TensorMapping]]] = None) -> RestorePlan:
        """Plan the job's restore into ``req.target_layout`` (``targets``: the regions each new rank needs)."""
        with self._lock:
            self._known(req.job)
            reg = self.registry.job(req.job)
            live = self.detector.live(req.job)
            old_ranks = {r for s in reg.steps() for r in reg.reports(s)}
            failed = set(req.failed_ranks) | {r for r in old_ranks if r not in live}
            addresses = {r: m.agent_address for (j, r), m in self._members.items() if j == req.job}
            view = view_from_registry(reg, addresses=addresses, failed=failed, parity_tolerance=self.parity_tolerance)
            if targets is None:
                targets = self._same_layout_targets(req, view)
        plan = plan_restore(view, targets, allow_approximate=req.allow_approximate)
        if req.for_rank is not None:
            plan = RestorePlan(plan.step, {req.for_rank: plan.ranks.get(req.for_rank, ())}, plan.reasons)
        return plan

    @staticmethod
    def _same_layout_targets(req: RestorePlanRequest, view: RestoreView) -> dict[int, dict[str, TensorMapping]]:
        """Without explicit targets, each rank needs what it held in the newest snapshot."""
        if not view.snapshots:
            raise UnrecoverableError(f"job {req.job!r} has no snapshot reports; send targets or restore from storage")
        newest = view.snapshots[max(view.snapshots)]
        layout = next(iter(newest.values())).layout
        if layout.axes != req.target_layout.axes:
            raise InvalidRequest(
                f"target_layout {req.target_layout.describe()} differs from the snapshots' {layout.describe()}: "
                "list the regions each new rank needs in targets (from the new layout's sharding rules)")
        out: dict[int, dict[str, TensorMapping]] = {}
        for r, rep in newest.items():
            out[r] = {f"{h.tensor}#{i}": TensorMapping(f"{h.tensor}#{i}", h.box.sizes,
                                                       (Piece(Box((0,) * h.box.ndim, h.box.sizes), h.tensor, h.box),),
                                                       {h.tensor: h.box.ends}, "held")
                      for i, h in enumerate(rep.regions)}
        return out

    # -- events ----------------------------------------------------------------------------------
    def events(self, job: str, after: int, timeout: float) -> list[MembershipEvent]:
        """Events of ``job`` with a sequence above ``after``, waiting up to ``timeout`` s for one."""
        with self._lock:
            def ready() -> list[MembershipEvent]:
                return [e for e in self._events.get(job, ()) if e.sequence > after]

            got = ready()
            if not got:
                self._lock.wait(timeout)
                got = ready()
            return got

    def _event(self, kind: str, job: str, rank: int, node: str, gen: int, now: float) -> None:
        self._seq += 1
        log_ = self._events.setdefault(job, [])
        log_.append(MembershipEvent(self._seq, kind, job, rank, node, gen, int(self._wall() * 1000)))
        del log_[: max(0, len(log_) - self.max_events)]
        self._lock.notify_all()

    def _known(self, job: str) -> None:
        if not self.registry.has_job(job) and not any(j == job for j, _ in self._members):
            raise UnknownJob(f"job {job!r} is unknown to this coordinator (no member registered or reported)")
