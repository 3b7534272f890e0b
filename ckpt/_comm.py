"""The few collectives a save or load needs, behind a small injectable interface.

Payloads are JSON documents sent as bytes (never pickle, also on the wire). ``TorchComm`` runs
them on a dedicated gloo group so checkpoint metadata never shares a communicator (or a CUDA
stream) with training collectives.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional, Protocol

__all__ = ["Comm", "LocalComm", "TorchComm", "ThreadGroup", "StoreComm", "default_comm"]


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


class StoreComm:
    """Collectives over a ``torch.distributed.Store`` (``TCPStore``, ``FileStore``): no process
    group, so processes that are not a job's ranks (the per-rank agents) can save together.

    Call ``n`` of rank ``r`` sets the key ``<prefix>/<n>/<r>`` and waits for every rank's key of
    call ``n``; ``broadcast_json`` waits only for the source's key. A rank's own keys of earlier
    calls are deleted once a later ``all_gather_json`` completes (every rank has then read
    them); the keys of the calls after the last gather are returned by ``leftover_keys()`` and
    may be passed as ``stale`` to the next ``StoreComm`` of the same ranks, which deletes them
    after its first gather. Every call gives up after ``timeout`` with ``TimeoutError`` naming
    the ranks that never arrived: use a fresh ``prefix`` per use (e.g. per save) so a late rank
    never reads an abandoned call.

    Args:
        store: the key-value store all ranks share.
        rank, world_size: this rank and the number of ranks.
        prefix: the key prefix of this use (unique per save, e.g. ``<job token>/<step>``).
        timeout: how long one call waits for the slowest rank.
        stale: own keys of an earlier ``StoreComm`` to delete after the first gather.
        should_abort: called with the ranks still missing while a call waits (about twice a
            second); a returned string abandons the call at once with ``TimeoutError`` saying
            it (e.g. a missing rank is known to have skipped this save).
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        prefix: str,
        timeout: timedelta = timedelta(seconds=300),
        *,
        stale: tuple[str, ...] = (),
        should_abort: Optional[Callable[[list[int]], Optional[str]]] = None,
    ) -> None:
        if type(world_size) is not int or world_size < 1 or type(rank) is not int or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank!r} of world size {world_size!r} is not valid")
        self._store = store
        self.rank = rank
        self.world_size = world_size
        self.prefix = prefix.rstrip("/")
        self.timeout = timeout
        self._calls = 0
        self._mine: list[str] = list(stale)
        self._should_abort = should_abort

    def _key(self, call: int, rank: int) -> str:
        return f"{self.prefix}/{call}/{rank}"

    def _missing(self, ranks: list[int], keys: list[str]) -> list[int]:
        return [r for r, k in zip(ranks, keys) if not self._store.check([k])]

    def _wait(self, call: int, ranks: list[int]) -> list[Any]:
        # polled with check() (store.wait() logs a warning at every timeout), so that the
        # caller can abandon a call that cannot complete
        keys = [self._key(call, r) for r in ranks]
        where = f"rank {self.rank}: collective #{call} under {self.prefix!r}"
        t0 = time.monotonic()
        deadline, next_abort_check, pause = t0 + self.timeout.total_seconds(), t0 + 0.5, 0.001
        try:
            while not self._store.check(keys):
                now = time.monotonic()
                if now >= deadline:
                    raise TimeoutError(
                        f"{where}: rank(s) {self._missing(ranks, keys)} did not arrive within "
                        f"{self.timeout.total_seconds():g} s (they failed, hang, or never got this step)"
                    )
                if self._should_abort is not None and now >= next_abort_check:
                    next_abort_check = now + 0.5
                    reason = self._should_abort(self._missing(ranks, keys))
                    if reason:
                        raise TimeoutError(f"{where}: abandoned: {reason}")
                time.sleep(pause)
                pause = min(0.05, pause * 2)
            return [json.loads(self._store.get(k).decode("utf-8")) for k in keys]
        except TimeoutError:
            raise
        except Exception as e:  # DistNetworkError and friends: the store's host is gone
            raise TimeoutError(f"{where}: the store failed ({type(e).__name__}: {e}); is its host (rank 0's agent) gone?") from e

    def all_gather_json(self, obj: Any) -> list[Any]:
        payload = json.dumps(obj, separators=(",", ":"))
        call, self._calls = self._calls, self._calls + 1
        key = self._key(call, self.rank)
        self._store.set(key, payload)
        out = self._wait(call, list(range(self.world_size)))
        for old in self._mine:  # every rank set a key of this call: all read the older ones
            try:
                self._store.delete_key(old)
            except Exception:  # cleanup only
                pass
        self._mine = [key]
        return out

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        call, self._calls = self._calls, self._calls + 1
        if self.rank == src:
            key = self._key(call, src)
            payload = json.dumps(obj, separators=(",", ":"))
            self._store.set(key, payload)
            self._mine.append(key)
            return json.loads(payload)
        return self._wait(call, [src])[0]

    def leftover_keys(self) -> tuple[str, ...]:
        """This rank's keys not yet deleted (pass as ``stale`` to the next ``StoreComm``)."""
        return tuple(self._mine)


def default_comm(group: Optional[Any] = None) -> Comm:
    """``TorchComm`` when ``torch.distributed`` is initialised with more than one rank, else local."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch always ships it
        return LocalComm()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        return TorchComm(group)
    return LocalComm()
