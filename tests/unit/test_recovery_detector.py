"""recovery.detector: detection bounds (property tests), fencing of stale generations."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recovery.detector import FailureDetector
from recovery.model import FencedError, Heartbeat


def hb(rank: int, gen: int, job: str = "j") -> Heartbeat:
    return Heartbeat(job, rank, gen)


@settings(max_examples=200, deadline=None)
@given(
    interval=st.floats(0.05, 2.0),
    factor=st.floats(1.0, 6.0),
    gaps=st.lists(st.floats(0.0, 1.0), max_size=30),
    phase=st.floats(0.0, 1.0),
)
def test_detection_between_timeout_and_timeout_plus_interval(interval, factor, gaps, phase) -> None:
    timeout = interval * factor
    d = FailureDetector(interval, timeout)
    gen = d.admit(hb(0, 0), 0.0)
    # heartbeats at gaps shorter than the timeout, then silence
    beats, t = [0.0], 0.0
    for g in gaps:
        t += g * timeout * 0.999
        beats.append(t)
    sweep = phase * interval
    bi, detected = 1, None
    while detected is None:
        while bi < len(beats) and beats[bi] <= sweep:
            d.observe(hb(0, gen), beats[bi])
            bi += 1
        found = d.expired(sweep)
        if found:
            detected = found[0]
        sweep += interval
    last = beats[-1]
    assert bi == len(beats), "declared failed while it was still heartbeating within the timeout"
    assert detected.last_seen == last
    assert detected.latency >= timeout
    assert detected.latency <= timeout + interval + 1e-9


def test_never_expires_before_timeout_and_reports_once() -> None:
    d = FailureDetector(timedelta(seconds=1), timedelta(seconds=3))
    g = d.admit(hb(1, 0), 10.0)
    assert d.expired(12.999) == []
    (f,) = d.expired(13.0)
    assert (f.rank, f.generation, f.latency) == (1, g, 3.0)
    assert d.expired(100.0) == []


def test_datetime_and_timedelta() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    d = FailureDetector(timedelta(milliseconds=500), timedelta(seconds=2))
    g = d.admit(hb(0, 0), t0)
    d.observe(hb(0, g), t0 + timedelta(seconds=1))
    assert d.expired(t0 + timedelta(seconds=2.5)) == []
    assert [f.rank for f in d.expired(t0 + timedelta(seconds=3))] == [0]


def test_stale_generation_is_fenced_after_reregistration() -> None:
    d = FailureDetector(1.0, 3.0)
    old = d.admit(hb(0, 0), 0.0)
    new = d.admit(hb(0, old), 1.0)  # the rank restarted and re-registered
    assert new > old
    with pytest.raises(FencedError, match="generation"):
        d.observe(hb(0, old), 1.5)
    d.observe(hb(0, new), 1.5)


def test_member_declared_failed_cannot_report_into_new_generation() -> None:
    d = FailureDetector(1.0, 3.0)
    g0 = d.admit(hb(0, 0), 0.0)
    d.admit(hb(1, 0), 0.0)
    d.observe(hb(1, 2), 2.0)
    assert [f.rank for f in d.expired(3.5)] == [0]
    with pytest.raises(FencedError, match="re-register"):
        d.check(hb(0, g0))  # e.g. a late ReportSnapshot from a partitioned agent
    with pytest.raises(FencedError):
        d.observe(hb(0, g0), 3.6)
    g1 = d.admit(hb(0, g0), 4.0)
    assert g1 > d.live("j")[1] and d.epoch("j") == g1


def test_out_of_order_heartbeat_does_not_move_deadline_back() -> None:
    d = FailureDetector(1.0, 3.0)
    g = d.admit(hb(0, 0), 0.0)
    d.observe(hb(0, g), 2.0)
    d.observe(hb(0, g), 1.0)
    assert d.expired(4.5) == []
    assert len(d.expired(5.0)) == 1


def test_leave_and_restore_epoch() -> None:
    d = FailureDetector(1.0, 3.0)
    d.restore_epoch("j", 41)
    g = d.admit(hb(0, 0), 0.0)
    assert g == 42
    d.leave("j", 0)
    assert d.live("j") == {} and d.expired(100.0) == []


def test_rejects_bad_durations() -> None:
    with pytest.raises(ValueError, match="interval"):
        FailureDetector(0, 1)
    with pytest.raises(ValueError, match="shorter"):
        FailureDetector(2, 1)


def test_many_members_sweep_is_fast() -> None:
    import time

    d = FailureDetector(1.0, 3.0)
    gens = {r: d.admit(hb(r, 0), 0.0) for r in range(4096)}
    t0 = time.perf_counter()
    dead = []
    for second in range(1, 4):
        for r in range(4096):
            if r % 7:  # every 7th rank is dead
                d.observe(hb(r, gens[r]), float(second))
        dead += d.expired(float(second))
    dead += d.expired(4.0)
    elapsed = time.perf_counter() - t0
    assert sorted(f.rank for f in dead) == [r for r in range(4096) if r % 7 == 0]
    assert elapsed < 30.0, elapsed  # generous: the benchmark measures the real time
