"""recovery.registry and recovery.store_sqlite: recoverable/committed rules, persistence, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt.layout import Layout
from ckpt.regions import Box
from recovery.model import HeldRegion, InvalidRequest, SnapshotReport
from recovery.registry import JobRegistry, Registry
from recovery.store_sqlite import SqliteStore

ROOT = Path(__file__).resolve().parents[2]
L4 = Layout.grid(dp=2, tp=2)


def rep(rank: int, step: int, *, job: str = "j", layout: Layout = L4, complete: bool = True,
        parity: bool = False, group: str = "") -> SnapshotReport:
    regions = (HeldRegion("w", Box((rank * 4,), (4,)), crc32c=rank, nbytes=16),)
    return SnapshotReport(job, rank, 1, step, layout.with_rank(rank), regions, parity, group, complete)


def test_recoverable_when_every_rank_reported() -> None:
    reg = JobRegistry("j")
    for r in range(3):
        assert reg.report(rep(r, 10)) is False
    assert reg.latest_recoverable() is None and reg.missing(10) == [3]
    assert reg.report(rep(3, 10)) is True
    assert reg.latest_recoverable() == 10
    for r in range(4):
        reg.report(rep(r, 20, complete=r != 2))
    assert reg.latest_recoverable() == 10 and reg.missing(20) == [2]


def test_parity_required_when_erasure_coding_is_on() -> None:
    reg = JobRegistry("j")
    for r in range(4):
        reg.report(rep(r, 5, parity=r != 1, group=f"g{r // 2}"))
    assert reg.latest_recoverable() is None and reg.missing(5) == [1]
    reg.report(rep(1, 5, parity=True, group="g0"))
    assert reg.latest_recoverable() == 5
    forced = JobRegistry("j", erasure_coding=True)
    for r in range(4):
        forced.report(rep(r, 5))
    assert forced.latest_recoverable() is None


def test_committed_and_never_overwritten() -> None:
    reg = JobRegistry("j")
    assert reg.latest_committed() is None
    reg.report_committed(100, "run/step-100/manifest.json")
    reg.report_committed(50, "run/step-50/manifest.json")
    reg.report_committed(100, "run/step-100/manifest.json")  # idempotent
    assert reg.latest_committed().step == 100
    with pytest.raises(InvalidRequest, match="never overwritten"):
        reg.report_committed(100, "other")
    latest = reg.latest()
    assert (latest.recoverable, latest.committed, latest.committed_manifest_key) == (None, 100, "run/step-100/manifest.json")


def test_layout_mismatch_within_a_step_is_refused() -> None:
    reg = JobRegistry("j")
    reg.report(rep(0, 1))
    with pytest.raises(InvalidRequest, match="share one layout"):
        reg.report(rep(0, 1, layout=Layout.grid(tp=4)))
    with pytest.raises(InvalidRequest, match="job"):
        reg.report(rep(0, 1, job="other"))


def test_new_layout_steps_are_judged_by_their_own_layout() -> None:
    reg = JobRegistry("j")
    for r in range(4):
        reg.report(rep(r, 1))
    new = Layout.grid(tp=2)
    for r in range(2):
        reg.report(rep(r, 2, layout=new))
    assert reg.recoverable_steps() == [2, 1]


def test_retention_keeps_newest_steps() -> None:
    reg = JobRegistry("j", keep_steps=2)
    for s in (1, 2, 3):
        for r in range(4):
            reg.report(rep(r, s))
    assert reg.steps() == [3, 2] and reg.recoverable_steps() == [3, 2]
    assert reg.report(rep(0, 1)) is False and reg.steps() == [3, 2]


def _fill(reg: Registry) -> None:
    for s in (10, 20):
        for r in range(4):
            reg.report(rep(r, s, parity=True, group="g"))
    reg.report(rep(0, 30))
    reg.report_committed("j", 10, "k10")
    reg.set_epoch("j", 7)


def test_sqlite_reopen_returns_same_records(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "state") as store:
        reg = Registry(store)
        _fill(reg)
        want = {s: reg.job("j").reports(s) for s in reg.job("j").steps()}
    with SqliteStore(tmp_path / "state") as store:
        again = Registry(store)
        j = again.job("j")
        assert {s: j.reports(s) for s in j.steps()} == want
        assert j.latest_recoverable() == 20 and j.latest_committed().manifest_key == "k10"
        assert again.epochs == {"j": 7}
        assert (tmp_path / "state" / "registry.sqlite3").exists()
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_retention_is_persisted(tmp_path: Path) -> None:
    with SqliteStore(tmp_path) as store:
        reg = Registry(store, keep_steps=2)
        for s in (1, 2, 3):
            reg.report(rep(0, s))
    with SqliteStore(tmp_path) as store:
        assert Registry(store, keep_steps=2).job("j").steps() == [3, 2]


_WRITER = r"""
import sys
from ckpt.layout import Layout
from ckpt.regions import Box
from recovery.model import HeldRegion, SnapshotReport
from recovery.registry import Registry
from recovery.store_sqlite import SqliteStore
reg = Registry(SqliteStore(sys.argv[1]), keep_steps=1_000_000)
lay = Layout.grid(tp=4)
step = 0
while True:
    step += 1
    for r in range(4):
        reg.report(SnapshotReport("j", r, 1, step, lay.with_rank(r), (HeldRegion("w", Box((r,), (1,))),)))
    reg.report_committed("j", step, f"m{step}")
    print(step, flush=True)
"""


def test_sigkill_of_a_writer_loses_nothing_acknowledged(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    acked = 0
    try:
        while acked < 40:
            line = proc.stdout.readline()
            assert line, "writer died early"
            acked = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with SqliteStore(tmp_path) as store:
        j = Registry(store).job("j")
        assert j.latest_committed().step >= acked
        assert j.latest_recoverable() >= acked
        assert all(j.commit(s) is not None and not j.missing(s) for s in range(1, acked + 1))
