"""``StoreComm``: collectives over a key-value store, ranks as threads on one ``HashStore``
(the same calls as on the agents' ``TCPStore``)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any, Callable

import pytest
import torch.distributed as dist

from ckpt._comm import StoreComm

HANG_GUARD_S = 60.0


def run_ranks(world: int, fn: Callable[[int], Any]) -> list[Any]:
    """``fn(rank)`` on ``world`` threads; returns each result (or the exception it raised)."""
    out: list[Any] = [None] * world

    def body(rank: int) -> None:
        try:
            out[rank] = fn(rank)
        except BaseException as e:  # returned to the test
            out[rank] = e

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return out


def test_gather_and_broadcast_like_a_process_group_and_clean_their_keys() -> None:
    store = dist.HashStore()

    def rank_fn(rank: int) -> Any:
        comm = StoreComm(store, rank, 3, "job/7", timedelta(seconds=30))
        a = comm.all_gather_json({"rank": rank})
        b = comm.broadcast_json("from-1" if rank == 1 else None, src=1)
        c = comm.all_gather_json([rank, rank])
        d = comm.broadcast_json({"x": rank}, src=0)
        return a, b, c, d, comm.leftover_keys()

    results = run_ranks(3, rank_fn)
    for rank, (a, b, c, d, left) in enumerate(results):
        assert a == [{"rank": r} for r in range(3)]
        assert b == "from-1"
        assert c == [[r, r] for r in range(3)]
        assert d == {"x": 0}
        # the first gather's and the first broadcast's keys were deleted by the second gather
        assert left == ((f"job/7/2/{rank}", "job/7/3/0") if rank == 0 else (f"job/7/2/{rank}",))
    assert not store.check(["job/7/0/0"]) and not store.check(["job/7/1/1"])
    # the next use deletes the leftovers after its first gather
    run_ranks(3, lambda r: StoreComm(store, r, 3, "job/8", stale=results[r][4]).all_gather_json(r))
    assert not any(store.check([k]) for res in results for k in res[4])


def test_a_rank_that_never_arrives_times_out_naming_it() -> None:
    store = dist.HashStore()

    def rank_fn(rank: int) -> Any:
        if rank == 2:
            return None  # never calls
        return StoreComm(store, rank, 3, "job/1", timedelta(seconds=0.5)).all_gather_json(rank)

    results = run_ranks(3, rank_fn)
    for rank in (0, 1):
        assert isinstance(results[rank], TimeoutError)
        assert "rank(s) [2] did not arrive" in str(results[rank])


def test_should_abort_abandons_a_call_at_once() -> None:
    store = dist.HashStore()
    seen: list[list[int]] = []

    def abort(missing: list[int]) -> Any:
        seen.append(missing)
        return "rank 1 skipped this step"

    t0 = time.monotonic()
    comm = StoreComm(store, 0, 2, "job/2", timedelta(seconds=HANG_GUARD_S), should_abort=abort)
    with pytest.raises(TimeoutError, match="abandoned: rank 1 skipped this step"):
        comm.all_gather_json("x")
    assert time.monotonic() - t0 < HANG_GUARD_S / 2
    assert seen == [[1]]


def test_bad_rank_is_refused() -> None:
    with pytest.raises(ValueError):
        StoreComm(dist.HashStore(), 2, 2, "p")
