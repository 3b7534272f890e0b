"""The few collectives a save or load needs, behind a small injectable interface.

Payloads are JSON documents sent as bytes (never pickle, also on the wire). ``TorchComm`` runs
them on a dedicated gloo group so checkpoint metadata never shares a communicator (or a CUDA
stream) with training collectives.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Protocol

__all__ = ["Comm", "LocalComm", "TorchComm", "default_comm"]


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


def default_comm(group: Optional[Any] = None) -> Comm:
    """``TorchComm`` when ``torch.distributed`` is initialised with more than one rank, else local."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch always ships it
        return LocalComm()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        return TorchComm(group)
    return LocalComm()
