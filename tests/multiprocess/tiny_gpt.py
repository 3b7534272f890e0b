"""A tiny Megatron-style GPT with hand-written TP, PP and DP (ZeRO-1 Adam), on CPU over gloo.

The multi-process layout tests build it at one parallel layout, save, and load at another. Every
layout starts from the same logical model: ``global_params`` draws the full (TP=1) tensors from a
seed and each rank slices its shard out of them (``shard``), so a loss or a checksum can be
compared across layouts.

Ranks are numbered like ``ckpt.layout.Layout.grid`` (axes ``pp, dp, tp``, tp fastest):
``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``.

Local tensor names and tensor-parallel conventions (the ``megatron_gpt`` sharding rules are
written against these, so they are the contract):

* ``embedding.word_embeddings.weight`` ``[padded_vocab/tp, hidden]``, vocab-parallel: padded
  vocab is ``vocab`` rounded up to a multiple of ``pad_to_multiple * tp``; tp rank ``c`` holds
  rows ``[c*padded/tp, (c+1)*padded/tp)``; padding rows are zero and sliced out of the logits.
  First stage only, with ``embedding.position_embeddings.weight`` ``[seq, hidden]`` (replicated).
* ``layers.{i}`` (local index; global ``stage * layers/pp + i``), in this order:
  ``input_layernorm.{weight,bias}`` (replicated), ``attention.qkv.{weight,bias}`` (fused Q, K, V
  rows, each part split by heads separately, see ``head_range``), ``attention.dense.weight``
  ``[hidden, q_heads*head_dim/tp]`` (row-parallel), ``attention.dense.bias`` (replicated, added
  after the all-reduce), ``post_attention_layernorm.{weight,bias}``, ``mlp.gate_up.weight``
  (this rank's gate rows then its up rows), ``mlp.down.weight`` ``[hidden, ffn/tp]``.
* ``final_layernorm.{weight,bias}``: last stage. ``lm_head.weight``: last stage and only when
  ``pp > 1``, a tied copy of the word embeddings (its gradient is summed with the first
  stage's, so both copies stay equal). With ``pp == 1`` the output layer uses the embeddings.

ZeRO-1: a rank's local parameters, in ``model.state_dict()`` order, flattened and concatenated
and zero-padded to a multiple of ``dp``; dp rank ``c`` owns ``[c*P, (c+1)*P)`` and keeps Adam's
``exp_avg`` and ``exp_avg_sq`` for it as 1-D tensors of length ``P``, plus ``step`` (0-d float).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GPTConfig", "Mesh", "Groups", "TinyGPT", "ZeroAdam", "build_groups", "head_range", "local_names",
    "global_name", "global_params", "global_params_shape", "shard", "forward_backward", "sync_model_grads",
    "synthetic_batch", "train_step", "checksums", "combine",
]

# --------------------------------------------------------------------------------------------
# Configuration and mesh
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTConfig:
    """Model and optimizer hyper-parameters (the defaults are the tests' model)."""

    vocab: int = 97
    pad_to_multiple: int = 8
    hidden: int = 32
    layers: int = 4
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    ffn: int = 64
    seq: int = 16
    global_batch: int = 8
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    ln_eps: float = 1e-5

    def padded_vocab(self, tp: int) -> int:
        multiple = self.pad_to_multiple * tp
        return -(-self.vocab // multiple) * multiple

    def rules_kwargs(self) -> dict[str, int]:
        """Keyword arguments of ``ckpt.rules.load_rules("megatron_gpt", ...)`` for this model."""
        return {"vocab_size": self.vocab, "pad_to_multiple": self.pad_to_multiple, "q_heads": self.q_heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim, "ffn": self.ffn, "layers": self.layers}


@dataclass(frozen=True)
class Mesh:
    """One rank's place in a ``pp x dp x tp`` grid (tp fastest, like ``Layout.grid``)."""

    tp: int
    pp: int
    dp: int
    rank: int = 0

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def check(self, cfg: GPTConfig) -> None:
        """Raise ``ValueError`` when ``cfg`` cannot be split over this mesh."""
        problems = []
        if not 0 <= self.rank < self.world:
            problems.append(f"rank {self.rank} outside world {self.world}")
        if cfg.layers % self.pp:
            problems.append(f"layers={cfg.layers} not divisible by pp={self.pp}")
        if cfg.global_batch % self.dp:
            problems.append(f"global batch {cfg.global_batch} not divisible by dp={self.dp}")
        for what, n in (("q_heads", cfg.q_heads), ("ffn", cfg.ffn)):
            if n % self.tp:
                problems.append(f"{what}={n} not divisible by tp={self.tp}")
        if cfg.kv_heads % self.tp and self.tp % cfg.kv_heads:
            problems.append(f"kv_heads={cfg.kv_heads} and tp={self.tp}: neither divides the other")
        if problems:
            raise ValueError(f"mesh tp={self.tp} pp={self.pp} dp={self.dp}: " + "; ".join(problems))


def head_range(n_heads: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """``(first head, count)`` of a part with ``n_heads`` heads held by ``tp_rank``.

    ``n_heads % tp == 0``: an even split. ``n_heads < tp``: one head, replicated over
    ``tp / n_heads`` adjacent ranks (``rank * n_heads // tp``).
    """
    if n_heads % tp == 0:
        return tp_rank * n_heads // tp, n_heads // tp
    if tp % n_heads == 0:
        return tp_rank * n_heads // tp, 1
    raise ValueError(f"{n_heads} heads cannot be split over tp={tp}")


# --------------------------------------------------------------------------------------------
# Global parameters and tensor-parallel slicing
# --------------------------------------------------------------------------------------------

_LAYER_PARAMS = (
    "input_layernorm.weight", "input_layernorm.bias", "attention.qkv.weight", "attention.qkv.bias",
    "attention.dense.weight", "attention.dense.bias", "post_attention_layernorm.weight",
    "post_attention_layernorm.bias", "mlp.gate_up.weight", "mlp.down.weight",
)
_WORD = "embedding.word_embeddings.weight"


def local_names(cfg: GPTConfig, mesh: Mesh) -> list[str]:
    """The rank's local tensor names in ``model.state_dict()`` order (the ZeRO flat order)."""
    names = [_WORD, "embedding.position_embeddings.weight"] if mesh.first_stage else []
    names += [f"layers.{i}.{p}" for i in range(cfg.layers // mesh.pp) for p in _LAYER_PARAMS]
    if mesh.last_stage:
        names += ["final_layernorm.weight", "final_layernorm.bias"] + (["lm_head.weight"] if mesh.pp > 1 else [])
    return names


def global_name(local: str, cfg: GPTConfig, mesh: Mesh) -> str:
    """The logical tensor a local one holds a shard of (``lm_head`` is the word embeddings)."""
    if local == "lm_head.weight":
        return _WORD
    if local.startswith("layers."):
        _, i, rest = local.split(".", 2)
        return f"layers.{mesh.pp_rank * (cfg.layers // mesh.pp) + int(i)}.{rest}"
    return local


def global_params(cfg: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """The full (TP=1, unpadded) parameters, drawn from ``seed`` in a fixed order."""
    gen = torch.Generator().manual_seed(seed)
    H, D, qkv_rows = cfg.hidden, cfg.head_dim, (cfg.q_heads + 2 * cfg.kv_heads) * cfg.head_dim

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    out = {_WORD: normal(cfg.vocab, H, std=0.1), "embedding.position_embeddings.weight": normal(cfg.seq, H, std=0.1)}
    for i in range(cfg.layers):
        p = f"layers.{i}."
        out[p + "input_layernorm.weight"] = normal(H, std=0.05, mean=1.0)
        out[p + "input_layernorm.bias"] = normal(H, std=0.02)
        out[p + "attention.qkv.weight"] = normal(qkv_rows, H, std=0.1)
        out[p + "attention.qkv.bias"] = normal(qkv_rows, std=0.02)
        out[p + "attention.dense.weight"] = normal(H, cfg.q_heads * D, std=0.1)
        out[p + "attention.dense.bias"] = normal(H, std=0.02)
        out[p + "post_attention_layernorm.weight"] = normal(H, std=0.05, mean=1.0)
        out[p + "post_attention_layernorm.bias"] = normal(H, std=0.02)
        out[p + "mlp.gate_up.weight"] = normal(2 * cfg.ffn, H, std=0.1)
        out[p + "mlp.down.weight"] = normal(H, cfg.ffn, std=0.1)
    out["final_layernorm.weight"] = normal(H, std=0.05, mean=1.0)
    out["final_layernorm.bias"] = normal(H, std=0.02)
    return out


def _qkv_rows(cfg: GPTConfig, mesh: Mesh) -> torch.Tensor:
    """Global qkv rows of this tp rank: its q heads, then its k heads, then its v heads."""
    rows, offset, D = [], 0, cfg.head_dim
    for n in (cfg.q_heads, cfg.kv_heads, cfg.kv_heads):
        first, count = head_range(n, mesh.tp, mesh.tp_rank)
        rows.extend(range(offset + first * D, offset + (first + count) * D))
        offset += n * D
    return torch.tensor(rows)


def _split_index(local: str, cfg: GPTConfig, mesh: Mesh) -> Optional[tuple[int, torch.Tensor]]:
    """``(dim, global indices along dim)`` of a local tensor, or None when replicated over tp."""
    tp, c = mesh.tp, mesh.tp_rank
    if local in (_WORD, "lm_head.weight"):
        rows = cfg.padded_vocab(tp) // tp
        return 0, torch.arange(c * rows, (c + 1) * rows)
    if local.endswith("attention.qkv.weight") or local.endswith("attention.qkv.bias"):
        return 0, _qkv_rows(cfg, mesh)
    if local.endswith("attention.dense.weight"):
        first, count = head_range(cfg.q_heads, tp, c)
        return 1, torch.arange(first * cfg.head_dim, (first + count) * cfg.head_dim)
    if local.endswith("mlp.gate_up.weight"):
        part = torch.arange(c * cfg.ffn // tp, (c + 1) * cfg.ffn // tp)
        return 0, torch.cat([part, part + cfg.ffn])
    if local.endswith("mlp.down.weight"):
        return 1, torch.arange(c * cfg.ffn // tp, (c + 1) * cfg.ffn // tp)
    return None


def shard(local: str, full: torch.Tensor, cfg: GPTConfig, mesh: Mesh, fill: float = 0.0) -> torch.Tensor:
    """This rank's slice of the global tensor ``full`` for ``local`` (vocab padded with ``fill``)."""
    if local in (_WORD, "lm_head.weight"):
        pad = full.new_full((cfg.padded_vocab(mesh.tp) - cfg.vocab, full.shape[1]), fill)
        full = torch.cat([full, pad])
    split = _split_index(local, cfg, mesh)
    return full.clone() if split is None else full.index_select(split[0], split[1]).contiguous()


# --------------------------------------------------------------------------------------------
# Process groups and tensor-parallel autograd functions
# --------------------------------------------------------------------------------------------


@dataclass
class Groups:
    """This rank's process groups (None where the group would have one rank)."""

    tp: Any = None
    dp: Any = None
    kv: Any = None  # tp ranks holding the same replicated kv head (tp > kv_heads)
    embed: Any = None  # first and last stage, same (dp, tp): tied embedding copies
    world: bool = False  # a default process group exists


def _group_lists(cfg: GPTConfig, mesh: Mesh) -> Iterator[tuple[str, list[int]]]:
    T, P, D = mesh.tp, mesh.pp, mesh.dp
    for p in range(P):
        for d in range(D):
            yield "tp", [mesh.rank_of(p, d, t) for t in range(T)]
    for p in range(P):
        for t in range(T):
            yield "dp", [mesh.rank_of(p, d, t) for d in range(D)]
    if T > cfg.kv_heads:
        r = T // cfg.kv_heads
        for p in range(P):
            for d in range(D):
                for h in range(cfg.kv_heads):
                    yield "kv", [mesh.rank_of(p, d, t) for t in range(h * r, (h + 1) * r)]
    if P > 1:
        for d in range(D):
            for t in range(T):
                yield "embed", [mesh.rank_of(0, d, t), mesh.rank_of(P - 1, d, t)]


def build_groups(cfg: GPTConfig, mesh: Mesh) -> Groups:
    """Create every group on every rank in the same order (``new_group`` is collective)."""
    groups = Groups(world=mesh.world > 1)
    if mesh.world == 1:
        return groups
    for kind, ranks in _group_lists(cfg, mesh):
        if len(ranks) > 1:
            handle = dist.new_group(ranks)
            if mesh.rank in ranks:
                setattr(groups, kind, handle)
    return groups


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (Megatron's ``f``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Forward sums over the group; identity backward (Megatron's ``g``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    """Forward concatenates the group's tensors on the last dim; backward keeps this rank's part."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.index, n = dist.get_rank(group), dist.get_world_size(group)
        ctx.n = n
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.chunk(ctx.n, dim=-1)[ctx.index].contiguous(), None


def _tp(fn: type[torch.autograd.Function], x: torch.Tensor, group: Any) -> torch.Tensor:
    return x if group is None else fn.apply(x, group)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class _Params(nn.Module):
    """A module that only holds parameters, registered in the order given."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_parameter(name, nn.Parameter(t))


def _params(local: dict[str, torch.Tensor], prefix: str) -> _Params:
    """A ``_Params`` holding ``prefix.weight`` (and ``prefix.bias`` when there is one)."""
    return _Params(**{k.rsplit(".", 1)[1]: v for k, v in local.items() if k.rsplit(".", 1)[0] == prefix})


def _module(**children: nn.Module) -> nn.Module:
    module = nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


class TinyGPT(nn.Module):
    """One pipeline stage of one tensor-parallel rank; ``state_dict()`` keys are the contract."""

    def __init__(self, cfg: GPTConfig, mesh: Mesh, groups: Groups, seed: int) -> None:
        super().__init__()
        mesh.check(cfg)
        self.cfg, self.mesh, self.groups = cfg, mesh, groups
        full = global_params(cfg, seed)
        local = {n: shard(n, full[global_name(n, cfg, mesh)], cfg, mesh) for n in local_names(cfg, mesh)}
        if mesh.first_stage:
            self.embedding = _module(word_embeddings=_params(local, "embedding.word_embeddings"),
                                     position_embeddings=_params(local, "embedding.position_embeddings"))
        self.layers = nn.ModuleList(
            _module(
                input_layernorm=_params(local, f"layers.{i}.input_layernorm"),
                attention=_module(qkv=_params(local, f"layers.{i}.attention.qkv"),
                                  dense=_params(local, f"layers.{i}.attention.dense")),
                post_attention_layernorm=_params(local, f"layers.{i}.post_attention_layernorm"),
                mlp=_module(gate_up=_params(local, f"layers.{i}.mlp.gate_up"),
                            down=_params(local, f"layers.{i}.mlp.down")),
            )
            for i in range(cfg.layers // mesh.pp)
        )
        if mesh.last_stage:
            self.final_layernorm = _Params(weight=local["final_layernorm.weight"], bias=local["final_layernorm.bias"])
            if mesh.pp > 1:
                self.lm_head = _Params(weight=local["lm_head.weight"])
        if list(self.state_dict()) != list(local):
            raise RuntimeError(f"state_dict order {list(self.state_dict())} differs from the contract {list(local)}")

    # -- pieces of the forward pass ----------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup (rows outside this rank's range give zeros), summed over tp."""
        weight = self.embedding.word_embeddings.weight
        start = self.mesh.tp_rank * weight.shape[0]
        outside = (tokens < start) | (tokens >= start + weight.shape[0])
        x = F.embedding((tokens - start).masked_fill(outside, 0), weight).masked_fill(outside.unsqueeze(-1), 0.0)
        x = _tp(_ReduceFromGroup, x, self.groups.tp)
        return x + self.embedding.position_embeddings.weight[: tokens.shape[1]]

    def _norm(self, x: torch.Tensor, ln: nn.Module) -> torch.Tensor:
        return F.layer_norm(x, (self.cfg.hidden,), ln.weight, ln.bias, self.cfg.ln_eps)

    def attention(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        cfg, (b, s, _) = self.cfg, x.shape
        nq = head_range(cfg.q_heads, self.mesh.tp, self.mesh.tp_rank)[1]
        nkv = head_range(cfg.kv_heads, self.mesh.tp, self.mesh.tp_rank)[1]
        h = _tp(_CopyToGroup, self._norm(x, layer.input_layernorm), self.groups.tp)
        qkv = F.linear(h, layer.attention.qkv.weight, layer.attention.qkv.bias)
        q, k, v = qkv.split([nq * cfg.head_dim, nkv * cfg.head_dim, nkv * cfg.head_dim], dim=-1)
        q, k, v = (t.reshape(b, s, -1, cfg.head_dim).transpose(1, 2) for t in (q, k, v))
        k, v = k.repeat_interleave(nq // nkv, dim=1), v.repeat_interleave(nq // nkv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        o = _tp(_ReduceFromGroup, F.linear(o, layer.attention.dense.weight), self.groups.tp)
        return x + o + layer.attention.dense.bias

    def mlp(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        h = _tp(_CopyToGroup, self._norm(x, layer.post_attention_layernorm), self.groups.tp)
        gate, up = F.linear(h, layer.mlp.gate_up.weight).chunk(2, dim=-1)
        o = F.linear(F.silu(gate) * up, layer.mlp.down.weight)
        return x + _tp(_ReduceFromGroup, o, self.groups.tp)

    def head_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of this rank's batch; padding logits are sliced away."""
        out = self.lm_head.weight if self.mesh.pp > 1 else self.embedding.word_embeddings.weight
        h = _tp(_CopyToGroup, self._norm(x, self.final_layernorm), self.groups.tp)
        logits = _tp(_GatherLastDim, F.linear(h, out), self.groups.tp)[..., : self.cfg.vocab]
        return F.cross_entropy(logits.reshape(-1, self.cfg.vocab), labels.reshape(-1))

    def stage_forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.mlp(self.attention(x, layer), layer)
        return x


# --------------------------------------------------------------------------------------------
# Pipeline step, gradient synchronisation, ZeRO-1 Adam
# --------------------------------------------------------------------------------------------


def forward_backward(model: TinyGPT, tokens: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
    """All forward, then all backward (one micro-batch); the loss on the last stage, else None."""
    mesh, cfg = model.mesh, model.cfg
    stride = mesh.dp * mesh.tp  # the same (dp, tp) position one stage away
    shape = (tokens.shape[0], tokens.shape[1], cfg.hidden)
    if mesh.first_stage:
        x_in, x = None, model.embed(tokens)
    else:
        x_in = torch.empty(shape)
        dist.recv(x_in, src=mesh.rank - stride)
        x = x_in.requires_grad_()
    y = model.stage_forward(x)
    loss = None
    if mesh.last_stage:
        loss = model.head_loss(y, labels)
        loss.backward()
    else:
        dist.send(y.detach().contiguous(), dst=mesh.rank + stride)
        grad = torch.empty(shape)
        dist.recv(grad, src=mesh.rank + stride)
        y.backward(grad)
    if x_in is not None:
        dist.send(x_in.grad.contiguous(), dst=mesh.rank - stride)
    return loss


def sync_model_grads(model: TinyGPT) -> None:
    """Sum gradients of replicated kv rows over their tp ranks, and of the tied embedding copies."""
    cfg, mesh, groups = model.cfg, model.mesh, model.groups
    if groups.kv is not None:
        q_rows = head_range(cfg.q_heads, mesh.tp, mesh.tp_rank)[1] * cfg.head_dim
        for layer in model.layers:
            for p in (layer.attention.qkv.weight, layer.attention.qkv.bias):
                kv = p.grad[q_rows:].contiguous()
                dist.all_reduce(kv, group=groups.kv)
                p.grad[q_rows:] = kv
    if groups.embed is not None:
        tied = model.embedding.word_embeddings.weight if mesh.first_stage else model.lm_head.weight
        dist.all_reduce(tied.grad, group=groups.embed)


class ZeroAdam:
    """Adam over a flat vector of the rank's parameters, its state partitioned over dp (ZeRO-1)."""

    def __init__(self, model: TinyGPT) -> None:
        self.cfg, self.mesh, self.groups = model.cfg, model.mesh, model.groups
        self.params = [p for p in model.parameters()]  # same order as state_dict()
        self.numel = sum(p.numel() for p in self.params)
        self.part = -(-self.numel // self.mesh.dp)
        self.exp_avg = torch.zeros(self.part)
        self.exp_avg_sq = torch.zeros(self.part)
        self.step = torch.tensor(0.0)

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors to checkpoint (loading fills them in place)."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step}

    @property
    def bounds(self) -> tuple[int, int]:
        """This dp rank's ``[lo, hi)`` in the padded flat vector."""
        return self.mesh.dp_rank * self.part, (self.mesh.dp_rank + 1) * self.part

    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return F.pad(flat, (0, self.part * self.mesh.dp - self.numel))

    def apply(self) -> None:
        """Average gradients over dp, update this rank's partition, all-gather the parameters."""
        grads = self._flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        if self.groups.dp is not None:
            dist.all_reduce(grads, group=self.groups.dp)
            grads /= self.mesh.dp
        lo, hi = self.bounds
        flat = self._flat([p.detach() for p in self.params])
        g, w = grads[lo:hi], flat[lo:hi].clone()
        (b1, b2), t = self.cfg.betas, float(self.step.add_(1.0))
        self.exp_avg.mul_(b1).add_(g, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.exp_avg_sq / (1 - b2**t)).sqrt_().add_(self.cfg.eps)
        w.addcdiv_(self.exp_avg, denom, value=-self.cfg.lr / (1 - b1**t))
        parts = [torch.empty(self.part) for _ in range(self.mesh.dp)]
        if self.groups.dp is not None:
            dist.all_gather(parts, w, group=self.groups.dp)
        else:
            parts = [w]
        updated, offset = torch.cat(parts), 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(updated[offset: offset + p.numel()].view_as(p))
                offset += p.numel()


def synthetic_batch(cfg: GPTConfig, seed: int, step: int, mesh: Mesh) -> tuple[torch.Tensor, torch.Tensor]:
    """This dp rank's share of step ``step``'s global batch: noisy arithmetic sequences mod vocab."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n, V = cfg.global_batch, cfg.vocab
    start, stride = torch.randint(0, V, (n, 1), generator=gen), torch.randint(1, V, (n, 1), generator=gen)
    seqs = (start + stride * torch.arange(cfg.seq + 1)) % V
    noise = torch.rand(seqs.shape, generator=gen) < 0.1
    seqs = torch.where(noise, torch.randint(0, V, seqs.shape, generator=gen), seqs)
    per = n // mesh.dp
    rows = seqs[mesh.dp_rank * per: (mesh.dp_rank + 1) * per]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def train_step(model: TinyGPT, optim: ZeroAdam, data_seed: int) -> tuple[int, float]:
    """One step on the batch of step ``optim.step + 1``; returns (that step, global mean loss)."""
    step = int(optim.step) + 1
    model.zero_grad(set_to_none=True)
    tokens, labels = synthetic_batch(model.cfg, data_seed, step, model.mesh)
    loss = forward_backward(model, tokens, labels)
    sync_model_grads(model)
    optim.apply()
    mesh = model.mesh
    report = loss.item() / mesh.dp if loss is not None and mesh.tp_rank == 0 else 0.0
    total = torch.tensor(report, dtype=torch.float64)
    if model.groups.world:
        dist.all_reduce(total)  # the dp mean from the last stage, known to every rank
    return step, float(total)


# --------------------------------------------------------------------------------------------
# Checksums of logical tensors (comparable across layouts)
# --------------------------------------------------------------------------------------------


def _owned_over_tp(local: str, cfg: GPTConfig, mesh: Mesh, shape: torch.Size) -> torch.Tensor:
    """Elements this tp rank counts: one copy of each tp replica, none of the tied ``lm_head``."""
    if local == "lm_head.weight":
        return torch.zeros(shape, dtype=torch.bool)
    if _split_index(local, cfg, mesh) is None:
        return torch.full(shape, mesh.tp_rank == 0)
    owned = torch.ones(shape, dtype=torch.bool)
    if "attention.qkv" in local and mesh.tp > cfg.kv_heads:
        q_rows = head_range(cfg.q_heads, mesh.tp, mesh.tp_rank)[1] * cfg.head_dim
        owned[q_rows:] = mesh.tp_rank % (mesh.tp // cfg.kv_heads) == 0
    return owned


def _sums(values: torch.Tensor, index: torch.Tensor, keep: torch.Tensor) -> list[float]:
    """``[sum, index-weighted sum, abs sum]`` in float64 (the weights catch permutations)."""
    keep = keep & (index >= 0)
    v, i = values.double()[keep], index[keep]
    return [float(v.sum()), float((v * (i % 13 + 1).double()).sum()), float(v.abs().sum())]


def checksums(model: TinyGPT, optim: ZeroAdam) -> dict[str, Any]:
    """This rank's share of per-logical-tensor sums; summed over ranks they give global figures.

    Returns ``{"params": {global name: sums}, "exp_avg": ..., "exp_avg_sq": ..., "step": float}``.
    """
    cfg, mesh = model.cfg, model.mesh
    out: dict[str, Any] = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": float(optim.step)}
    lo, hi = optim.bounds
    offset = 0
    for name, p in model.state_dict().items():
        g = global_name(name, cfg, mesh)
        full_shape = global_params_shape(cfg, g)
        index = shard(name, torch.arange(math.prod(full_shape)).reshape(full_shape), cfg, mesh, fill=-1).reshape(-1)
        owned = _owned_over_tp(name, cfg, mesh, p.shape).reshape(-1)
        out["params"][g] = _add(out["params"].get(g), _sums(p.reshape(-1), index, owned & (mesh.dp_rank == 0)))
        a, b = max(lo, offset), min(hi, offset + p.numel())
        if a < b:
            for key, state in (("exp_avg", optim.exp_avg), ("exp_avg_sq", optim.exp_avg_sq)):
                sums = _sums(state[a - lo: b - lo], index[a - offset: b - offset], owned[a - offset: b - offset])
                out[key][g] = _add(out[key].get(g), sums)
        offset += p.numel()
    return out


def _add(a: Optional[list[float]], b: list[float]) -> list[float]:
    return b if a is None else [x + y for x, y in zip(a, b)]


_SHAPES: dict[GPTConfig, dict[str, tuple[int, ...]]] = {}


def global_params_shape(cfg: GPTConfig, name: str) -> tuple[int, ...]:
    """Shape of a logical tensor (unpadded)."""
    if cfg not in _SHAPES:
        _SHAPES[cfg] = {n: tuple(t.shape) for n, t in global_params(cfg, 0).items()}
    return _SHAPES[cfg][name]


def combine(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum ``checksums`` reports over ranks (``step`` must agree)."""
    out: dict[str, Any] = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    steps = {r["step"] for r in per_rank}
    if len(steps) != 1:
        raise ValueError(f"ranks disagree on the optimizer step: {sorted(steps)}")
    out["step"] = steps.pop()
    for report in per_rank:
        for key in ("params", "exp_avg", "exp_avg_sq"):
            for name, sums in report[key].items():
                out[key][name] = _add(out[key].get(name), sums)
    return out

