"""One trainer rank of a ``test_hook_*.py`` job: a tiny model trained under ``CheckpointHook``.

``python _hook_worker.py MODE RANK WORLD RDV RUN_ROOT STORAGE OUT [options]``

* ``MODE`` ``dp``: a replicated MLP under ``DistributedDataParallel`` (per-rank batches from the
  per-rank global RNG, captured by the hook); ``tp``: a hand-written tensor-parallel MLP
  (``fc1`` column-split, ``fc2`` row-split, its bias replicated; the same batch on every rank),
  saved with ``Split``/``Replicated`` rules over a ``tp`` layout axis; ``dtensor``: parameters
  are DTensors ``Shard(0)`` on a ``("dp",)`` mesh (no rules: their placements map them);
  ``fsdp``: the MLP under ``torch.distributed.fsdp.fully_shard`` (FSDP2) on a CPU mesh
  ``("dp",)``, a data stream per rank.
* ``RDV``: rendezvous directory (rank 0 binds port 0 and publishes it, see ``_gloo_worker``);
  ``RUN_ROOT/rank<R>``: the rank's hook run directory; ``STORAGE``: the checkpoint root.
* ``OUT``: JSON lines: ``{"restored", "from", "step"}`` first, then ``{"step", "loss"}`` (the
  loss as ``float.hex``) after every optimizer step, then ``{"stats": ...}`` (the hook's
  ``agent_restarts`` and ``published``; not with ``--no-hook``), then ``{"done": true}``.

Options: ``--steps``, ``--persist-every``, ``--grace-s``, ``--step-sleep`` (seconds after each
step: a job to kill runs at a known pace), ``--no-hook`` (the reference run:
plain training, no hook, no agent), ``--dump-at STEP --dump PATH`` (``torch.save`` to ``PATH.format(rank=R)`` the rank's
model and optimizer tensors after that step, for the test to compare with a load).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

IN, HIDDEN, OUT_DIM, BATCH = 16, 32, 4, 8


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (the row-parallel layer's output)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        t = t.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        return grad


class TPMLP(nn.Module):
    """``fc1`` column-parallel, ``fc2`` row-parallel (its bias ``b2`` added after the sum)."""

    def __init__(self, tp: int, coord: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        full1, full2 = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT_DIM)
        k = HIDDEN // tp
        rows = slice(coord * k, (coord + 1) * k)
        self.fc1 = nn.Linear(IN, k)
        self.fc2 = nn.Linear(k, OUT_DIM, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(full1.weight[rows])
            self.fc1.bias.copy_(full1.bias[rows])
            self.fc2.weight.copy_(full2.weight[:, rows])
        self.b2 = nn.Parameter(full2.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = torch.nn.functional.gelu(self.fc1(x)) @ self.fc2.weight.T
        return _SumAcrossRanks.apply(part) + self.b2


class DTensorMLP(nn.Module):
    """Parameters are DTensors sharded on dim 0 over a 1-D mesh ``("dp",)`` (FSDP2-style); the
    forward gathers them (``full_tensor()``), so every rank computes the same thing."""

    def __init__(self, world: int) -> None:
        super().__init__()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT_DIM))
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))

        def shard(p: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))

        self.w1, self.b1 = shard(plain[0].weight), shard(plain[0].bias)
        self.w2, self.b2 = shard(plain[2].weight), shard(plain[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(x @ self.w1.full_tensor().T + self.b1.full_tensor())
        return h @ self.w2.full_tensor().T + self.b2.full_tensor()


def tp_rules(model: TPMLP) -> Any:
    """Split/Replicated rules of the TP model's state under the hook (``state.model``,
    ``state.optim`` with the optimizer's parameter indices)."""
    from ckpt.rules import Replicated, Rules, Split

    dims = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1, "b2": None}
    by_dim: dict[Any, list[str]] = {0: [], 1: [], None: [r"state\.optim\.state\.\d+\.step"]}
    for i, (name, _) in enumerate(model.named_parameters()):  # the optimizer's order
        by_dim[dims[name]] += [re.escape(f"state.model.{name}"), rf"state\.optim\.state\.{i}\.exp_avg(_sq)?"]
    return Rules(
        shards=(
            Split(pattern="|".join(by_dim[0]), dim=0, axis="tp"),
            Split(pattern="|".join(by_dim[1]), dim=1, axis="tp"),
            Replicated(pattern="|".join(by_dim[None])),
        ),
        name="tiny-tp",
    )


def build(mode: str, rank: int, world: int) -> tuple[dict[str, Any], Any, Any, Any]:
    """(state, model to call, rules, layout) of ``mode`` at ``rank`` of ``world``."""
    from ckpt.layout import Layout

    if mode == "dp":
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT_DIM))
        model = nn.parallel.DistributedDataParallel(net) if world > 1 else net
        rules = layout = None
    elif mode == "dtensor":
        model = DTensorMLP(world)
        rules, layout = None, Layout.grid(dp=world, rank=rank)
    elif mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT_DIM))
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        rules, layout = None, Layout.grid(dp=world, rank=rank)
    else:
        model = TPMLP(world, rank)
        rules, layout = tp_rules(model), Layout.grid(tp=world, rank=rank)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    state = {"model": model, "optim": opt, "sched": sched, "data": {"pos": 0}}
    # dp, fsdp: a data stream per rank; tp, dtensor: the same batches on every rank
    torch.manual_seed(1 + rank if mode in ("dp", "fsdp") else 1)
    return state, model, rules, layout


def train_step(state: dict[str, Any], model: Any) -> float:
    x = torch.randn(BATCH, IN)
    y = torch.stack([x[:, : IN // 2].sum(1), x[:, IN // 2 :].sum(1), x.mean(1), x.max(1).values], 1).tanh()
    loss = torch.nn.functional.mse_loss(model(x), y)
    state["optim"].zero_grad()
    loss.backward()
    state["optim"].step()
    state["sched"].step()
    state["data"]["pos"] += BATCH
    return loss.item()


def fingerprint(state: dict[str, Any]) -> dict[str, Any]:
    """The non-model state a resume must restore: RNG, scheduler, learning rate, data position."""
    import hashlib

    return {
        "rng": hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()[:16],
        "sched": state["sched"].state_dict()["last_epoch"],
        "lr": [g["lr"] for g in state["optim"].param_groups],
        "pos": state["data"]["pos"],
    }


def dump(state: dict[str, Any], path: str) -> None:
    def whole(t: torch.Tensor) -> torch.Tensor:  # a DTensor's logical value (a collective)
        return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()

    tensors = {f"model.{k}": whole(v) for k, v in state["model"].state_dict().items()}
    for i, st in state["optim"].state_dict()["state"].items():
        tensors.update({f"optim.{i}.{k}": whole(v) for k, v in st.items() if isinstance(v, torch.Tensor)})
    torch.save(tensors, path)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    for name in ("mode", "rank", "world", "rdv", "run_root", "storage", "out"):
        ap.add_argument(name)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--persist-every", type=int, default=0)
    ap.add_argument("--grace-s", type=float, default=60.0)
    ap.add_argument("--no-hook", action="store_true")
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--dump-at", type=int, default=-1)
    ap.add_argument("--dump", default="")
    a = ap.parse_args(argv)
    rank, world = int(a.rank), int(a.world)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s r{rank} %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _gloo_worker import TIMEOUT, _rendezvous

    dist.init_process_group("gloo", store=_rendezvous(rank, world, a.rdv), rank=rank, world_size=world, timeout=TIMEOUT)
    state, model, rules, layout = build(a.mode, rank, world)
    out = open(a.out, "a")

    def record(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    def loop(start: int, hook: Any) -> None:
        for step in range(start, a.steps):
            loss = train_step(state, model)
            record({"step": step, "loss": loss.hex(), "fp": fingerprint(state)})
            if hook is not None:
                hook.step(step)
            if step == a.dump_at:
                dump(state, a.dump.format(rank=rank))
            time.sleep(a.step_sleep)

    if a.no_hook:
        record({"restored": 0, "from": None, "step": None})
        loop(0, None)
    else:
        from ckpt.hook import CheckpointHook

        hook = CheckpointHook(
            state, a.storage, run_dir=os.path.join(a.run_root, f"rank{rank}"), persist_every=a.persist_every, rules=rules,
            layout=layout, grace_s=a.grace_s, store_host="127.0.0.1", persist_timeout_s=60.0,
        )
        with hook:
            start = hook.restore()
            record({"restored": start, "from": hook.stats["restored_from"], "step": hook.stats["restored_step"], "fp": fingerprint(state)})
            loop(start, hook)
            hook.wait()
            record({"stats": {k: hook.stats[k] for k in ("agent_restarts", "published")}})
    record({"done": True})
    out.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
