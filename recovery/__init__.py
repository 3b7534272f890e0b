"""recovery: the control plane (membership, failure detection, snapshot registry, restore planning).

Imports ``ckpt`` (never ``agents``) and never imports torch. The decision-making cores are pure
(time and state are arguments): ``FailureDetector``, ``Registry``, ``plan_restore``. ``wire``
alone converts between them and the gRPC protocol ``ckpt.coordinator.v1`` (``proto/``; generated
code in ``recovery/_proto``, produced by ``scripts/gen_proto.py``).
"""

from recovery.detector import Failure, FailureDetector
from recovery.model import (
    CommitReport,
    FencedError,
    Heartbeat,
    HeldRegion,
    InvalidRequest,
    LatestSteps,
    Member,
    PlanItem,
    RestorePlan,
    RestorePlanRequest,
    SnapshotReport,
    Source,
    SourceKind,
    UnrecoverableError,
)
from recovery.planner import CommittedCheckpoint, RestoreView, plan_restore, view_from_registry
from recovery.registry import Commit, JobRegistry, Registry

__all__ = [
    "Commit", "CommitReport", "CommittedCheckpoint", "Failure", "FailureDetector", "FencedError", "Heartbeat",
    "HeldRegion", "InvalidRequest", "JobRegistry", "LatestSteps", "Member", "PlanItem", "Registry", "RestorePlan",
    "RestorePlanRequest", "RestoreView", "SnapshotReport", "Source", "SourceKind", "UnrecoverableError",
    "plan_restore", "view_from_registry",
]
