"""The registry of snapshots: which steps each job can recover from memory, and which are committed.

Pure, in-memory, single-threaded core (the service serialises calls). Persistence is a
``RegistryStore`` (``recovery.store_sqlite.SqliteStore``): every accepted change is written
through before the call returns, and a registry built on a reopened store has the same records.

Rules:

* Step N of a job is **recoverable** when every rank of the layout the step was taken in has
  reported its snapshot of N complete and, when erasure coding is on for that step (any report
  names a parity group, or the registry was built with ``erasure_coding=True``), every report
  also says its group's parity is held.
* Step N is **committed** when its persisted manifest exists (``report_committed``). A committed
  step is never forgotten; in-memory snapshot records keep the newest ``keep_steps`` steps.
* All reports of one step must share one layout; a report that disagrees is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from ckpt.layout import Layout
from recovery.model import InvalidRequest, LatestSteps, SnapshotReport

__all__ = ["Registry", "JobRegistry", "RegistryStore", "Commit"]


@dataclass(frozen=True)
class Commit:
    step: int
    manifest_key: str


class RegistryStore(Protocol):
    """Write-through persistence of the registry (call order: ``load`` once, then ``put_*``)."""

    def load(self) -> tuple[list[SnapshotReport], list[tuple[str, Commit]], dict[str, int]]: ...
    def put_report(self, report: SnapshotReport) -> None: ...
    def put_commit(self, job: str, commit: Commit) -> None: ...
    def forget_steps(self, job: str, steps: list[int]) -> None: ...
    def put_epoch(self, job: str, generation: int) -> None: ...


class JobRegistry:
    """Snapshots and commits of one job."""

    def __init__(self, job: str, *, erasure_coding: bool = False, keep_steps: int = 8,
                 store: Optional[RegistryStore] = None) -> None:
        if keep_steps < 1:
            raise ValueError(f"keep_steps must be >= 1, got {keep_steps}")
        self.job = job
        self.erasure_coding = erasure_coding
        self.keep_steps = keep_steps
        self._store = store
        self._steps: dict[int, dict[int, SnapshotReport]] = {}
        self._layouts: dict[int, Layout] = {}
        self._recoverable: set[int] = set()
        self._commits: dict[int, Commit] = {}

    # -- updates ---------------------------------------------------------------------------------
    def report(self, r: SnapshotReport, *, persist: bool = True) -> bool:
        """Record a rank's snapshot report; return whether its step is (now) recoverable.

        Raises:
            InvalidRequest: another job, or a layout that differs from the step's other reports.
        """
        if r.job != self.job:
            raise InvalidRequest(f"report for job {r.job!r} sent to the registry of job {self.job!r}")
        axes = r.layout.axes
        have = self._layouts.get(r.step)
        if have is not None and have.axes != axes:
            raise InvalidRequest(
                f"job {self.job!r} step {r.step}: rank {r.rank} reports layout {r.layout.describe()} but other "
                f"ranks reported {have.describe()}; every rank of one step must share one layout")
        if r.step not in self._steps and self._steps and r.step < min(self._steps) and len(self._steps) >= self.keep_steps:
            return False  # older than everything retained: nothing to recover from it
        if persist and self._store is not None:
            self._store.put_report(r)
        self._layouts[r.step] = Layout(axes, 0)
        self._steps.setdefault(r.step, {})[r.rank] = r
        self._update(r.step)
        self._trim(persist)
        return r.step in self._recoverable

    def report_committed(self, step: int, manifest_key: str, *, persist: bool = True) -> None:
        """The manifest of ``step`` exists at ``manifest_key``: the step is committed."""
        if not manifest_key:
            raise InvalidRequest(f"job {self.job!r} step {step}: manifest_key is empty")
        have = self._commits.get(step)
        if have is not None and have.manifest_key != manifest_key:
            raise InvalidRequest(
                f"job {self.job!r} step {step} is already committed with manifest {have.manifest_key!r}, "
                f"not {manifest_key!r}; a committed step is never overwritten")
        if have is None:
            c = Commit(step, manifest_key)
            if persist and self._store is not None:
                self._store.put_commit(self.job, c)
            self._commits[step] = c

    # -- queries ---------------------------------------------------------------------------------
    def latest_recoverable(self) -> Optional[int]:
        return max(self._recoverable, default=None)

    def latest_committed(self) -> Optional[Commit]:
        return self._commits[max(self._commits)] if self._commits else None

    def latest(self) -> LatestSteps:
        c = self.latest_committed()
        return LatestSteps(self.latest_recoverable(), c.step if c else None, c.manifest_key if c else "")

    def recoverable_steps(self) -> list[int]:
        """Recoverable steps, newest first."""
        return sorted(self._recoverable, reverse=True)

    def steps(self) -> list[int]:
        """Every step with in-memory reports, newest first."""
        return sorted(self._steps, reverse=True)

    def reports(self, step: int) -> dict[int, SnapshotReport]:
        """``{rank: report}`` of ``step`` (empty when unknown)."""
        return dict(self._steps.get(step, {}))

    def layout(self, step: int) -> Optional[Layout]:
        return self._layouts.get(step)

    def commits(self) -> list[Commit]:
        return [self._commits[s] for s in sorted(self._commits, reverse=True)]

    def commit(self, step: int) -> Optional[Commit]:
        return self._commits.get(step)

    def missing(self, step: int) -> list[int]:
        """Ranks of ``step``'s layout whose complete report (and parity, if on) is missing."""
        layout = self._layouts.get(step)
        if layout is None:
            return []
        got = self._steps[step]
        ec = self._ec(step)
        return [r for r in range(layout.world_size)
                if r not in got or not got[r].complete or (ec and not got[r].parity_held)]

    # -- internals -------------------------------------------------------------------------------
    def _ec(self, step: int) -> bool:
        return self.erasure_coding or any(r.parity_group for r in self._steps[step].values())

    def _update(self, step: int) -> None:
        if not self.missing(step):
            self._recoverable.add(step)
        else:
            self._recoverable.discard(step)

    def _trim(self, persist: bool) -> None:
        if len(self._steps) <= self.keep_steps:
            return
        old = sorted(self._steps)[: len(self._steps) - self.keep_steps]
        for s in old:
            del self._steps[s], self._layouts[s]
            self._recoverable.discard(s)
        if persist and self._store is not None:
            self._store.forget_steps(self.job, old)


class Registry:
    """The registries of every job, loaded from and written through to ``store``."""

    def __init__(self, store: Optional[RegistryStore] = None, *, keep_steps: int = 8) -> None:
        self._store = store
        self._keep = keep_steps
        self._jobs: dict[str, JobRegistry] = {}
        self.epochs: dict[str, int] = {}
        if store is not None:
            reports, commits, epochs = store.load()
            for r in sorted(reports, key=lambda r: (r.job, r.step, r.rank)):
                self.job(r.job).report(r, persist=False)
            for job, c in commits:
                self.job(job).report_committed(c.step, c.manifest_key, persist=False)
            self.epochs.update(epochs)

    def job(self, job: str) -> JobRegistry:
        """The job's registry (created on first use)."""
        reg = self._jobs.get(job)
        if reg is None:
            reg = self._jobs[job] = JobRegistry(job, keep_steps=self._keep, store=self._store)
        return reg

    def jobs(self) -> list[str]:
        return sorted(self._jobs)

    def has_job(self, job: str) -> bool:
        return job in self._jobs

    def report(self, r: SnapshotReport) -> bool:
        return self.job(r.job).report(r)

    def report_committed(self, job: str, step: int, manifest_key: str) -> None:
        self.job(job).report_committed(step, manifest_key)

    def set_epoch(self, job: str, generation: int) -> None:
        """Persist the job's latest generation so a restarted coordinator never reissues one."""
        if generation > self.epochs.get(job, 0):
            self.epochs[job] = generation
            if self._store is not None:
                self._store.put_epoch(job, generation)
