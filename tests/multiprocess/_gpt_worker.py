"""One rank of a ``test_gpt_layouts.py`` job.

``python _gpt_worker.py --rank R --world W --store-port P --tp T --pp P --dp D --job JSON --out PATH``

The test process hosts the ``TCPStore`` (bound to port 0, so jobs never race for a port) and
passes its port; with ``--world 1`` there is no process group at all. The rank builds the tiny
GPT of ``tiny_gpt`` from ``init_seed`` at its layout, runs the job's actions in order, and writes
what it saw to ``--out`` as JSON (atomically). Any exception exits non-zero with its traceback.

The job is ``{"init_seed": int, "data_seed": int, "actions": [...]}``; actions:

* ``{"op": "train", "steps": n}``: n training steps; the batch of step k depends on
  ``data_seed`` and k only, and k continues from the optimizer's (possibly loaded) step.
* ``{"op": "save", "url": u, "step": n, "mode": "layout" | "rank_local"}``: ``layout`` saves
  logical tensors through ``Layout`` and the ``megatron_gpt`` rules; ``rank_local`` keeps every
  rank's tensors as they are (loadable at the same layout only).
* ``{"op": "load", "url": u, "mode": ...}``: fills the model and optimizer state in place.
* ``{"op": "checksums", "tag": t}``: records ``tiny_gpt.checksums`` and per-tensor digests.

The report: ``{"rank", "coords", "losses": {step: loss}, "checksums": {tag: ...},
"digests": {tag: {local name: sha256}}, "loaded_steps": [...], "seconds": {"save": [...], "load": [...]}}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_gpt as gpt  # noqa: E402

#: Every collective and the rendezvous give up after this (the test's watchdog is longer).
TIMEOUT = timedelta(seconds=90)


def digest(t: torch.Tensor) -> str:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()[:16]


class Rank:
    """The rank's model, optimizer and report while the job's actions run."""

    def __init__(self, cfg: gpt.GPTConfig, mesh: gpt.Mesh, job: dict[str, Any]) -> None:
        self.cfg, self.mesh, self.job = cfg, mesh, job
        self.model = gpt.TinyGPT(cfg, mesh, gpt.build_groups(cfg, mesh), seed=int(job["init_seed"]))
        self.optim = gpt.ZeroAdam(self.model)
        self.report: dict[str, Any] = {
            "rank": mesh.rank,
            "coords": {"pp": mesh.pp_rank, "dp": mesh.dp_rank, "tp": mesh.tp_rank},
            "losses": {}, "checksums": {}, "digests": {}, "loaded_steps": [], "seconds": {"save": [], "load": []},
        }

    def state(self) -> dict[str, Any]:
        """What is checkpointed: local tensors that share storage with the parameters."""
        return {"model": dict(self.model.state_dict()), "optim": self.optim.state()}

    def _layout_args(self) -> dict[str, Any]:
        from ckpt.layout import Layout
        from ckpt.rules import load_rules

        layout = Layout.grid(tp=self.mesh.tp, pp=self.mesh.pp, dp=self.mesh.dp, rank=self.mesh.rank)
        return {"layout": layout, "rules": load_rules("megatron_gpt", **self.cfg.rules_kwargs())}

    def train(self, steps: int) -> None:
        for _ in range(steps):
            step, loss = gpt.train_step(self.model, self.optim, int(self.job["data_seed"]))
            self.report["losses"][str(step)] = loss

    def save(self, url: str, step: int, mode: str) -> None:
        import ckpt

        started = time.perf_counter()
        if mode == "layout":
            ckpt.save(self.state(), url, step=step, **self._layout_args())
        else:
            ckpt.save(self.state(), url, step=step, rank_local=("model", "optim"))
        self.report["seconds"]["save"].append(time.perf_counter() - started)

    def load(self, url: str, mode: str) -> None:
        import ckpt

        state = self.state()
        before = {n: t.data_ptr() for n, t in state["model"].items()}
        extra = self._layout_args() if mode == "layout" else {}
        started = time.perf_counter()
        result = ckpt.load(state, url, **extra)
        self.report["seconds"]["load"].append(time.perf_counter() - started)
        if {n: t.data_ptr() for n, t in state["model"].items()} != before:
            raise RuntimeError(f"rank {self.mesh.rank}: ckpt.load replaced model tensors instead of filling them")
        self.report["loaded_steps"].append(result.step)

    def checksums(self, tag: str) -> None:
        self.report["checksums"][tag] = gpt.checksums(self.model, self.optim)
        tensors = {f"model.{n}": t for n, t in self.model.state_dict().items()}
        tensors.update({f"optim.{n}": t for n, t in self.optim.state().items()})
        self.report["digests"][tag] = {n: digest(t) for n, t in tensors.items()}

    def run(self) -> dict[str, Any]:
        for action in self.job["actions"]:
            op = action["op"]
            if op == "train":
                self.train(int(action["steps"]))
            elif op == "save":
                self.save(action["url"], int(action["step"]), action.get("mode", "layout"))
            elif op == "load":
                self.load(action["url"], action.get("mode", "layout"))
            elif op == "checksums":
                self.checksums(action["tag"])
            else:
                raise ValueError(f"unknown action {op!r} in job {self.job}")
        return self.report


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    for name in ("--rank", "--world", "--store-port", "--tp", "--pp", "--dp"):
        parser.add_argument(name, type=int, required=name != "--store-port", default=0)
    parser.add_argument("--job", type=json.loads, required=True, help="the job, as JSON")
    parser.add_argument("--out", required=True, help="where to write this rank's report (JSON)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    mesh = gpt.Mesh(tp=args.tp, pp=args.pp, dp=args.dp, rank=args.rank)
    if mesh.world != args.world:
        raise ValueError(f"--world {args.world} but tp*pp*dp = {mesh.world}")
    if args.world > 1:
        store = dist.TCPStore("127.0.0.1", args.store_port, args.world, is_master=False, timeout=TIMEOUT)
        dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world, timeout=TIMEOUT)
    try:
        report = Rank(gpt.GPTConfig(), mesh, args.job).run()
        if args.world > 1:
            dist.barrier()  # every rank finished before any tears the group down
    finally:
        if args.world > 1:
            dist.destroy_process_group()
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
