"""A small GPT on a generated corpus, checkpointed with ``ckpt.CheckpointHook``.

Single process::

    python examples/train_gpt.py --storage /tmp/gpt-ckpt --steps 200

Data parallel on CPU (gloo), two ranks::

    torchrun --nproc-per-node 2 examples/train_gpt.py --storage /tmp/gpt-ckpt --steps 200

Tensor parallel, pipeline parallel, or both with data parallel (the data-parallel size is
``world / (tp * pp)``; ranks are ordered ``pp, dp, tp``, tensor-parallel ranks adjacent)::

    torchrun --nproc-per-node 2 examples/train_gpt.py --storage /tmp/gpt-tp --tp 2
    torchrun --nproc-per-node 2 examples/train_gpt.py --storage /tmp/gpt-pp --pp 2 --microbatches 2
    torchrun --nproc-per-node 8 examples/train_gpt.py --storage /tmp/gpt-3d --tp 2 --pp 2

The parallelism is written by hand over gloo. Tensor parallel (Megatron style): the fused QKV and
the MLP up projection are column-parallel (attention heads split over the tp ranks), the
attention output and MLP down projections row-parallel, with one all-reduce each in the forward
pass and one in the backward pass; embeddings, layer norms and the LM head are replicated.
Pipeline parallel: the blocks are split evenly into stages; a GPipe schedule runs every
micro-batch forward (activations sent to the next stage), then every one backward (gradients
sent to the previous stage); the loss is computed on the last stage and all-reduced for the log.
Data parallel: gradients are averaged with one all-reduce over the data-parallel group. The
``--batch`` sequences of a step are drawn from the step number alone and split over the
data-parallel ranks, and every layout starts from the same logical weights (the full model is
initialised from ``--seed``, each rank keeps its slice), so runs are deterministic on CPU.

Every step is snapshotted into the per-rank agent's shared memory (``python -m agents``, started
by the hook); every ``--persist-every`` steps the agents of all ranks write one checkpoint of
the job to ``--storage``. Kill the trainers (``kill -9``) and start the job again with the same
arguments: it resumes from the agents' memory (the newest step every rank holds) with the same
losses as an uninterrupted run. The hook is given this rank's ``ckpt.layout.Layout`` (axes ``pp, dp,
tp``) and sharding rules (``gpt_rules``) naming the logical tensors, so a restore from storage
reads a checkpoint written at another layout: with a run directory whose agents are gone, the
``--tp 2 --pp 2`` checkpoint above resumes in one process or at ``--tp 2`` on four ranks::

    python examples/train_gpt.py --storage /tmp/gpt-3d --run-dir /tmp/gpt-3d-single
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ckpt.hook import CheckpointHook
from ckpt.layout import Layout
from ckpt.rules import Fused, Pipeline, Replicated, Rules, Split
from ckpt.snapshot import SnapshotPolicy

log = logging.getLogger("train_gpt")


@dataclass(frozen=True)
class Config:
    """Model sizes (the logical model, independent of the layout)."""

    vocab: int = 256
    dim: int = 128
    heads: int = 4
    layers: int = 2
    ctx: int = 64

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


# ------------------------------------------------------------------------------------ parallelism


@dataclass(frozen=True)
class Parallel:
    """This rank's place in the ``pp x dp x tp`` grid and its process groups (None: size 1)."""

    layout: Layout
    tp_group: Any = None
    dp_group: Any = None

    def size(self, axis: str) -> int:
        return self.layout.size(axis)

    def coord(self, axis: str) -> int:
        return self.layout.coord(axis)

    @property
    def first_stage(self) -> bool:
        return self.coord("pp") == 0

    @property
    def last_stage(self) -> bool:
        return self.coord("pp") == self.size("pp") - 1

    @property
    def stage_stride(self) -> int:
        """Rank distance between the same (dp, tp) position on adjacent stages."""
        return self.size("dp") * self.size("tp")


def build_parallel(tp: int, pp: int) -> Parallel:
    """Create the tp and dp groups (every rank creates every group, in the same order)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world % (tp * pp):
        raise SystemExit(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    layout = Layout.grid(pp=pp, dp=world // (tp * pp), tp=tp, rank=rank)
    groups: dict[str, Any] = {}
    for axis in ("tp", "dp"):
        if layout.size(axis) == 1:
            continue
        for r in range(world):  # one group per distinct set of ranks, lowest member first
            ranks = layout.with_rank(r).group(axis)
            if ranks[0] == r:
                group = dist.new_group(list(ranks))
                if rank in ranks:
                    groups[axis] = group
    return Parallel(layout, groups.get("tp"), groups.get("dp"))


class _CopyToTP(torch.autograd.Function):
    """Identity forward; the backward sums the input gradient over the tp group."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """The forward sums the partial outputs over the tp group; identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _copy_to_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    return x if group is None else _CopyToTP.apply(x, group)


def _reduce_from_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    return x if group is None else _ReduceFromTP.apply(x, group)


# ------------------------------------------------------------------------------------------ model


class Block(nn.Module):
    """Pre-norm block; ``attn.qkv``/``mlp.up`` column-parallel, ``attn.out``/``mlp.down`` row-parallel."""

    def __init__(self, cfg: Config, tp: int = 1, tp_group: Any = None) -> None:
        super().__init__()
        self.cfg, self.tp_group, self.local_heads = cfg, tp_group, cfg.heads // tp
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(cfg.dim, 3 * cfg.dim // tp)  # this rank's q heads, k heads, v heads
        self.attn.out = nn.Linear(cfg.dim // tp, cfg.dim)  # bias added once, after the all-reduce
        self.mlp = nn.Module()
        self.mlp.up = nn.Linear(cfg.dim, 4 * cfg.dim // tp)
        self.mlp.down = nn.Linear(4 * cfg.dim // tp, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = _copy_to_tp(self.ln1(x), self.tp_group)
        q, k, v = (z.reshape(b, t, self.local_heads, self.cfg.head_dim).transpose(1, 2) for z in self.attn.qkv(h).chunk(3, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + _reduce_from_tp(F.linear(o, self.attn.out.weight), self.tp_group) + self.attn.out.bias
        h = _copy_to_tp(self.ln2(x), self.tp_group)
        o = F.linear(F.gelu(self.mlp.up(h)), self.mlp.down.weight)
        return x + _reduce_from_tp(o, self.tp_group) + self.mlp.down.bias


class GPT(nn.Module):
    """One pipeline stage of one tensor-parallel rank (the whole model when ``tp = pp = 1``).

    The first stage holds ``tok``/``pos``, every stage ``blocks.<local index>``, the last stage
    ``ln``/``head``."""

    def __init__(self, cfg: Config, par: Optional[Parallel] = None) -> None:
        super().__init__()
        par = par or Parallel(Layout.single())
        self.cfg, self.par = cfg, par
        tp, pp = par.size("tp"), par.size("pp")
        if par.first_stage:
            self.tok, self.pos = nn.Embedding(cfg.vocab, cfg.dim), nn.Embedding(cfg.ctx, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, tp, par.tp_group) for _ in range(cfg.layers // pp))
        if par.last_stage:
            self.ln = nn.LayerNorm(cfg.dim)
            self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1]))

    def stage(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.ln(x)).flatten(0, 1), targets.flatten())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits of a whole (``tp = pp = 1``) model."""
        return self.head(self.ln(self.stage(self.embed(idx))))


def global_name(local: str, cfg: Config, par: Parallel) -> str:
    """The logical (``tp = pp = 1``) name of a local parameter."""
    if local.startswith("blocks."):
        _, i, rest = local.split(".", 2)
        return f"blocks.{par.coord('pp') * (cfg.layers // par.size('pp')) + int(i)}.{rest}"
    return local


def tp_slice(name: str, full: torch.Tensor, cfg: Config, tp: int, c: int) -> torch.Tensor:
    """Tensor-parallel rank ``c``'s slice of the logical tensor ``full`` (``name`` local or global)."""
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        per = cfg.heads // tp  # the fused rows are [q heads, k heads, v heads]: each part by heads
        parts = full.reshape(3, cfg.heads, cfg.head_dim, *full.shape[1:])[:, c * per : (c + 1) * per]
        return parts.reshape(3 * per * cfg.head_dim, *full.shape[1:]).clone()
    if name.endswith("mlp.up.weight") or name.endswith("mlp.up.bias"):
        return full.chunk(tp, dim=0)[c].clone()
    if name.endswith("attn.out.weight") or name.endswith("mlp.down.weight"):
        return full.chunk(tp, dim=1)[c].clone()
    return full.clone()


def build_model(cfg: Config, par: Parallel, seed: int) -> GPT:
    """This rank's stage and slice of the logical model initialised from ``seed`` (the same
    logical weights at every layout)."""
    torch.manual_seed(seed)
    full = GPT(cfg).state_dict()
    model = GPT(cfg, par)
    tp, c = par.size("tp"), par.coord("tp")
    model.load_state_dict({n: tp_slice(n, full[global_name(n, cfg, par)], cfg, tp, c) for n in model.state_dict()})
    return model


class NamedAdamW(torch.optim.AdamW):
    """AdamW whose ``state_dict`` keys the per-parameter state by parameter name, not position.

    Positions differ between pipeline stages; names (made global by the rules' ``Pipeline``
    rename) do not. The state is created up front, exactly as AdamW's first step would, so a
    restore through sharding rules (which fills the state's own tensors) has tensors to fill.
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], **kwargs: Any) -> None:
        self.names = [n for n, _ in named]
        super().__init__([p for _, p in named], **kwargs)
        for _, p in named:
            self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        groups = [{**g, "params": [self.names[i] for i in g["params"]]} for g in sd["param_groups"]]
        return {"state": {self.names[i]: s for i, s in sd["state"].items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Hyper-parameters from ``state_dict``'s groups, the parameters of this rank's own (a
        checkpoint of another layout lists another stage's parameters)."""
        index = {n: i for i, n in enumerate(self.names)}
        mine = super().state_dict()["param_groups"]
        if len(mine) != len(state_dict["param_groups"]):
            raise ValueError(f"{len(state_dict['param_groups'])} parameter groups in the state dict, {len(mine)} in the optimizer")
        groups = [{**g, "params": own["params"]} for g, own in zip(state_dict["param_groups"], mine)]
        super().load_state_dict({"state": {index[n]: s for n, s in state_dict["state"].items()}, "param_groups": groups})


def build_optimizer(model: GPT, steps: int) -> tuple[NamedAdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a 20-step warm-up and a cosine decay over ``steps``."""
    opt = NamedAdamW(list(model.named_parameters()), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def gpt_rules(cfg: Config) -> Rules:
    """Sharding rules for the hook's state ``{"state": {"model", "optim", "sched"}, "rng"}``
    (the scheduler holds no tensors).

    ``Pipeline`` renames make block indices global; the tensor-parallel weights (and their AdamW
    moments) are ``Fused`` (QKV, split by heads per part) or ``Split``; the rest is replicated.
    """
    model, optim, blk = r"state\.model\.", r"state\.optim\.state\.", r"blocks\.\d+\."
    moments = r"\.(exp_avg|exp_avg_sq)"
    qkv = (("q", cfg.heads), ("k", cfg.heads), ("v", cfg.heads))
    replicated = r"(tok|pos|head)\.weight|ln\.(weight|bias)|" + blk + r"(ln1\.(weight|bias)|ln2\.(weight|bias)|attn\.out\.bias|mlp\.down\.bias)"
    shards: list[Any] = []
    for prefix, suffix in ((model, ""), (optim, moments)):
        shards += [
            Fused(prefix + blk + r"attn\.qkv\.(weight|bias)" + suffix, dim=0, parts=qkv, unit=cfg.head_dim),
            Split(prefix + blk + r"attn\.out\.weight" + suffix, dim=1),
            Split(prefix + blk + r"mlp\.up\.(weight|bias)" + suffix, dim=0),
            Split(prefix + blk + r"mlp\.down\.weight" + suffix, dim=1),
            Replicated(prefix + "(" + replicated + ")" + suffix),
        ]
    shards += [
        Replicated(optim + r".+\.step"),
        # the hook's RNG states: kept per rank (outside these rules) under torch.distributed,
        # plain tensors of the only rank in a single process
        Replicated(r"rng\..+"),
    ]
    renames = tuple(Pipeline(p + r"blocks\.(?P<layer>\d+)\..+", layers=cfg.layers) for p in (model, optim))
    return Rules(renames, tuple(shards), name="train_gpt", description="examples/train_gpt.py: hand-written tp, pp, dp")


# ------------------------------------------------------------------------------------- training


def corpus(n_tokens: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """A generated corpus with structure to learn: a noisy order-2 Markov chain."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab, vocab), generator=g)
    out = torch.empty(n_tokens, dtype=torch.long)
    out[:2] = torch.randint(0, vocab, (2,), generator=g)
    noise = torch.rand(n_tokens, generator=g) < 0.1
    rand = torch.randint(0, vocab, (n_tokens,), generator=g)
    for i in range(2, n_tokens):
        out[i] = rand[i] if noise[i] else table[out[i - 2], out[i - 1]]
    return out


def batch(data: torch.Tensor, step: int, seed: int, size: int, ctx: int, par: Parallel) -> tuple[torch.Tensor, torch.Tensor]:
    """This data-parallel rank's share of step ``step``'s ``size`` sequences (from the step alone)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ix = torch.randint(0, len(data) - ctx - 1, (size,), generator=g)
    per, d = size // par.size("dp"), par.coord("dp")
    ix = ix[d * per : (d + 1) * per]
    return torch.stack([data[i : i + ctx] for i in ix]), torch.stack([data[i + 1 : i + ctx + 1] for i in ix])


def forward_backward(model: GPT, x: torch.Tensor, y: torch.Tensor, micro: int) -> Optional[torch.Tensor]:
    """GPipe: every micro-batch forward, then every one backward. The loss on the last stage."""
    par, stride = model.par, model.par.stage_stride
    ins, outs, losses = [], [], []
    for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
        h_in = None
        if par.first_stage:
            h = model.embed(xm)
        else:
            h_in = torch.empty(xm.shape[0], xm.shape[1], model.cfg.dim)
            dist.recv(h_in, src=par.layout.rank - stride)
            h = h_in.requires_grad_()
        h = model.stage(h)
        if par.last_stage:
            losses.append(model.loss(h, ym) / micro)
        else:
            dist.send(h.detach().contiguous(), dst=par.layout.rank + stride)
        ins.append(h_in)
        outs.append(h)
    for m in reversed(range(micro)):
        if par.last_stage:
            losses[m].backward()
        else:
            grad = torch.empty_like(outs[m])
            dist.recv(grad, src=par.layout.rank + stride)
            outs[m].backward(grad)
        if ins[m] is not None:
            dist.send(ins[m].grad.contiguous(), dst=par.layout.rank - stride)
    return torch.stack(losses).sum().detach() if losses else None


def average_grads(model: GPT) -> None:
    """Average the gradients over the data-parallel group (one all-reduce)."""
    group, n = model.par.dp_group, model.par.size("dp")
    if group is None:
        return
    params = [p for p in model.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    flat /= n
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def global_loss(loss: Optional[torch.Tensor], par: Parallel) -> float:
    """The data-parallel mean of the last stage's losses, on every rank."""
    if not dist.is_initialized():
        return float(loss)
    mine = float(loss) / par.size("dp") if loss is not None and par.coord("tp") == 0 else 0.0
    total = torch.tensor(mine, dtype=torch.float64)
    dist.all_reduce(total)
    return float(total)


def train_step(model: GPT, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor, y: torch.Tensor, micro: int) -> float:
    """One optimizer step on this rank's batch; returns the job's mean loss (on every rank)."""
    opt.zero_grad(set_to_none=True)
    loss = global_loss(forward_backward(model, x, y, micro), model.par)
    average_grads(model)
    opt.step()
    sched.step()
    return loss


# ------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Launch with torchrun for --tp/--pp/data parallel; see the module docstring.")
    ap.add_argument("--storage", required=True, help="URL or path of the persisted checkpoints")
    ap.add_argument("--run-dir", default=None, help="local directory shared with the agents, one subdirectory per rank (default: under the temp dir, named after --storage)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--persist-every", type=int, default=50, help="the agents persist every this many steps (0: never)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step, split over the data-parallel ranks")
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (divides the 4 heads)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (divides --layers)")
    ap.add_argument("--microbatches", type=int, default=1, help="micro-batches per step (GPipe schedule)")
    ap.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    ap.add_argument("--grace-s", type=float, default=30.0, help="how long an agent keeps the snapshots after its trainer died or exited")
    ap.add_argument("--loss-file", default=None, help="rank 0 appends one JSON line {step, loss} per step")
    ap.add_argument("--backpressure", choices=("skip", "wait"), default="skip",
                    help="when every snapshot slot is busy (the agent is behind): skip that step's snapshot (default: training never waits) or wait for a slot")
    return ap.parse_args(argv)


def check_args(a: argparse.Namespace, cfg: Config, par: Parallel) -> None:
    problems = []
    if cfg.heads % a.tp:
        problems.append(f"--tp {a.tp} does not divide the {cfg.heads} heads")
    if cfg.layers % a.pp:
        problems.append(f"--pp {a.pp} does not divide --layers {cfg.layers}")
    if a.batch % (par.size("dp") * a.microbatches):
        problems.append(f"--batch {a.batch} is not divisible by dp*microbatches = {par.size('dp')}*{a.microbatches}")
    if problems:
        raise SystemExit("train_gpt: " + "; ".join(problems))


def default_run_dir(storage: str) -> str:
    """A run directory under the system temp dir, named after the storage."""
    return os.path.join(tempfile.gettempdir(), "train_gpt-" + hashlib.sha1(storage.encode()).hexdigest()[:10])


def main(argv: Optional[list[str]] = None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    cfg = Config(vocab=a.vocab, ctx=a.ctx, layers=a.layers)
    par = build_parallel(a.tp, a.pp)
    check_args(a, cfg, par)
    rank, world = par.layout.rank, par.layout.world_size
    data = corpus(50_000, a.vocab)
    model = build_model(cfg, par, a.seed)
    opt, sched = build_optimizer(model, a.steps)
    # one directory per rank: a run directory holds one rank's slot table
    run_dir = os.path.join(a.run_dir or default_run_dir(a.storage), f"rank{rank}")
    # every rank's agent persists its part, together one checkpoint of the job (the same
    # persist_every on every rank; replicas are written once)
    state = {"model": model, "optim": opt, "sched": sched}
    hook = CheckpointHook(
        state=state, storage=a.storage, run_dir=run_dir, persist_every=a.persist_every, rules=gpt_rules(cfg), layout=par.layout, rank=rank, grace_s=a.grace_s,
        policy=SnapshotPolicy(backpressure=a.backpressure),
    )
    losses = open(a.loss_file, "a") if a.loss_file and rank == 0 else None
    try:
        with hook:
            start = hook.restore()
            log.info("rank %d/%d (%s): starting at step %d (restored from %s)", rank, world, par.layout.describe(), start, hook.stats["restored_from"])
            for step in range(start, a.steps):
                x, y = batch(data, step, a.seed, a.batch, a.ctx, par)
                loss = train_step(model, opt, sched, x, y, a.microbatches)
                hook.step(step)
                if losses is not None:
                    losses.write(json.dumps({"step": step, "loss": loss}) + "\n")
                    losses.flush()
                if step % 10 == 0 or step == a.steps - 1:
                    log.info("rank %d step %d loss %.4f", rank, step, loss)
    finally:
        if losses is not None:
            losses.close()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
