"""A pure heartbeat failure detector with generation fencing: no threads, time is an argument.

Members are ``(job, rank)`` keys. ``admit`` grants a member a fresh **generation** (a fencing
token, unique and increasing within a job); every later heartbeat or report must present it.
A member declared failed by ``expired`` loses its generation, so a stale or partitioned process
that wakes up cannot report into the job's new generation: it gets ``FencedError`` and must
re-register (which gives it a new generation).

Detection bound: ``expired(now)`` returns a member once ``now - last_heartbeat >= timeout``.
Called every ``interval`` (the service's sweep), a dead member is detected no earlier than
``timeout`` and no later than ``timeout + interval`` after its last heartbeat.

Time: ``now`` is float seconds (any monotonic origin) or an aware/naive ``datetime``; durations
are ``timedelta`` or float seconds. One detector must be fed one kind of ``now``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, Union

from recovery.model import FencedError

__all__ = ["FailureDetector", "Failure", "DEFAULT_INTERVAL", "DEFAULT_TIMEOUT"]

Instant = Union[float, int, datetime]
Duration = Union[float, int, timedelta]

#: Defaults detect a dead agent within timeout + interval = 3 s.
DEFAULT_INTERVAL = timedelta(milliseconds=500)
DEFAULT_TIMEOUT = timedelta(milliseconds=2500)


class _Keyed(Protocol):
    job: str
    rank: int
    generation: int


def _seconds(d: Duration, what: str) -> float:
    s = d.total_seconds() if isinstance(d, timedelta) else float(d)
    if not s > 0:
        raise ValueError(f"{what} must be positive, got {d!r}")
    return s


def _instant(now: Instant) -> float:
    return now.timestamp() if isinstance(now, datetime) else float(now)


@dataclass(frozen=True)
class Failure:
    """A member declared failed: its last heartbeat and when the sweep noticed (seconds)."""

    job: str
    rank: int
    generation: int
    last_seen: float
    detected: float

    @property
    def latency(self) -> float:
        """Seconds from the last heartbeat to detection."""
        return self.detected - self.last_seen


@dataclass
class _Live:
    generation: int
    last_seen: float


class FailureDetector:
    """Heartbeat bookkeeping for the members of many jobs.

    Args:
        interval: how often members heartbeat and the owner calls ``expired``.
        timeout: silence after which a member is declared failed (must be >= interval).
    """

    def __init__(self, interval: Duration = DEFAULT_INTERVAL, timeout: Duration = DEFAULT_TIMEOUT) -> None:
        self.interval = _seconds(interval, "interval")
        self.timeout = _seconds(timeout, "timeout")
        if self.timeout < self.interval:
            raise ValueError(f"timeout {self.timeout}s is shorter than the heartbeat interval {self.interval}s")
        self._live: dict[tuple[str, int], _Live] = {}
        self._epoch: dict[str, int] = {}  # job -> last generation granted or revoked
        self._heap: list[tuple[float, str, int, int]] = []  # (deadline, job, rank, generation)

    # -- membership ------------------------------------------------------------------------------
    def admit(self, member: _Keyed, now: Instant) -> int:
        """(Re-)register ``member`` and return its new generation; any older one is fenced."""
        gen = self._bump(member.job)
        self._touch((member.job, member.rank), gen, _instant(now))
        return gen

    def restore_epoch(self, job: str, generation: int) -> None:
        """After a restart: never grant a generation at or below ``generation`` again."""
        self._epoch[job] = max(self._epoch.get(job, 0), generation)

    def epoch(self, job: str) -> int:
        """The job's current generation (the last one granted or revoked)."""
        return self._epoch.get(job, 0)

    def observe(self, member: _Keyed, now: Instant) -> None:
        """A heartbeat (or any call) from ``member``; ``FencedError`` when its generation is stale."""
        self.check(member)
        self._touch((member.job, member.rank), member.generation, _instant(now))

    def check(self, member: _Keyed) -> None:
        """Raise ``FencedError`` unless ``member.generation`` is the live one for its rank."""
        live = self._live.get((member.job, member.rank))
        if live is None:
            raise FencedError(
                f"job {member.job!r} rank {member.rank} generation {member.generation} is not a live member "
                "(declared failed or never registered); re-register to get a new generation")
        if member.generation != live.generation:
            raise FencedError(
                f"job {member.job!r} rank {member.rank} presented generation {member.generation} but the live "
                f"member holds generation {live.generation}; this process was replaced: re-register")

    def leave(self, job: str, rank: int) -> None:
        """A graceful departure: forget the member (its generation is fenced from now on)."""
        if self._live.pop((job, rank), None) is not None:
            self._bump(job)

    def live(self, job: str) -> dict[int, int]:
        """``{rank: generation}`` of the job's live members."""
        return {r: m.generation for (j, r), m in self._live.items() if j == job}

    def live_count(self) -> int:
        """How many members of all jobs are live."""
        return len(self._live)

    # -- detection -------------------------------------------------------------------------------
    def expired(self, now: Instant) -> list[Failure]:
        """Members silent for at least ``timeout``, each returned once, in detection order.

        They are removed and their job's generation moves on, fencing them.
        """
        t = _instant(now)
        out: list[Failure] = []
        while self._heap and self._heap[0][0] <= t:
            deadline, job, rank, gen = heapq.heappop(self._heap)
            live = self._live.get((job, rank))
            if live is None or live.generation != gen or live.last_seen + self.timeout != deadline:
                continue  # superseded by a later heartbeat or registration
            del self._live[(job, rank)]
            self._bump(job)
            out.append(Failure(job, rank, gen, live.last_seen, t))
        return out

    def next_deadline(self) -> float | None:
        """The earliest instant at which ``expired`` may return something (seconds)."""
        while self._heap:
            deadline, job, rank, gen = self._heap[0]
            live = self._live.get((job, rank))
            if live is not None and live.generation == gen and live.last_seen + self.timeout == deadline:
                return deadline
            heapq.heappop(self._heap)
        return None

    # -- internals -------------------------------------------------------------------------------
    def _bump(self, job: str) -> int:
        self._epoch[job] = self._epoch.get(job, 0) + 1
        return self._epoch[job]

    def _touch(self, key: tuple[str, int], gen: int, t: float) -> None:
        live = self._live.get(key)
        if live is not None and live.generation == gen and t < live.last_seen:
            return  # an out-of-order (older) heartbeat never moves the deadline back
        self._live[key] = _Live(gen, t)
        heapq.heappush(self._heap, (t + self.timeout, key[0], key[1], gen))
