"""One rank of a ``test_gloo_save_load.py`` job: ``python _gloo_worker.py SCENARIO RANK WORLD ROOT RDV OUT``.

The ranks meet without a port race: rank 0 opens a ``TCPStore`` on port 0 and publishes the
port it got in ``RDV/port``; the others read it. The process group is gloo on loopback, and
``ckpt.save``/``ckpt.load`` pick ``TorchComm`` on their own (no ``comm`` argument). Each rank
writes what it saw to ``OUT`` as JSON (atomically) and exits 0; any exception exits non-zero
with its traceback on stderr.

Scenarios:

* ``roundtrip``: save a state with replicas, rank-local tensors and per-rank plain values,
  then load it into a differently initialised state and report digests of every tensor.
* ``put_fails``: commit step 1, then save step 2 with a store that raises ``OSError`` on
  every data put on rank 1 only; then save step 3 normally.
* ``mismatch``: commit step 1, then save replicas whose shape (step 2) or dtype (step 3)
  differs between the ranks; then save step 4 normally.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

import ckpt
from ckpt._comm import default_comm
from ckpt.errors import SaveFailedError
from ckpt.store.local import LocalStore

#: Every collective and the rendezvous give up after this (the test's watchdog is longer).
TIMEOUT = timedelta(seconds=90)
REPLICATED = ("model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias", "emb", "counts")
RANK_LOCAL = ("rng.noise", "rng.generator")


# --------------------------------------------------------------------------------------------
# States
# --------------------------------------------------------------------------------------------
def build_state(rank: int, seed: int) -> dict[str, Any]:
    """The job's state: replicas depend on ``seed`` only, ``rng`` and ``info`` on the rank."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16))
    emb = torch.randn(512, 64)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    return {
        "model": model,
        "emb": emb,
        "counts": torch.arange(10, dtype=torch.int64) + seed,
        "rng": {"noise": torch.randn(16, generator=gen), "generator": gen.get_state()},
        "info": {"rank": rank, "name": f"worker-{rank}", "lr": 0.01 * (rank + 1), "tags": ["a", rank]},
    }


def tensors_of(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state's tensors by the names ``ckpt`` gives them (before the rank-local prefix)."""
    out = {f"model.{k}": v for k, v in state["model"].state_dict().items()}
    out.update({"emb": state["emb"], "counts": state["counts"]})
    out.update({f"rng.{k}": v for k, v in state["rng"].items()})
    return out


def digest(t: torch.Tensor) -> str:
    """SHA-256 of the tensor's bytes (bit-exact comparison across processes)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{t.dtype}{list(t.shape)}:" + hashlib.sha256(raw).hexdigest()


def digests(state: dict[str, Any]) -> dict[str, str]:
    return {name: digest(t) for name, t in tensors_of(state).items()}


# --------------------------------------------------------------------------------------------
# Stores with injected behaviour
# --------------------------------------------------------------------------------------------
class RecordingStore(LocalStore):
    """A ``LocalStore`` that remembers the keys it wrote."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.written: list[str] = []

    def put(self, key: str, data: Any) -> None:
        super().put(key, data)
        self.written.append(key)


class FailingStore(LocalStore):
    """A ``LocalStore`` whose data puts fail as if the disk were full."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.attempts = 0

    def put(self, key: str, data: Any) -> None:
        if key.startswith("data/"):
            self.attempts += 1
            raise OSError(errno.ENOSPC, f"injected: no space left writing {key}")
        super().put(key, data)


def _failed_save(save: Callable[[], Any]) -> dict[str, Any]:
    """Run a save that should fail; describe how it failed (or that it did not)."""
    try:
        result = save()
    except SaveFailedError as e:
        return {"raised": "SaveFailedError", "failures": {str(r): m for r, m in e.failures.items()},
                "message": str(e), "step": e.step}
    except Exception as e:  # reported, so the test shows what was raised instead
        return {"raised": type(e).__name__, "message": str(e)}
    return {"raised": None, "save_id": result.save_id}


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------
def roundtrip(rank: int, root: str) -> dict[str, Any]:
    state = build_state(rank, seed=1)
    saved = ckpt.save(state, root, step=1, rank_local=("rng",), extras={"job": "gloo"})
    target = build_state(rank, seed=2)  # different values everywhere, same structure
    for t in tensors_of(target).values():
        with torch.no_grad():
            t.zero_()
    before = {n: t.data_ptr() for n, t in tensors_of(target).items()}
    loaded = ckpt.load(target, root)
    after = {n: t.data_ptr() for n, t in tensors_of(loaded.state).items()}
    return {
        "save_id": saved.save_id,
        "rank_bytes": saved.rank_bytes,
        "stored_bytes": saved.stored_bytes,
        "saved": digests(state),
        "loaded": digests(target),
        "in_place": before == after,  # filled the caller's tensors, module parameters included
        "info": loaded.state["info"],
        "loaded_step": loaded.step,
        "loaded_save_id": loaded.save_id,
    }


def put_fails(rank: int, root: str) -> dict[str, Any]:
    state = build_state(rank, seed=1)
    ckpt.save(state, root, step=1)
    store: LocalStore = FailingStore(root) if rank == 1 else RecordingStore(root)
    failed = _failed_save(lambda: ckpt.save(state, store, step=2))
    after = {"steps": ckpt.list_steps(root), "data": LocalStore(root).list("data/")}
    step3 = ckpt.save(state, root, step=3)  # the ranks are still in step with each other
    return {
        "failed": failed,
        "after": after,
        "failing_puts": getattr(store, "attempts", 0),
        "written": getattr(store, "written", []),
        "step3": step3.save_id,
    }


def mismatch(rank: int, root: str) -> dict[str, Any]:
    ckpt.save({"w": torch.zeros(8, 4), "b": torch.ones(3)}, root, step=1)
    wrong_shape = {"w": torch.zeros(8, 4 + rank), "b": torch.ones(3)}
    wrong_dtype = {"w": torch.zeros(8, 4, dtype=torch.float32 if rank == 0 else torch.float64), "b": torch.ones(3)}
    out = {
        "shape": _failed_save(lambda: ckpt.save(wrong_shape, root, step=2)),
        "dtype": _failed_save(lambda: ckpt.save(wrong_dtype, root, step=3)),
        "after": {"steps": ckpt.list_steps(root), "data": LocalStore(root).list("data/")},
    }
    out["step4"] = ckpt.save({"w": torch.zeros(8, 4), "b": torch.ones(3)}, root, step=4).save_id
    return out


SCENARIOS = {"roundtrip": roundtrip, "put_fails": put_fails, "mismatch": mismatch}


# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------
def _rendezvous(rank: int, world: int, rdv: str) -> dist.TCPStore:
    from _rendezvous import rendezvous  # this directory is on sys.path: the worker runs as a script

    return rendezvous(rank, world, rdv, TIMEOUT)


def main(argv: list[str]) -> None:
    scenario, rank, world, root, rdv, out = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4], argv[5]
    torch.set_num_threads(1)
    store = _rendezvous(rank, world, rdv)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        result = SCENARIOS[scenario](rank, root)
        result["comm"] = type(default_comm()).__name__
        dist.barrier()  # every rank finished before any tears the group down
    finally:
        dist.destroy_process_group()
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out)


if __name__ == "__main__":
    main(sys.argv[1:])
