"""Domain types of the control plane: frozen dataclasses of plain types, no protobuf, no torch.

``recovery.wire`` converts these to and from the protocol (``ckpt.coordinator.v1``); the
detector, registry and planner work only on these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ckpt.layout import Layout
from ckpt.regions import Box

__all__ = [
    "InvalidRequest",
    "FencedError",
    "UnrecoverableError",
    "Member",
    "Heartbeat",
    "HeldRegion",
    "SnapshotReport",
    "CommitReport",
    "LatestSteps",
    "RestorePlanRequest",
    "SourceKind",
    "MembershipEvent",
    "Source",
    "PlanItem",
    "RestorePlan",
]


class InvalidRequest(ValueError):
    """A request field is invalid; the message names the field and what is wrong with it."""


class UnrecoverableError(RuntimeError):
    """No single step can restore every region the new layout needs; the message says which."""


class FencedError(RuntimeError):
    """A member presented an older generation than the one the coordinator holds for its rank.

    The member was replaced (or partitioned and declared failed); it must re-register.
    """


@dataclass(frozen=True)
class Member:
    """One rank's agent in a job.

    Attributes:
        job: job name.
        rank: the rank in ``layout`` (``layout.rank == rank``).
        node: host or node name (members on one node fail together).
        agent_address: ``host:port`` of the agent.
        layout: the job's layout, positioned at this rank.
        generation: fencing token granted at registration (0 before the first).
    """

    job: str
    rank: int
    node: str
    agent_address: str
    layout: Layout
    generation: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.job, self.rank)


@dataclass(frozen=True)
class Heartbeat:
    job: str
    rank: int
    generation: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.job, self.rank)


@dataclass(frozen=True)
class HeldRegion:
    """A region of logical tensor ``tensor`` held in a rank's memory snapshot."""

    tensor: str
    box: Box
    crc32c: int = 0
    nbytes: int = 0


@dataclass(frozen=True)
class SnapshotReport:
    """A rank's report that its snapshot of ``step`` is (or is not yet) complete in memory.

    Attributes:
        parity_held: the rank holds its erasure-coding group's parity for this step.
        parity_group: the erasure-coding group's id, ``""`` when erasure coding is off.
    """

    job: str
    rank: int
    generation: int
    step: int
    layout: Layout
    regions: tuple[HeldRegion, ...] = ()
    parity_held: bool = False
    parity_group: str = ""
    complete: bool = True

    @property
    def key(self) -> tuple[str, int]:
        return (self.job, self.rank)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (the coordinator's store); ``from_json`` reads it back."""
        return {
            "v": 1, "job": self.job, "rank": self.rank, "generation": self.generation, "step": self.step,
            "layout": {"axes": [[n, s] for n, s in self.layout.axes]},
            "regions": [[h.tensor, list(h.box.offsets), list(h.box.sizes), h.crc32c, h.nbytes] for h in self.regions],
            "parity_held": self.parity_held, "parity_group": self.parity_group, "complete": self.complete,
        }

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> "SnapshotReport":
        """Parse ``to_json`` output; ``ValueError`` (``InvalidRequest``) on anything malformed."""
        try:
            if obj["v"] != 1:
                raise InvalidRequest(f"snapshot record version {obj['v']!r} is unknown (this build reads 1)")
            layout = Layout(tuple((str(n), int(s)) for n, s in obj["layout"]["axes"]), int(obj["rank"]))
            regions = tuple(HeldRegion(str(t), Box(tuple(map(int, o)), tuple(map(int, z))), int(c), int(b))
                            for t, o, z, c, b in obj["regions"])
            return SnapshotReport(str(obj["job"]), int(obj["rank"]), int(obj["generation"]), int(obj["step"]), layout,
                                  regions, bool(obj["parity_held"]), str(obj["parity_group"]), bool(obj["complete"]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, InvalidRequest):
                raise
            raise InvalidRequest(f"malformed snapshot record: {e!r}") from None


@dataclass(frozen=True)
class CommitReport:
    job: str
    rank: int
    generation: int
    step: int
    manifest_key: str


@dataclass(frozen=True)
class LatestSteps:
    recoverable: Optional[int] = None
    committed: Optional[int] = None
    committed_manifest_key: str = ""


@dataclass(frozen=True)
class RestorePlanRequest:
    job: str
    target_layout: Layout
    failed_ranks: tuple[int, ...] = ()
    allow_approximate: bool = False
    for_rank: Optional[int] = None


@dataclass(frozen=True)
class MembershipEvent:
    """A change in a job's membership (``kind``: JOINED, LEFT, FAILED, FENCED)."""

    sequence: int
    kind: str
    job: str
    rank: int
    node: str
    generation: int
    time_unix_ms: int


class SourceKind(enum.IntEnum):
    """Where a region comes from; the value orders exact sources by cost (cheapest first)."""

    OWN_MEMORY = 1
    PEER_REPLICA = 2
    PARITY_DECODE = 3
    STORAGE = 4
    NEIGHBOUR_REBUILD = 5  # approximate: chosen only when allowed and no exact source exists

    @property
    def approximate(self) -> bool:
        return self is SourceKind.NEIGHBOUR_REBUILD


@dataclass(frozen=True)
class Source:
    """One source of a region.

    Attributes:
        kind: the rung of the recovery ladder.
        ranks: the old rank serving it (memory, replica); the surviving ranks of the parity
            group (decode); the neighbouring stages' ranks (rebuild); empty for storage.
        agent_address: the serving agent (memory, replica).
        manifest_key: the committed manifest (storage).
        parity_group: the erasure-coding group (decode).
    """

    kind: SourceKind
    ranks: tuple[int, ...] = ()
    agent_address: str = ""
    manifest_key: str = ""
    parity_group: str = ""


@dataclass(frozen=True)
class PlanItem:
    """Fill ``box`` of logical tensor ``tensor`` from ``source``."""

    tensor: str
    box: Box
    source: Source

    @property
    def approximate(self) -> bool:
        return self.source.kind.approximate


@dataclass(frozen=True)
class RestorePlan:
    """One globally consistent step and, per new rank, the regions to fetch and from where."""

    step: int
    ranks: dict[int, tuple[PlanItem, ...]] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()

    @property
    def approximate(self) -> bool:
        return any(i.approximate for items in self.ranks.values() for i in items)

    def explain(self) -> str:
        """Why each source was chosen, one line per decision (what ``--explain`` prints)."""
        return "\n".join(self.reasons)
