"""The few collectives a save or load needs, behind a small injectable interface.

Payloads are JSON documents sent as bytes (never pickle, also on the wire). ``TorchComm`` runs
them on a dedicated gloo group so checkpoint metadata never shares a communicator (or a CUDA
stream) with training collectives.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any, Optional, Protocol

__all__ = ["Comm", "LocalComm", "TorchComm", "ThreadGroup", "default_comm"]


class Comm(Protocol):
    """What ``save``/``load`` need from the job's process group."""

    rank: int
    world_size: int

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, indexed by rank (JSON-serialisable values only)."""

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from ``src`` on every rank."""


class LocalComm:
    """A single process: rank 0 of 1."""

    rank = 0
    world_size = 1

    def all_gather_json(self, obj: Any) -> list[Any]:
        return [json.loads(json.dumps(obj))]

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        return json.loads(json.dumps(obj))


class TorchComm:
    """Collectives over ``torch.distributed`` (a gloo group of the same ranks)."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._user_group = group
        self._group: Any = None
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _pg(self) -> Any:
        if self._group is None:
            backend = self._dist.get_backend(self._user_group)
            if backend == "gloo":
                self._group = self._user_group
            else:  # NCCL and friends: keep metadata on CPU, on a group of its own
                ranks = None if self._user_group is None else self._dist.get_process_group_ranks(self._user_group)
                self._group = self._dist.new_group(ranks=ranks, backend="gloo")
        return self._group

    def all_gather_json(self, obj: Any) -> list[Any]:
        import torch

        group = self._pg()
        data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._dist.all_gather(sizes, size, group=group)
        longest = max(int(s.item()) for s in sizes)
        buf = torch.zeros(longest, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        self._dist.all_gather(bufs, buf, group=group)
        return [json.loads(bytes(b[: int(s.item())].numpy()).decode("utf-8")) for b, s in zip(bufs, sizes)]

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        return self.all_gather_json(obj if self.rank == src else None)[src]


class ThreadGroup:
    """In-process collectives for ranks that are threads: a test and tool helper, not for jobs.

    ``group = ThreadGroup(4)``; thread ``r`` passes ``comm=group.comm(r)`` to ``save``/``load``.
    Every collective is a rendezvous of all ranks (one per call, matched by each rank's call
    count), and payloads are JSON round-tripped, as on the wire. A rank that waits longer than
    ``timeout`` raises ``TimeoutError`` naming the ranks that never arrived, and so do the
    others waiting on the same call: a test that loses a rank fails instead of hanging.

    Args:
        world_size: number of ranks (threads).
        timeout: how long one collective waits for the slowest rank.
    """

    def __init__(self, world_size: int, *, timeout: timedelta = timedelta(seconds=120)) -> None:
        if type(world_size) is not int or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        self.world_size = world_size
        self.timeout = timeout
        self._cond = threading.Condition()
        self._rounds: dict[int, dict[str, Any]] = {}  # call number -> {"data", "left", "error"}

    def comm(self, rank: int) -> "Comm":
        """The ``Comm`` of rank ``rank`` (use it from one thread only)."""
        if type(rank) is not int or not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank!r} is outside the group's {self.world_size} ranks")
        return _ThreadComm(self, rank)

    def _gather(self, rank: int, call: int, payload: str) -> list[Any]:
        with self._cond:
            rnd = self._rounds.setdefault(call, {"data": {}, "left": self.world_size, "error": None})
            rnd["data"][rank] = payload
            self._cond.notify_all()
            done = self._cond.wait_for(
                lambda: rnd["error"] is not None or len(rnd["data"]) == self.world_size,
                timeout=self.timeout.total_seconds(),
            )
            if not done and rnd["error"] is None:
                missing = sorted(set(range(self.world_size)) - set(rnd["data"]))
                rnd["error"] = (
                    f"collective #{call} of a ThreadGroup of {self.world_size}: rank(s) {missing} did not "
                    f"arrive within {self.timeout.total_seconds():g} s (they failed, hang, or made fewer calls)"
                )
                self._cond.notify_all()
            rnd["left"] -= 1
            if rnd["left"] == 0:
                del self._rounds[call]
            if rnd["error"] is not None:
                raise TimeoutError(f"rank {rank}: {rnd['error']}")
            return [json.loads(rnd["data"][r]) for r in range(self.world_size)]


class _ThreadComm:
    """One thread-rank's view of a ``ThreadGroup``."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self._group = group
        self._calls = 0
        self.rank = rank
        self.world_size = group.world_size

    def all_gather_json(self, obj: Any) -> list[Any]:
        payload = json.dumps(obj, separators=(",", ":"))  # fails here, like TorchComm, if not JSON
        call, self._calls = self._calls, self._calls + 1
        return self._group._gather(self.rank, call, payload)

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        return self.all_gather_json(obj if self.rank == src else None)[src]


def default_comm(group: Optional[Any] = None) -> Comm:
    """``TorchComm`` when ``torch.distributed`` is initialised with more than one rank, else local."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch always ships it
        return LocalComm()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        return TorchComm(group)
    return LocalComm()
