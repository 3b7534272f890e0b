"""One rank of a ``bench_reshard.py`` job: ``python _reshard_worker.py JOB_JSON RANK WORLD RDV OUT``.

The ranks meet as in ``tests/multiprocess/_gloo_worker.py``: rank 0 opens a ``TCPStore`` on
port 0 and publishes the port in ``RDV/port``; the process group is gloo on loopback (also for
one rank, so that DTensor has a mesh). Each rank runs with one intra-op thread, writes what it
measured to ``OUT`` as JSON (atomically) and exits 0; any exception exits non-zero with its
traceback on stderr.

The job (JSON) names a role:

* ``save``: every rank builds its shards of the logical matrices at ``tp = WORLD`` and saves
  them once with ``ckpt.save`` and once with ``torch.distributed.checkpoint.save`` (DTensors
  on a 1-D CPU mesh), each timed between barriers.
* ``load``: every rank allocates zero shards at ``tp = WORLD`` and loads both checkpoints
  ``warmup + runs`` times, ckpt and DCP alternating (which goes first alternates too). Each
  load is timed between barriers; around it the rank reads its ``/proc/self/io`` counters.
  The first round compares every loaded shard with the logical data (outside the timing);
  with ``drop_caches`` rank 0 drops the page cache between two barriers before every load;
  with ``profile`` one more load of each method runs under cProfile on rank 0 (ckpt twice:
  with its default threads, and with ``io_threads=1`` so that the profile sees the reads).

The logical data is a pure function of the tensor and the element's global index (below), so
every rank computes exactly its own region and nothing else: no rank materialises 1 GiB.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time
import warnings
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import ckpt
from ckpt.layout import Layout
from ckpt.rules import Rules, Split

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import drop_page_cache, proc_io  # noqa: E402

#: Every collective and the rendezvous give up after this (the parent's watchdog is longer).
TIMEOUT = timedelta(seconds=300)
#: Knuth's multiplicative hash constant: neighbouring elements get unrelated values.
_MUL = 2654435761
_MASK = (1 << 24) - 1  # float32 holds every integer below 2**24 exactly


# --------------------------------------------------------------------------------------------
# The logical state and its shards
# --------------------------------------------------------------------------------------------
def rules() -> Rules:
    """Column-parallel ``*.w_in`` split on dim 0, row-parallel ``*.w_out`` split on dim 1."""
    return Rules(shards=(Split(r".*\.w_in", dim=0), Split(r".*\.w_out", dim=1)), name="bench_reshard")


def region(t: dict[str, Any], tp: int, coord: int) -> tuple[slice, slice]:
    """Rows and columns of the logical matrix ``t`` held by TP coordinate ``coord`` of ``tp``."""
    rows, cols, dim = int(t["rows"]), int(t["cols"]), int(t["dim"])
    size = (rows if dim == 0 else cols) // tp
    part = slice(coord * size, (coord + 1) * size)
    return (part, slice(0, cols)) if dim == 0 else (slice(0, rows), part)


def logical(index: int, t: dict[str, Any], rows: slice, cols: slice) -> torch.Tensor:
    """``t[rows, cols]`` of the logical matrix number ``index``: a hash of the global index."""
    r = torch.arange(rows.start, rows.stop, dtype=torch.int64).mul_(int(t["cols"]))
    c = torch.arange(cols.start, cols.stop, dtype=torch.int64)
    idx = r[:, None] + c[None, :]
    idx.mul_(_MUL).add_(index * 7919 + 1).bitwise_and_(_MASK)
    return idx.to(torch.float32)


def build_shards(spec: list[dict[str, Any]], tp: int, coord: int) -> dict[str, torch.Tensor]:
    return {t["name"]: logical(i, t, *region(t, tp, coord)) for i, t in enumerate(spec)}


def zero_shards(spec: list[dict[str, Any]], tp: int) -> dict[str, torch.Tensor]:
    out = {}
    for t in spec:
        rows, cols = region(t, tp, 0)
        out[t["name"]] = torch.zeros(rows.stop - rows.start, cols.stop - cols.start, dtype=torch.float32)
    return out


def as_dtensors(shards: dict[str, torch.Tensor], spec: list[dict[str, Any]], mesh: Any) -> dict[str, DTensor]:
    dims = {t["name"]: int(t["dim"]) for t in spec}
    return {n: DTensor.from_local(s, mesh, [Shard(dims[n])], run_check=False) for n, s in shards.items()}


def check(what: str, spec: list[dict[str, Any]], shards: dict[str, torch.Tensor], tp: int, coord: int) -> None:
    """Every loaded shard equals the logical data; raises naming the first that does not."""
    for i, t in enumerate(spec):
        want = logical(i, t, *region(t, tp, coord))
        if not torch.equal(shards[t["name"]], want):
            raise RuntimeError(f"{what}: rank at tp coordinate {coord} of {tp} loaded wrong data into {t['name']}")


# --------------------------------------------------------------------------------------------
# Timing between barriers
# --------------------------------------------------------------------------------------------
def timed_collective(fn: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """Barrier, run ``fn``, barrier. Returns this rank's figures and ``fn``'s result.

    ``seconds`` is this rank's own time from the common start to the end of its work (the
    job's wall time is the maximum over ranks); ``io`` holds the ``/proc/self/io`` deltas.
    """
    dist.barrier()
    io0 = proc_io()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    io1 = proc_io()
    dist.barrier()
    wall = time.perf_counter() - start
    io = {k: io1[k] - io0.get(k, 0) for k in ("rchar", "read_bytes", "wchar", "write_bytes") if k in io1}
    return {"seconds": seconds, "seconds_to_barrier": wall, "io": io}, result


def profiled(fn: Callable[[], Any], top: int = 30) -> str:
    """cProfile text of one call of ``fn`` (cumulative time, top ``top`` entries)."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------------
def save_role(job: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    spec = job["tensors"]
    shards = build_shards(spec, world, rank)
    mesh = init_device_mesh("cpu", (world,))
    layout, rl = Layout.grid(tp=world, rank=rank), rules()
    report: dict[str, Any] = {"held_bytes": sum(s.nbytes for s in shards.values())}

    def ckpt_save() -> Any:
        return ckpt.save(shards, job["ckpt_dir"], step=1, layout=layout, rules=rl, compression=None,
                         io_threads=job.get("io_threads"))

    report["ckpt"], saved = timed_collective(ckpt_save)
    report["ckpt"]["rank_bytes"] = saved.rank_bytes
    state = as_dtensors(shards, spec, mesh)
    report["dcp"], _ = timed_collective(lambda: dcp.save(state, checkpoint_id=job["dcp_dir"]))
    return report


def load_role(job: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    spec = job["tensors"]
    mesh = init_device_mesh("cpu", (world,))
    layout, rl = Layout.grid(tp=world, rank=rank), rules()
    ck_state = zero_shards(spec, world)
    dcp_local = zero_shards(spec, world)
    dcp_state = as_dtensors(dcp_local, spec, mesh)
    io_threads = job.get("io_threads")
    report: dict[str, Any] = {"held_bytes": sum(s.nbytes for s in ck_state.values()), "rounds": []}
    last: dict[str, Any] = {}

    def ckpt_load() -> None:
        last["ckpt"] = ckpt.load(ck_state, job["ckpt_dir"], layout=layout, rules=rl, io_threads=io_threads)

    def dcp_load() -> None:
        dcp.load(dcp_state, checkpoint_id=job["dcp_dir"])

    loads = {"ckpt": (ckpt_load, ck_state), "dcp": (dcp_load, dcp_local)}
    for r in range(-int(job["warmup"]), int(job["runs"])):
        order = ["ckpt", "dcp"] if r % 2 == 0 else ["dcp", "ckpt"]
        record: dict[str, Any] = {"run": r, "warmup": r < 0, "order": order}
        for name in order:
            fn, target = loads[name]
            for t in target.values():
                t.zero_()
            if job["drop_caches"]:
                dist.barrier()
                if rank == 0:
                    record.setdefault("drop_caches_error", drop_page_cache())
            figures, _ = timed_collective(fn)
            if name == "ckpt":
                figures["bytes_read"] = last["ckpt"].bytes_read
                figures["library_seconds"] = last["ckpt"].seconds
            record[name] = figures
            if r == -int(job["warmup"]):  # once per job, outside the timing
                check(name, spec, target, world, rank)
        report["rounds"].append(record)
    if job.get("profile"):

        def ckpt_load_one_thread() -> None:  # cProfile sees the calling thread only
            ckpt.load(ck_state, job["ckpt_dir"], layout=layout, rules=rl, io_threads=1)

        calls = {name: fn for name, (fn, _) in loads.items()} | {"ckpt io_threads=1": ckpt_load_one_thread}
        report["profile"] = profile_loads(calls, rank, bool(job["drop_caches"]))
    return report


def profile_loads(calls: dict[str, Callable[[], Any]], rank: int, drop_caches: bool) -> dict[str, str]:
    """One more load per entry of ``calls`` on every rank, under cProfile on rank 0."""
    out = {}
    for name, fn in calls.items():
        if drop_caches:
            dist.barrier()
            if rank == 0:
                drop_page_cache()
        dist.barrier()
        if rank == 0:
            out[name] = profiled(fn)
        else:
            fn()
        dist.barrier()
    return out


ROLES = {"save": save_role, "load": load_role}


# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------
def _rendezvous(rank: int, world: int, rdv: str) -> dist.TCPStore:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multiprocess"))
    from _rendezvous import rendezvous

    return rendezvous(rank, world, rdv, TIMEOUT)


def main(argv: list[str]) -> None:
    job, rank, world, rdv, out = json.loads(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module=r"torch\.distributed")
    store = _rendezvous(rank, world, rdv)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        result = ROLES[job["role"]](job, rank, world)
        result["rank"] = rank
        dist.barrier()  # every rank finished before any tears the group down
    finally:
        dist.destroy_process_group()
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out)


if __name__ == "__main__":
    main(sys.argv[1:])
