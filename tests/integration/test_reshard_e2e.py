"""Threads-as-ranks resharding, end to end: real ``ckpt.save``/``ckpt.load`` over a ``ThreadGroup``.

A tiny "model" (vocab-parallel embedding, fused QKV with GQA, column/row-parallel weights with
even and uneven splits, replicated norms, pipeline-renumbered layers, an LM head tied to the
embedding on the last stage, and a ZeRO flat optimizer state over dp) is built as logical
tensors, cut for every rank of a source layout by the slicers below, saved with rules, and
loaded by every rank of a target layout; each loaded tensor must equal the logical tensors
bit for bit, padding zero. The slicers are written from the rule conventions
(``docs/layouts.md``), independently of ``ckpt.rules``.
"""

from __future__ import annotations

import re
import threading
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt._comm import Comm, ThreadGroup
from ckpt.layout import Layout
from ckpt.rules import Fused, Pipeline, Replicated, Rules, Split, Tied, Vocab, ZeroFlat
from ckpt.store import open_store

DTYPES = (torch.float32, torch.bfloat16, torch.int64)
Q_HEADS, KV_HEADS, HEAD_DIM = 4, 2, 3  # GQA: at tp=4 each KV head is held by two ranks
VOCAB_MULTIPLE = 4
#: Source padding (never saved); the loader must zero padding, so targets start at SENTINEL.
POISON, SENTINEL = 99, 7
_OBJECT = re.compile(r"^r(\d{5})-\d{4}\.bin$")
#: Parameters in the flat optimizer state: all of them, including the tied head and the unevenly
#: split weights, whose flat offsets differ between the ranks that replicate them (the save
#: planner refines such replica regions into common cells).
ALL_PARAMS = r"(embed|lm_head|final_norm|layers\.\d+\.[a-z]+)\.weight"
ZERO_PARAMS = ALL_PARAMS


# -- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """Sizes and dtypes of the logical tensors; every layout cuts the same ones."""

    hidden: int
    layers: int
    vocab: int
    even: int  # size of the evenly split dims (a multiple of 12: divides over tp 1..4)
    col_rows: int  # uneven (torch.chunk) dim 0
    row_cols: int  # uneven dim 1
    fused: bool  # QKV present (GQA needs tp in 1, 2, 4 on both sides)
    dtypes: tuple[tuple[str, torch.dtype], ...]
    align: int
    partition: str
    seed: int
    zero_params: str = ZERO_PARAMS

    def dtype(self, kind: str) -> torch.dtype:
        return dict(self.dtypes)[kind]

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Logical name -> (shape, dtype); ``optim.exp_avg.<param>`` for every parameter."""
        h = self.hidden
        out = {"embed.weight": ((self.vocab, h), self.dtype("embed"))}
        for i in range(self.layers):
            if self.fused:
                out[f"layers.{i}.qkv.weight"] = (((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, h), self.dtype("qkv"))
            out[f"layers.{i}.up.weight"] = ((self.even, h), self.dtype("up"))
            out[f"layers.{i}.down.weight"] = ((h, self.even), self.dtype("down"))
            out[f"layers.{i}.colu.weight"] = ((self.col_rows, h), self.dtype("colu"))
            out[f"layers.{i}.rowu.weight"] = ((h, self.row_cols), self.dtype("rowu"))
            out[f"layers.{i}.norm.weight"] = ((h,), self.dtype("norm"))
        out["final_norm.weight"] = ((), self.dtype("norm"))
        params = [(n, s) for n, (s, _) in out.items() if re.fullmatch(self.zero_params, n)]
        out.update({f"optim.exp_avg.{n}": (s, torch.float32) for n, s in params})
        out["optim.step"] = ((), torch.int64)
        return out

    def logical(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        out = {}
        for name, (shape, dtype) in self.shapes().items():
            if dtype == torch.int64:
                out[name] = torch.randint(-(1 << 40), 1 << 40, shape, generator=g, dtype=torch.int64)
            else:
                out[name] = torch.randn(shape, generator=g).to(dtype)
        return out

    def rules(self) -> Rules:
        shards: list[Any] = [
            Vocab(r"embed\.weight", size=self.vocab, pad_to_multiple=VOCAB_MULTIPLE),
            Split(r"layers\.\d+\.up\.weight", dim=0),
            Split(r"layers\.\d+\.down\.weight", dim=1),
            Split(r"layers\.\d+\.colu\.weight", dim=0, global_size=self.col_rows),
            Split(r"layers\.\d+\.rowu\.weight", dim=1, global_size=self.row_cols),
            Replicated(r"layers\.\d+\.norm\.weight|final_norm\.weight|optim\.step"),
            ZeroFlat(r"optim\.exp_avg", params=(self.zero_params,),
                     template="optim.exp_avg.{param}", axis="dp", align=self.align, partition=self.partition),
        ]
        if self.fused:
            shards.append(Fused(r"layers\.\d+\.qkv\.weight", parts=(("q", Q_HEADS), ("k", KV_HEADS), ("v", KV_HEADS)), unit=HEAD_DIM))
        renames = (Pipeline(r"layers\.(?P<layer>\d+)\..+", axis="pp", layers=self.layers), Tied(r"lm_head\.weight", "embed.weight"))
        return Rules(renames=renames, shards=tuple(shards), name="e2e")


# -- independent slicers (written from the conventions) ------------------------------------------


def cut_even(g: torch.Tensor, dim: int, n: int, c: int) -> torch.Tensor:
    k = g.shape[dim] // n
    return g.narrow(dim, c * k, k)


def cut_chunk(g: torch.Tensor, dim: int, n: int, c: int) -> torch.Tensor:
    """torch.chunk pieces of ceil(G / n); trailing ranks shorter or empty."""
    total = g.shape[dim]
    k = -(-total // n)
    start = min(c * k, total)
    return g.narrow(dim, start, min(k, total - start))


def cut_fused(g: torch.Tensor, parts: Sequence[int], unit: int, n: int, c: int) -> torch.Tensor:
    """Megatron fused QKV: each part's heads split over n ranks; fewer heads than ranks -> each
    head shared by n // heads consecutive ranks."""
    out, start = [], 0
    for heads in parts:
        section = g[start : start + heads * unit]
        start += heads * unit
        per_head = list(section.split(unit))
        out += per_head[c * heads // n : (c + 1) * heads // n] if heads >= n else [per_head[c // (n // heads)]]
    return torch.cat(out)


def cut_vocab(g: torch.Tensor, multiple: int, n: int, c: int, pad: int) -> torch.Tensor:
    padded = g.shape[0]
    while padded % (multiple * n):  # Megatron's _vocab_size_with_padding, as written there
        padded += 1
    rows = torch.full((padded - g.shape[0],) + tuple(g.shape[1:]), pad, dtype=g.dtype)
    return cut_even(torch.cat([g, rows]), 0, n, c)


def zero_partition(parts: Sequence[torch.Tensor], n: int, c: int, align: int, partition: str, pad: int) -> torch.Tensor:
    """DeepSpeed ZeRO-1 flat partition of the concatenated (TP-local) tensors."""
    flat = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0)
    total, q = flat.numel(), n * align
    if partition == "chunk":
        per = -(-total // q) * align
        start = min(c * per, total)
        return flat[start : min(start + per, total)].clone()
    per = -(-total // q) * q // n
    flat = torch.cat([flat, torch.full((per * n - total,), pad, dtype=flat.dtype)])
    return flat[c * per : (c + 1) * per].clone()


def local_state(model: Model, lay: Layout, glob: dict[str, torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
    """Rank ``lay``'s tensors, cut from ``glob`` (the logical tensors); padding is ``pad``."""
    tp, t = lay.size("tp"), lay.coord("tp")
    pp, stage = lay.size("pp"), lay.coord("pp")
    per_stage = model.layers // pp
    param_global: dict[str, str] = {}

    def cut(kind: str, g: torch.Tensor) -> torch.Tensor:
        if kind == "embed":
            return cut_vocab(g, VOCAB_MULTIPLE, tp, t, pad)
        if kind == "qkv":
            return cut_fused(g, (Q_HEADS, KV_HEADS, KV_HEADS), HEAD_DIM, tp, t)
        if kind in ("up", "colu"):
            return (cut_even if kind == "up" else cut_chunk)(g, 0, tp, t)
        if kind in ("down", "rowu"):
            return (cut_even if kind == "down" else cut_chunk)(g, 1, tp, t)
        return g  # replicated

    out: dict[str, torch.Tensor] = {}
    if stage == 0:
        out["embed.weight"] = cut("embed", glob["embed.weight"])
        param_global["embed.weight"] = "embed.weight"
    for i in range(per_stage):
        layer = stage * per_stage + i
        for kind in ("qkv", "up", "down", "colu", "rowu", "norm"):
            name = f"layers.{layer}.{kind}.weight"
            if name in glob:
                out[f"layers.{i}.{kind}.weight"] = cut(kind, glob[name])
                param_global[f"layers.{i}.{kind}.weight"] = name
    if stage == pp - 1:
        out["final_norm.weight"] = glob["final_norm.weight"]
        param_global["final_norm.weight"] = "final_norm.weight"
        if pp > 1:  # at pp=1 the head is the embedding itself (Megatron ties them)
            out["lm_head.weight"] = cut("embed", glob["embed.weight"])
            param_global["lm_head.weight"] = "embed.weight"
    selected = [g for local, g in param_global.items() if re.fullmatch(model.zero_params, local)]
    states = [cut(_kind(g), glob[f"optim.exp_avg.{g}"]) for g in selected]  # in state order
    out["optim.exp_avg"] = zero_partition(states, lay.size("dp"), lay.coord("dp"), model.align, model.partition, pad)
    out["optim.step"] = glob["optim.step"]
    # Fresh C-contiguous tensors (clone() would keep a slice's strides).
    return {k: torch.empty(v.shape, dtype=v.dtype).copy_(v) for k, v in out.items()}


def _kind(global_name: str) -> str:
    return "embed" if global_name == "embed.weight" else global_name.split(".")[-2]


# -- threads as ranks ------------------------------------------------------------------------------


def run_ranks(world: int, fn: Callable[[int, Comm], Any], what: str) -> list[Any]:
    """Run ``fn(rank, comm)`` on ``world`` threads; re-raise the lowest failing rank's error."""
    group = ThreadGroup(world, timeout=timedelta(seconds=60))
    results: list[Any] = [None] * world
    errors: dict[int, BaseException] = {}

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank, group.comm(rank))
        except BaseException as e:  # reported below, with the rank
            errors[rank] = e

    threads = [threading.Thread(target=body, args=(r,), name=f"{what}-rank{r}", daemon=True) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=150)
    alive = [r for r, th in enumerate(threads) if th.is_alive()]
    if alive:
        pytest.fail(f"{what}: rank(s) {alive} still running after 150 s (hang)")
    if errors:
        rank = min(errors)
        raise AssertionError(f"{what}: rank {rank} failed (ranks {sorted(errors)} failed): {errors[rank]!r}") from errors[rank]
    return results


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), (
        f"{what}: {got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)}"
    )
    assert torch.equal(bits(got), bits(want)), f"{what}: values differ\n got {got}\nwant {want}"


def index_world(model: Model) -> tuple[dict[str, torch.Tensor], list[str], list[int]]:
    """Every logical element's global index (tensors back to back), to reassemble loaded ranks."""
    idx, names, bases, base = {}, [], [], 0
    for name, (shape, _) in model.shapes().items():
        n = 1
        for s in shape:
            n *= s
        idx[name] = (torch.arange(n, dtype=torch.int64) + base).reshape(shape)
        names.append(name)
        bases.append(base)
        base += n
    return idx, names, bases


def reassemble(model: Model, lay: Layout, loaded: list[dict[str, torch.Tensor]], glob: dict[str, torch.Tensor]) -> None:
    """Scatter every rank's loaded elements back into the logical tensors' positions: each must
    equal the logical element there, padding must be zero, and every element must be loaded."""
    idx, names, bases = index_world(model)
    seen = {n: torch.zeros(glob[n].numel(), dtype=torch.bool) for n in names}
    starts = torch.tensor(bases, dtype=torch.int64)
    for rank, tensors in enumerate(loaded):
        where = local_state(model, lay.with_rank(rank), idx, pad=-1)
        assert set(where) == set(tensors)
        for local, t in tensors.items():
            pos = where[local].reshape(-1)
            flat = t.reshape(-1)
            padding = pos < 0
            assert not bits(flat[padding]).any(), f"rank {rank} {local}: padding not zero: {flat[padding]}"
            which = torch.bucketize(pos, starts, right=True) - 1
            for k in torch.unique(which[~padding]).tolist():
                name, sel = names[k], (which == k) & ~padding
                at = pos[sel] - bases[k]
                want = glob[name].reshape(-1)[at]
                assert torch.equal(bits(flat[sel]), bits(want)), f"rank {rank} {local} -> {name}: values differ"
                seen[name][at] = True
    for name, s in seen.items():
        assert bool(s.all()), f"{name}: {int((~s).sum())} of {s.numel()} elements loaded by no rank of {lay.describe()}"


# -- the property ------------------------------------------------------------------------------------


@st.composite
def layouts(draw: Any, tps: Sequence[int]) -> Layout:
    return Layout.grid(pp=draw(st.integers(1, 2)), dp=draw(st.integers(1, 3)), tp=draw(st.sampled_from(tps)))


@st.composite
def cases(draw: Any) -> tuple[Model, Layout, Layout]:
    src = draw(layouts([1, 2, 3, 4]))
    dst = draw(layouts([1, 2, 3, 4]))
    kinds = ("embed", "qkv", "up", "down", "colu", "rowu", "norm")
    model = Model(
        hidden=draw(st.integers(0, 4)),
        layers=draw(st.sampled_from([2, 4])),
        vocab=2 * draw(st.integers(0, 6)) + 1,
        even=draw(st.sampled_from([0, 12, 24])),
        col_rows=draw(st.integers(0, 9)),
        row_cols=draw(st.integers(0, 9)),
        fused=src.size("tp") != 3 and dst.size("tp") != 3,
        dtypes=tuple((k, draw(st.sampled_from(DTYPES))) for k in kinds),
        align=draw(st.sampled_from([1, 3])),
        partition=draw(st.sampled_from(["padded", "chunk"])),
        seed=draw(st.integers(0, 1 << 30)),
    )
    return model, src, dst


def _writer(obj: str) -> int:
    m = _OBJECT.match(obj)
    assert m is not None, f"unexpected object name {obj!r}"
    return int(m.group(1))


def check_manifest(url: str, src: Layout, rules: Rules, glob: dict[str, torch.Tensor], rank_bytes: int) -> None:
    _, m = ckpt.open_manifest(url)
    assert m.world_size == src.world_size
    assert m.layout == {"axes": [[n, s] for n, s in src.axes], "rules": rules.to_json()}
    assert {n for n, t in glob.items() if t.numel()} <= set(m.tensors) <= set(glob)
    writers = set()
    for name, meta in m.tensors.items():
        assert tuple(meta.shape) == tuple(glob[name].shape) and meta.dtype == str(glob[name].dtype).removeprefix("torch.")
        # The parser rejects overlapping chunks; equal element counts then mean an exact tiling:
        # every region, replicated or not, is stored exactly once.
        assert sum(c.raw_length for c in meta.chunks) == meta.nbytes, f"{name}: stored {len(meta.chunks)} chunks"
        writers |= {_writer(c.object) for c in meta.chunks}
    assert writers <= set(range(src.world_size))
    nonempty = sum(1 for meta in m.tensors.values() for c in meta.chunks if c.raw_length)
    if src.world_size > 1 and nonempty > src.world_size:
        assert len(writers) > 1, f"every chunk written by rank(s) {writers} of {src.describe()}"
    assert rank_bytes == m.stored_bytes
    assert ckpt.verify(url).ok


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_save_in_one_layout_load_in_another_bit_exact(case: tuple[Model, Layout, Layout]) -> None:
    reshard(*case)


def reshard(model: Model, src: Layout, dst: Layout) -> None:
    """Save the model's cuts on every rank of ``src``; check the manifest and the stored tensors;
    load on every rank of ``dst`` and in one process; reassemble and compare bit for bit."""
    glob, rules = model.logical(), model.rules()
    url = f"memory://reshard-e2e-{uuid.uuid4().hex}"
    try:

        def save(rank: int, comm: Comm) -> int:
            lay = src.with_rank(rank)
            state = local_state(model, lay, glob, pad=POISON)
            return ckpt.save(state, url, step=3, layout=lay, rules=rules, comm=comm).rank_bytes

        written = run_ranks(src.world_size, save, "save")
        check_manifest(url, src, rules, glob, sum(written))

        # The stored global tensors themselves, read by name with no rules: the logical tensors.
        whole = {n: torch.full(t.shape, SENTINEL, dtype=t.dtype) for n, t in glob.items() if t.numel()}
        ckpt.load(whole, url, layout=Layout.single())
        for n, t in whole.items():
            assert_bits_equal(t, glob[n], f"stored {n}")

        def load(rank: int, comm: Comm) -> dict[str, torch.Tensor]:
            lay = dst.with_rank(rank)
            target = {k: torch.full_like(v, SENTINEL) for k, v in local_state(model, lay, glob, pad=0).items()}
            ptrs = {k: v.data_ptr() for k, v in target.items()}
            ckpt.load(target, url, layout=lay, rules=rules, comm=comm)
            assert {k: v.data_ptr() for k, v in target.items()} == ptrs, "not filled in place"
            return target

        reassemble(model, dst, run_ranks(dst.world_size, load, "load"), glob)

        one = {k: torch.full_like(v, SENTINEL) for k, v in local_state(model, Layout.single(), glob, pad=0).items()}
        ckpt.load(one, url, layout=Layout.single(), rules=rules)
        reassemble(model, Layout.single(), [one], glob)
    finally:
        store = open_store(url)
        for key in store.list(""):
            store.delete(key)


def test_zero_element_tensor_saved_with_rules_is_in_the_manifest() -> None:
    url = f"memory://reshard-e2e-{uuid.uuid4().hex}"
    rules = Rules(shards=(Replicated("w|b"),))
    ckpt.save({"w": torch.zeros(0, 3), "b": torch.ones(2)}, url, step=1, layout=Layout.single(), rules=rules)
    _, m = ckpt.open_manifest(url)
    assert set(m.tensors) == {"w", "b"} and tuple(m.tensors["w"].shape) == (0, 3)


def test_one_element_tensor_with_a_stride_saves() -> None:
    url = f"memory://reshard-e2e-{uuid.uuid4().hex}"
    x = torch.arange(4.0)[::2][:1]  # shape (1,), stride (2,): contiguous, by torch's definition
    ckpt.save({"x": x}, url, step=1)


_ALL_FLOAT = tuple((k, torch.float32) for k in ("embed", "qkv", "up", "down", "colu", "rowu", "norm"))


@pytest.mark.parametrize(
    "sizes,src",
    [
        ({"vocab": 13, "col_rows": 0}, Layout.grid(pp=2, dp=2)),  # the tied head's state is cut at other rows
        ({"vocab": 1, "col_rows": 1}, Layout.grid(dp=3, tp=2)),  # the norm after an uneven split moves
    ],
    ids=["tied-head", "uneven-tp"],
)
def test_flat_state_of_replicas_at_different_flat_offsets(sizes: dict[str, int], src: Layout) -> None:
    model = Model(hidden=3, layers=2, even=0, row_cols=0, fused=False, dtypes=_ALL_FLOAT, align=1,
                  partition="padded", seed=1, zero_params=ALL_PARAMS, **sizes)
    reshard(model, src, Layout.single())


# -- ThreadGroup itself -----------------------------------------------------------------------------


def test_thread_group_gathers_in_rank_order_and_round_trips_json() -> None:
    def fn(rank: int, comm: Comm) -> list[Any]:
        return [comm.all_gather_json({"r": rank, "t": (rank, "x")}) for _ in range(50)] + [comm.broadcast_json(rank, src=2)]

    out = run_ranks(3, fn, "gather")
    want = [{"r": r, "t": [r, "x"]} for r in range(3)]  # tuples arrive as lists, as on the wire
    assert all(o[:50] == [want] * 50 and o[50] == 2 for o in out)


def test_thread_group_names_the_rank_that_never_arrives() -> None:
    group = ThreadGroup(3, timeout=timedelta(seconds=0.3))
    errors: dict[int, str] = {}

    def body(rank: int) -> None:
        try:
            group.comm(rank).all_gather_json(rank)
        except TimeoutError as e:
            errors[rank] = str(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in (0, 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert sorted(errors) == [0, 2]
    assert all("rank(s) [1] did not arrive" in m for m in errors.values()), errors
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\]"):  # a late rank fails too, at once
        group.comm(1).all_gather_json(1)
    with pytest.raises(TypeError):  # not JSON: fails on the caller before any rendezvous
        group.comm(0).all_gather_json({1, 2})
    with pytest.raises(ValueError):
        group.comm(3)


def test_save_with_rules_fails_on_every_thread_rank_when_one_rank_is_wrong() -> None:
    url = f"memory://reshard-e2e-{uuid.uuid4().hex}"
    rules = Rules(shards=(Split(r"w", dim=0),))
    lay = Layout.grid(tp=2)

    def save(rank: int, comm: Comm) -> Optional[str]:
        w = torch.zeros(3 if rank else 2, 4)  # rank 1 holds a shard of the wrong size
        try:
            ckpt.save({"w": w}, url, step=1, layout=lay.with_rank(rank), rules=rules, comm=comm)
        except Exception as e:
            return type(e).__name__
        return None

    assert run_ranks(2, save, "save") == ["SaveFailedError", "SaveFailedError"]
    assert ckpt.list_steps(url) == []
