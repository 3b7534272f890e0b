"""A small GPT on a generated corpus, checkpointed with ``ckpt.CheckpointHook``.

Single process::

    python examples/train_gpt.py --storage /tmp/gpt-ckpt --steps 200

Data parallel on CPU (gloo)::

    torchrun --nproc-per-node 2 examples/train_gpt.py --storage /tmp/gpt-ckpt --steps 200

Every step is snapshotted into the per-rank agent's shared memory (``python -m agents``, started
by the hook); every ``--persist-every`` steps rank 0's agent writes a checkpoint to ``--storage``.
Kill the trainer (``kill -9``) and start it again: it resumes from the agent's memory, with the
same losses as an uninterrupted run. Tensor and pipeline parallel runs are not part of this
example yet.
"""

from __future__ import annotations

import argparse
import logging
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ckpt.hook import CheckpointHook

log = logging.getLogger("train_gpt")


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int = 128, heads: int = 4, layers: int = 2, ctx: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storage", required=True)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--persist-every", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    torch.manual_seed(0)
    data = corpus(50_000, a.vocab)
    model = GPT(a.vocab, ctx=a.ctx)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    torch.manual_seed(1 + rank)  # per-rank data stream, captured by the hook's RNG state
    run_dir = a.run_dir and os.path.join(a.run_dir, f"rank{rank}")
    # replicas hold the same model: rank 0's agent alone persists (a world-size-1 checkpoint)
    hook = CheckpointHook(
        state={"model": model, "optim": opt, "sched": sched}, storage=a.storage, run_dir=run_dir, persist_every=a.persist_every if rank == 0 else 0, rank=rank
    )
    with hook:
        start = hook.restore()
        log.info("rank %d/%d: starting at step %d (restored from %s)", rank, world, start, hook.stats["restored_from"])
        for step in range(start, a.steps):
            ix = torch.randint(0, len(data) - a.ctx - 1, (a.batch,))
            x = torch.stack([data[i : i + a.ctx] for i in ix])
            y = torch.stack([data[i + 1 : i + a.ctx + 1] for i in ix])
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            hook.step(step)
            if step % 10 == 0 or step == a.steps - 1:
                log.info("rank %d step %d loss %.4f", rank, step, loss.item())
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
