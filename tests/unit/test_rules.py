"""Unit and property tests for ``ckpt.rules``: the sharding rules language.

Every rule kind is checked by simulation: a global numpy array of distinct values is cut into
each rank's local tensor by the helpers below (written from the Megatron / torch.chunk / ZeRO
conventions, independently of the rule code), then mapped back through the rule's pieces. A
rank's pieces must (1) rebuild its local tensor exactly from the global arrays, padding where
no piece points, and (2) together with the other ranks' cover every global element.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.errors import CheckpointError
from ckpt.layout import Layout
from ckpt.mapping import TensorMapping
from ckpt.regions import Box
from ckpt.rules import (
    Fused,
    Pipeline,
    Replicated,
    Rules,
    RulesError,
    Sharded,
    Split,
    Tied,
    Vocab,
    ZeroFlat,
    load_rules,
    mapping_from_placements,
    padded_vocab_size,
    shipped_rules,
)

PAD = -1.0  # local elements that hold no global element; global values are all >= 0


# -- independent cutters (the conventions, written from their descriptions) --------------------


def distinct(shape: Sequence[int], start: int = 0) -> np.ndarray:
    return (np.arange(math.prod(shape), dtype=np.float64) + start).reshape(tuple(shape))


def take(a: np.ndarray, dim: int, idx: Iterable[int]) -> np.ndarray:
    return np.take(a, list(idx), axis=dim)


def cut_even(g: np.ndarray, dim: int, n: int, c: int) -> np.ndarray:
    k = g.shape[dim] // n
    return take(g, dim, range(c * k, (c + 1) * k))


def cut_chunk(g: np.ndarray, dim: int, n: int, c: int) -> np.ndarray:
    """torch.chunk: pieces of ceil(G/n), the last ones shorter or empty."""
    k = -(-g.shape[dim] // n)
    return take(g, dim, list(range(g.shape[dim]))[c * k : (c + 1) * k])


def cut_fused(g: np.ndarray, dim: int, parts: Sequence[int], unit: int, n: int, c: int) -> np.ndarray:
    """Megatron-style fused QKV/gate-up: each part's heads split over n ranks; with fewer heads
    than ranks each head is shared by n // heads consecutive ranks."""
    bounds = np.cumsum([u * unit for u in parts])[:-1]
    out = []
    for heads, section in zip(parts, np.split(g, bounds, axis=dim)):
        per_head = np.split(section, heads, axis=dim)
        if heads >= n:
            out += per_head[c * (heads // n) : (c + 1) * (heads // n)]
        else:
            out.append(per_head[c // (n // heads)])
    return np.concatenate(out, axis=dim)


def megatron_padded_vocab(v: int, multiple: int, tp: int) -> int:
    """Megatron's _vocab_size_with_padding, as written there (a loop)."""
    after = v
    while after % (multiple * tp) != 0:
        after += 1
    return after


def cut_vocab(g: np.ndarray, padded: int, n: int, c: int) -> np.ndarray:
    pad = np.full((padded - g.shape[0],) + g.shape[1:], PAD)
    return cut_even(np.concatenate([g, pad]), 0, n, c)


def zero_partition(params: Sequence[np.ndarray], n: int, c: int, align: int = 1, chunk: bool = False) -> np.ndarray:
    """DeepSpeed ZeRO-1: flatten, concatenate, pad to a multiple of n*align, take part c."""
    flat = np.concatenate([p.ravel() for p in params]) if params else np.zeros(0)
    q = n * align
    if chunk:
        k = -(-flat.size // q) * align
        return flat[c * k : (c + 1) * k]
    padded = -(-flat.size // q) * q
    flat = np.concatenate([flat, np.full(padded - flat.size, PAD)])
    k = padded // n
    return flat[c * k : (c + 1) * k]


# -- simulation --------------------------------------------------------------------------------


def sl(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, e) for o, e in zip(box.offsets, box.ends))


class Sim:
    """Global arrays; checks mappings against local arrays and counts coverage."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.g = dict(arrays)
        self.cov = {k: np.zeros(v.shape, dtype=np.int64) for k, v in self.g.items()}

    def fill(self, m: TensorMapping) -> np.ndarray:
        """The local tensor a loader builds from the global arrays (padding elsewhere)."""
        out = np.full(m.local_shape, PAD)
        seen = np.zeros(m.local_shape, dtype=bool)
        for p in m.pieces:
            assert p.name in self.g, f"piece names unknown global tensor {p.name}"
            assert tuple(m.global_shapes[p.name]) == self.g[p.name].shape, p.name
            assert not seen[sl(p.local)].any(), f"{m.local_name}: pieces overlap"
            seen[sl(p.local)] = True
            out[sl(p.local)] = self.g[p.name][sl(p.region)].reshape(p.local.sizes)
            self.cov[p.name][sl(p.region)] += 1
        return out

    def check(self, m: TensorMapping, local: np.ndarray) -> None:
        assert m.local_shape == local.shape
        np.testing.assert_array_equal(self.fill(m), local, err_msg=m.local_name)

    def assert_covered(self, names: Iterable[str] | None = None) -> None:
        for name in names or self.g:
            missing = np.argwhere(self.cov[name] == 0)
            assert missing.size == 0, f"{name}: elements {missing[:5].tolist()} are held by no rank"


def one(rules_or_rule: Any, name: str, local: np.ndarray, layout: Layout) -> TensorMapping:
    rules = rules_or_rule if isinstance(rules_or_rule, Rules) else Rules(shards=(rules_or_rule,))
    return rules.resolve({name: local.shape}, layout)[name]


def ranks(**sizes: int) -> Iterable[Layout]:
    return Layout.grid(**sizes).all_ranks()


# -- Replicated, Split -------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_replicated_every_rank_holds_all(tp: int) -> None:
    g = distinct((3, 5))
    sim = Sim({"w": g})
    for lay in ranks(tp=tp, dp=2):
        m = one(Replicated("w"), "w", g, lay)
        assert m.pieces[0].split_dim is None
        sim.check(m, g)
    assert (sim.cov["w"] == 2 * tp).all()


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dim,shape", [(0, (8, 3)), (1, (3, 8)), (0, (8,)), (2, (2, 3, 4))])
def test_split_even(tp: int, dim: int, shape: tuple[int, ...]) -> None:
    g = distinct(shape)
    sim = Sim({"w": g})
    for lay in ranks(tp=tp):
        local = cut_even(g, dim, tp, lay.coord("tp"))
        m = one(Split("w", dim=dim), "w", local, lay)
        assert all(p.split_dim == dim for p in m.pieces)
        sim.check(m, local)
    assert (sim.cov["w"] == 1).all()


@pytest.mark.parametrize("size,tp", [(5, 1), (5, 2), (5, 4), (5, 8), (1, 3), (0, 2), (7, 3)])
def test_split_uneven_chunks_with_empty_trailing_shards(size: int, tp: int) -> None:
    g = distinct((size, 2))
    sim = Sim({"w": g})
    for lay in ranks(tp=tp):
        local = cut_chunk(g, 0, tp, lay.coord("tp"))
        m = one(Split("w", dim=0, global_size=size), "w", local, lay)
        assert m.global_shapes["w"] == (size, 2)
        sim.check(m, local)
    assert (sim.cov["w"] == 1).all()


def test_split_uneven_shape_mismatch_names_tensor_rank_and_shapes() -> None:
    lay = Layout.grid(tp=4, rank=3)  # chunks of 5 over 4: 2, 2, 1, 0
    with pytest.raises(RulesError) as e:
        Rules(shards=(Split(r"w\.\d", dim=0, global_size=5),)).resolve({"w.0": (1, 2)}, lay)
    text = str(e.value)
    assert "'w.0'" in text and "tp=3" in text and "(0, 2)" in text and "(1, 2)" in text


def test_split_dim_beyond_tensor_is_an_error() -> None:
    with pytest.raises(RulesError, match="dim 1"):
        Rules(shards=(Split("b", dim=1),)).resolve({"b": (4,)}, Layout.grid(tp=2))


# -- Fused -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q,kv,tp",
    [(8, 2, 1), (8, 2, 2), (8, 2, 4), (8, 2, 8), (8, 8, 4), (4, 1, 4), (6, 3, 3), (4, 4, 1)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_with_gqa(q: int, kv: int, tp: int, bias: bool) -> None:
    hd, hidden = 3, 5
    shape = ((q + 2 * kv) * hd,) if bias else ((q + 2 * kv) * hd, hidden)
    g = distinct(shape)
    rule = Fused("qkv", dim=0, parts=(("q", q), ("k", kv), ("v", kv)), unit=hd)
    sim = Sim({"qkv": g})
    for lay in ranks(tp=tp, dp=2):
        local = cut_fused(g, 0, (q, kv, kv), hd, tp, lay.coord("tp"))
        sim.check(one(rule, "qkv", local, lay), local)
    # q rows once per dp replica; kv rows replicated over tp/kv ranks when kv < tp
    assert (sim.cov["qkv"][: q * hd] == 2).all()
    assert (sim.cov["qkv"][q * hd :] == 2 * max(1, tp // kv)).all()


def test_fused_save_at_tp2_loads_at_tp4_and_tp1() -> None:
    q, kv, hd = 8, 2, 2
    g = distinct(((q + 2 * kv) * hd, 3))
    rule = Fused("qkv", dim=0, parts=(("q", q), ("k", kv), ("v", kv)), unit=hd)
    saved = Sim({"qkv": np.full(g.shape, PAD)})
    for lay in ranks(tp=2):  # "save": write each rank's pieces into one global tensor
        local = cut_fused(g, 0, (q, kv, kv), hd, 2, lay.coord("tp"))
        for p in one(rule, "qkv", local, lay).pieces:
            saved.g["qkv"][sl(p.region)] = local[sl(p.local)]
    np.testing.assert_array_equal(saved.g["qkv"], g)
    for tp in (4, 1):
        for lay in ranks(tp=tp):
            local = cut_fused(g, 0, (q, kv, kv), hd, tp, lay.coord("tp"))
            saved.check(one(rule, "qkv", local, lay), local)


@pytest.mark.parametrize("tp", [1, 2, 3, 6])
def test_fused_swiglu_gate_up(tp: int) -> None:
    ffn = 6
    g = distinct((2 * ffn, 4))
    rule = Fused("gate_up", dim=0, parts=(("gate", ffn), ("up", ffn)), unit=1)
    sim = Sim({"gate_up": g})
    for lay in ranks(tp=tp):
        local = cut_fused(g, 0, (ffn, ffn), 1, tp, lay.coord("tp"))
        sim.check(one(rule, "gate_up", local, lay), local)
    assert (sim.cov["gate_up"] == 1).all()


def test_fused_along_dim_1() -> None:
    g = distinct((3, 12))
    rule = Fused("w", dim=1, parts=(("a", 4), ("b", 2)), unit=2)
    sim = Sim({"w": g})
    for lay in ranks(tp=2):
        local = cut_fused(g, 1, (4, 2), 2, 2, lay.coord("tp"))
        sim.check(one(rule, "w", local, lay), local)
    sim.assert_covered()


def test_fused_errors_on_indivisible_heads_and_wrong_shape() -> None:
    rule = Fused("qkv", parts=(("q", 6), ("k", 3), ("v", 3)), unit=2)
    with pytest.raises(RulesError, match="'k' has 3 units"):
        Rules(shards=(rule,)).resolve({"qkv": (12, 4)}, Layout.grid(tp=2))
    with pytest.raises(RulesError, match=r"expected local shape \(8, 4\)"):
        Rules(shards=(rule,)).resolve({"qkv": (6, 4)}, Layout.grid(tp=3, rank=1))


# -- Vocab -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("multiple", [1, 8, 128])
def test_vocab_50257_padding_stripped(tp: int, multiple: int) -> None:
    v, hidden = 50257, 2
    g = distinct((v, hidden))
    padded = megatron_padded_vocab(v, multiple, tp)
    assert padded_vocab_size(v, tp, multiple) == padded
    rule = Vocab("emb", size=v, pad_to_multiple=multiple)
    sim = Sim({"emb": g})
    for lay in ranks(tp=tp):
        local = cut_vocab(g, padded, tp, lay.coord("tp"))
        m = one(rule, "emb", local, lay)
        assert m.global_shapes["emb"] == (v, hidden)
        sim.check(m, local)
    assert (sim.cov["emb"] == 1).all()


def test_vocab_reloads_with_other_padding() -> None:
    v = 37
    g = distinct((v, 3))
    saved = Sim({"emb": g})
    for multiple, tp in [(1, 1), (4, 2), (8, 4), (16, 8)]:
        for lay in ranks(tp=tp):
            local = cut_vocab(g, megatron_padded_vocab(v, multiple, tp), tp, lay.coord("tp"))
            saved.check(one(Vocab("emb", size=v, pad_to_multiple=multiple), "emb", local, lay), local)


def test_vocab_padding_modes() -> None:
    v = 10
    g = distinct((v, 2))
    # "multiple": pad to 4 (=12), split over 3 ranks of 4 rows
    sim = Sim({"e": g})
    for lay in ranks(tp=3):
        local = cut_vocab(g, 12, 3, lay.coord("tp"))
        sim.check(one(Vocab("e", size=v, pad_to_multiple=4, padding="multiple"), "e", local, lay), local)
    # "any": whatever the model padded to (here 16 rows over 2 ranks), as long as it fits
    for lay in ranks(tp=2):
        local = cut_vocab(g, 16, 2, lay.coord("tp"))
        sim.check(one(Vocab("e", size=v, padding="any"), "e", local, lay), local)
    sim.assert_covered()
    with pytest.raises(RulesError, match="does not divide"):
        Rules(shards=(Vocab("e", size=v, pad_to_multiple=4, padding="multiple"),)).resolve({"e": (4, 2)}, Layout.grid(tp=5))
    with pytest.raises(RulesError, match="cannot hold"):
        Rules(shards=(Vocab("e", size=v, padding="any"),)).resolve({"e": (4, 2)}, Layout.grid(tp=2))
    with pytest.raises(RulesError, match=r"expected local shape \(128, 2\)"):
        Rules(shards=(Vocab("e", size=v, pad_to_multiple=128),)).resolve({"e": (5, 2)}, Layout.grid(tp=2))


# -- Pipeline, Tied ----------------------------------------------------------------------------

LAYER = r"model\.layers\.(?P<layer>\d+)\..+"


@pytest.mark.parametrize(
    "pp,stage_layers", [(1, None), (2, None), (4, None), (2, (3, 5)), (4, (1, 2, 2, 3)), (3, (0, 4, 4))]
)
def test_pipeline_renumbers_local_layers(pp: int, stage_layers: tuple[int, ...] | None) -> None:
    total = 8
    per_stage = stage_layers or (total // pp,) * pp
    rules = Rules(renames=(Pipeline(LAYER, layers=total, stage_layers=stage_layers),), shards=(Replicated(r"model\..+"),))
    seen = []
    for lay in ranks(pp=pp, tp=2):
        s = lay.coord("pp")
        local = {f"model.layers.{i}.w": (2,) for i in range(per_stage[s])}
        out = rules.resolve(local, lay)
        for i in range(per_stage[s]):
            (piece,) = out[f"model.layers.{i}.w"].pieces
            layer = int(piece.name.split(".")[2])
            assert rules.renames[0].locate(layer, pp) == (s, i)
            if lay.coord("tp") == 0:
                seen.append(layer)
    assert sorted(seen) == list(range(total))


def test_pipeline_errors() -> None:
    uneven = Rules(renames=(Pipeline(LAYER, layers=7),), shards=(Replicated(r"model\..+"),))
    with pytest.raises(RulesError, match="stage_layers"):
        uneven.resolve({"model.layers.0.w": (1,)}, Layout.grid(pp=2))
    even = Rules(renames=(Pipeline(LAYER, layers=8),), shards=(Replicated(r"model\..+"),))
    with pytest.raises(RulesError, match="holds 4 layers"):
        even.resolve({"model.layers.4.w": (1,)}, Layout.grid(pp=2, rank=1))
    unknown = Rules(renames=(Pipeline(LAYER),), shards=(Replicated(r"model\..+"),))
    assert unknown.global_name("model.layers.3.w", Layout.single()) == "model.layers.3.w"
    with pytest.raises(RulesError, match="needs layers"):
        unknown.global_name("model.layers.3.w", Layout.grid(pp=2))
    with pytest.raises(RulesError, match="named group"):
        Pipeline(r"model\.layers\.(\d+)\..+")
    with pytest.raises(RulesError, match="sum to"):
        Pipeline(LAYER, layers=8, stage_layers=(3, 4))


def test_tied_lm_head_is_a_replica_of_the_embedding() -> None:
    v, hidden, tp = 11, 3, 2
    g = distinct((v, hidden))
    rules = Rules(
        renames=(Tied(r"model\.lm_head\.weight", "model.embedding.word_embeddings.weight"),),
        shards=(Vocab(r"model\.embedding\.word_embeddings\.weight", size=v, pad_to_multiple=4),),
    )
    sim = Sim({"model.embedding.word_embeddings.weight": g})
    padded = megatron_padded_vocab(v, 4, tp)
    for lay in ranks(pp=2, tp=tp):
        local = cut_vocab(g, padded, tp, lay.coord("tp"))
        name = "model.embedding.word_embeddings.weight" if lay.coord("pp") == 0 else "model.lm_head.weight"
        m = rules.resolve({name: local.shape}, lay)[name]
        assert m.local_name == name
        sim.check(m, local)
    assert (sim.cov["model.embedding.word_embeddings.weight"] == 2).all()


def test_tied_target_may_use_named_groups() -> None:
    rules = Rules(renames=(Tied(r"dec\.(?P<i>\d+)\.w", "enc.{i}.w"),), shards=(Replicated(r"enc\.\d+\.w"),))
    assert rules.global_name("dec.3.w", Layout.single()) == "enc.3.w"
    with pytest.raises(RulesError, match="not allowed"):
        Tied(r"dec\.(?P<i>\d+)\.w", "enc.{j}.w")


# -- ZeroFlat ----------------------------------------------------------------------------------


def _tp_params(tp: int, c: int, base: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[Any]]:
    """Global arrays, local cuts at tp rank c, and shard rules for a small mixed model."""
    q, kv, hd, v = 4, 1, 2, 7
    glob = {
        "model.norm": distinct((3,), base),
        "model.qkv": distinct(((q + 2 * kv) * hd, 3), base + 100),
        "model.dense": distinct((3, 4), base + 200),
        "model.emb": distinct((v, 3), base + 300),
        "model.scale": distinct((), base + 400),
        "model.cols": distinct((3, 2 * tp * 2), base + 500),
    }
    padded = megatron_padded_vocab(v, 2, tp)
    local = {
        "model.norm": glob["model.norm"],
        "model.qkv": cut_fused(glob["model.qkv"], 0, (q, kv, kv), hd, tp, c),
        "model.dense": cut_even(glob["model.dense"], 1, tp, c),
        "model.emb": cut_vocab(glob["model.emb"], padded, tp, c),
        "model.scale": glob["model.scale"],
        "model.cols": cut_fused(glob["model.cols"], 1, (tp, tp), 2, tp, c),
    }
    shards = [
        Replicated(r"model\.(norm|scale)"),
        Fused(r"model\.qkv", parts=(("q", q), ("k", kv), ("v", kv)), unit=hd),
        Split(r"model\.dense", dim=1),
        Vocab(r"model\.emb", size=v, pad_to_multiple=2),
        Fused(r"model\.cols", dim=1, parts=(("a", tp), ("b", tp)), unit=2),
    ]
    return glob, local, shards


@pytest.mark.parametrize("dp", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("align,chunk", [(1, False), (4, False), (1, True), (3, True)])
def test_zero_flat_composes_with_tp_rules(dp: int, tp: int, align: int, chunk: bool) -> None:
    flat = ZeroFlat(r"optim\.exp_avg", params=(r"model\..+",), template="optim.exp_avg.{param}", align=align, partition="chunk" if chunk else "padded")
    sim: Sim | None = None
    for lay in ranks(dp=dp, tp=tp):
        glob, local, shards = _tp_params(tp, lay.coord("tp"), 0)
        mglob, mlocal, _ = _tp_params(tp, lay.coord("tp"), 10_000)
        sim = sim or Sim({**glob, **{f"optim.exp_avg.{k}": a for k, a in mglob.items()}})
        part = zero_partition(list(mlocal.values()), dp, lay.coord("dp"), align, chunk)
        rules = Rules(shards=(*shards, flat))
        out = rules.resolve({**{k: a.shape for k, a in local.items()}, "optim.exp_avg": part.shape}, lay)
        for k, a in local.items():
            sim.check(out[k], a)
        sim.check(out["optim.exp_avg"], part)
        assert all(p.local.ndim == 1 and p.split_dim is None for p in out["optim.exp_avg"].pieces)
    assert sim is not None
    sim.assert_covered()
    for k in glob:  # the flat state partitions over dp: each element once per dp group
        np.testing.assert_array_equal(sim.cov[f"optim.exp_avg.{k}"] * dp, sim.cov[k])


def test_zero_flat_empty_partitions() -> None:
    g = distinct((2, 2))  # 4 elements over dp=7: padded ranks 4..6 hold padding only
    for chunk in (False, True):
        sim = Sim({"w": g, "m.w": g + 100})
        rules = Rules(shards=(Replicated("w"), ZeroFlat("m", params=("w",), template="m.{param}", partition="chunk" if chunk else "padded")))
        for lay in ranks(dp=7):
            part = zero_partition([g + 100], 7, lay.coord("dp"), chunk=chunk)
            out = rules.resolve({"w": (2, 2), "m": part.shape}, lay)
            sim.check(out["m"], part)
            if lay.coord("dp") >= 4:
                assert out["m"].pieces == ()
        assert (sim.cov["m.w"] == 1).all()


def test_zero_flat_shape_mismatch_and_flat_params_are_errors() -> None:
    flat = ZeroFlat("m", params=("w",), template="m.{param}")
    with pytest.raises(RulesError, match=r"expected a flat local shape \(2,\)"):
        Rules(shards=(Replicated("w"), flat)).resolve({"w": (4,), "m": (3,)}, Layout.grid(dp=2))
    loop = ZeroFlat("m", params=("w", "m2"), template="m.{param}")
    with pytest.raises(RulesError, match="itself a zero_flat"):
        Rules(shards=(Replicated("w"), loop, ZeroFlat("m2", params=("w",), template="x.{param}"))).resolve(
            {"w": (4,), "m": (4,), "m2": (4,)}, Layout.single()
        )


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4),
    dp=st.integers(1, 9),
    align=st.integers(1, 3),
)
def test_zero_flat_property(shapes: list[tuple[int, ...]], dp: int, align: int) -> None:
    glob = {f"p{i}": distinct(s, 1000 * i) for i, s in enumerate(shapes)}
    sim = Sim({**glob, **{f"m.p{i}": a + 100_000 for i, a in enumerate(glob.values())}})
    rules = Rules(shards=(Replicated(r"p\d"), ZeroFlat("m", params=(r"p\d",), template="m.{param}", align=align)))
    for lay in ranks(dp=dp):
        part = zero_partition([a + 100_000 for a in glob.values()], dp, lay.coord("dp"), align)
        out = rules.resolve({**{k: a.shape for k, a in glob.items()}, "m": part.shape}, lay)
        sim.check(out["m"], part)
    sim.assert_covered(f"m.{k}" for k in glob)


# -- DTensor placements ------------------------------------------------------------------------


def _dtensor_cut(g: np.ndarray, mesh: Sequence[tuple[str, int, int]], placements: Sequence[tuple]) -> np.ndarray:
    """DTensor: every ("shard", d) chunks the current local tensor along d, in mesh order."""
    out = g
    for (_, n, c), p in zip(mesh, placements):
        if p[0] == "shard":
            out = cut_chunk(out, p[1], n, c)
    return out


@pytest.mark.parametrize(
    "gshape,sizes,placements",
    [
        ((10, 3), {"dp": 4}, [("shard", 0)]),
        ((10, 3), {"dp": 2, "tp": 3}, [("shard", 0), ("shard", 0)]),
        ((10, 7), {"dp": 2, "tp": 3}, [("shard", 1), ("shard", 0)]),
        ((5, 4), {"dp": 2, "tp": 4}, [("replicate",), ("shard", 0)]),
        ((2, 3), {"dp": 3, "tp": 2}, [("shard", 0), ("shard", 1)]),
    ],
)
def test_mapping_from_placements(gshape: tuple[int, ...], sizes: dict[str, int], placements: list[tuple]) -> None:
    g = distinct(gshape)
    sim = Sim({"w": g})
    axes = list(sizes)
    for lay in ranks(**sizes):
        mesh = [(a, lay.size(a), lay.coord(a)) for a in axes]
        local = _dtensor_cut(g, mesh, placements)
        sim.check(mapping_from_placements("w", local.shape, gshape, lay, axes, placements), local)
    sim.assert_covered()


def test_mapping_from_placements_agrees_with_torch() -> None:
    torch_utils = pytest.importorskip("torch.distributed.tensor._utils")
    from torch.distributed.tensor import Replicate, Shard

    compute = getattr(torch_utils, "_compute_local_shape_and_global_offset", None)
    if compute is None:
        pytest.skip("this torch has no _compute_local_shape_and_global_offset")
    cases = [((10, 3), [("shard", 0), ("shard", 0)]), ((7, 5), [("shard", 1), ("shard", 0)]), ((3, 2), [("replicate",), ("shard", 0)])]
    for gshape, placements in cases:
        for lay in ranks(dp=2, tp=4):
            tp_pl = [Shard(p[1]) if p[0] == "shard" else Replicate() for p in placements]
            shape, offset = compute(gshape, (2, 4), [lay.coord("dp"), lay.coord("tp")], tp_pl)
            m = mapping_from_placements("w", shape, gshape, lay, ["dp", "tp"], placements)
            if math.prod(shape):
                assert m.pieces[0].region == Box(tuple(offset), tuple(shape))


def test_placement_errors() -> None:
    lay = Layout.grid(dp=2)
    with pytest.raises(RulesError, match="Partial"):
        mapping_from_placements("w", (2,), (4,), lay, ["dp"], [("partial", "sum")])
    with pytest.raises(RulesError, match=r"expected local shape \(2,\)"):
        mapping_from_placements("w", (3,), (4,), lay, ["dp"], [("shard", 0)])
    with pytest.raises(RulesError, match="strided"):
        mapping_from_placements("w", (2,), (4,), lay, ["dp"], [("strided_shard", 0, 2)])


def test_sharded_rule_needs_global_shapes() -> None:
    rules = Rules(shards=(Sharded(r"w\d", mesh=("dp",), placements=(("shard", 0),)),))
    lay = Layout.grid(dp=3, rank=2)
    out = rules.resolve({"w1": (1, 2)}, lay, global_shapes={"w1": (5, 2)})
    assert out["w1"].pieces[0].region == Box((4, 0), (1, 2))
    with pytest.raises(RulesError, match="needs the global shape"):
        rules.resolve({"w1": (1, 2)}, lay)


# -- fail closed -------------------------------------------------------------------------------


def test_fail_closed_lists_every_problem_at_once() -> None:
    rules = Rules(
        shards=(Replicated(r"model\.norm\..+"), Split(r"model\..+\.weight", dim=0), Split(r"model\.fc\..+", dim=1)),
        name="mine",
    )
    lay = Layout.grid(tp=2, dp=2, rank=3)
    local = {
        "model.norm.weight": (4,),  # matches Replicated and the first Split
        "model.fc.weight": (4, 4),  # matches both Splits
        "model.fc.bias": (4,),  # matches the second Split only: dim 1 of a 1-d tensor
        "model.extra": (2,),  # matches nothing
        "model.ok.weight": (2, 2),
    }
    with pytest.raises(RulesError) as e:
        rules.resolve(local, lay)
    err = e.value
    assert isinstance(err, ValueError) and isinstance(err, CheckpointError)
    assert len(err.problems) == 4
    text = str(err)
    for needle in ("'model.norm.weight'", "'model.fc.weight'", "'model.fc.bias'", "'model.extra'", "shards[0]", "shards[1]", "shards[2]", "no shard rule", "rank 3", "dp=1", "tp=1", "'mine'"):
        assert needle in text, needle
    assert "'model.ok.weight'" not in text


def test_renamed_names_are_reported_with_both_names() -> None:
    rules = Rules(renames=(Pipeline(LAYER, layers=4),), shards=())
    with pytest.raises(RulesError, match=r"'model\.layers\.1\.x' \(global name 'model\.layers\.3\.x'\)"):
        rules.resolve({"model.layers.1.x": (1,)}, Layout.grid(pp=2, rank=1))


def test_conflicting_global_shapes_on_one_rank() -> None:
    rules = Rules(renames=(Tied("b", "a"),), shards=(Replicated("a"),))
    with pytest.raises(RulesError, match="gives it shape"):
        rules.resolve({"a": (3,), "b": (4,)}, Layout.single())


# -- JSON, shipped sets, hostile input ---------------------------------------------------------


def _all_kinds() -> Rules:
    return Rules(
        renames=(Pipeline(LAYER, layers=4, stage_layers=(1, 3)), Tied("x", "y")),
        shards=(
            Replicated("a"),
            Split("b", dim=1, axis="tp", global_size=9),
            Fused("c", parts=(("q", 4), ("k", 2), ("v", 2)), unit=8),
            Vocab("d", size=100, pad_to_multiple=8, padding="multiple"),
            ZeroFlat(r"e\.(?P<s>\w+)", params=("a", "b"), template="{s}.{param}", align=2, partition="chunk"),
            Sharded("f", mesh=("dp", "tp"), placements=(("replicate",), ("shard", 0))),
        ),
        name="all",
        description="every kind",
    )


def test_json_round_trip() -> None:
    rules = _all_kinds()
    text = json.dumps(rules.to_json())
    assert Rules.from_json(json.loads(text)) == rules
    for name in ("ddp", "fsdp"):
        r = load_rules(name)
        assert Rules.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_load_rules_from_json_and_yaml_files(tmp_path: Any) -> None:
    rules = _all_kinds()
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rules.to_json()))
    assert load_rules(path) == rules
    yaml = pytest.importorskip("yaml")
    ypath = tmp_path / "r.yaml"
    ypath.write_text(yaml.safe_dump(rules.to_json()))
    assert load_rules(str(ypath)) == rules


def test_parameters_substitution() -> None:
    obj = {
        "format": "ckpt-rules",
        "version": 1,
        "parameters": {"v": {}, "m": {"default": 4}, "pre": {"default": "model"}},
        "shards": [{"kind": "vocab", "pattern": "${pre}\\.emb", "size": "${v}", "pad_to_multiple": "${m}"}],
    }
    rules = Rules.from_json(obj, {"v": 10})
    assert rules.shards[0] == Vocab(r"model\.emb", size=10, pad_to_multiple=4)
    with pytest.raises(RulesError, match=r"missing required parameter\(s\) \['v'\]"):
        Rules.from_json(obj)
    with pytest.raises(RulesError, match=r"unknown parameter\(s\) \['w'\]"):
        Rules.from_json(obj, {"v": 10, "w": 1})
    with pytest.raises(RulesError, match="must be an integer"):
        Rules.from_json(obj, {"v": "ten"})
    with pytest.raises(RulesError, match="missing required"):
        load_rules("megatron_gpt")


_OK_SHARD = {"kind": "replicated", "pattern": "a"}
_HOSTILE: list[tuple[str, Any]] = [
    ("not an object", []),
    ("wrong format", {"format": "other", "version": 1}),
    ("future version", {"format": "ckpt-rules", "version": 2}),
    ("bool version", {"format": "ckpt-rules", "version": True}),
    ("unknown top field", {"format": "ckpt-rules", "version": 1, "code": "x"}),
    ("unknown kind", {"shards": [{"kind": "default_concat", "pattern": "a"}]}),
    ("no kind", {"shards": [{"pattern": "a"}]}),
    ("extra rule field", {"shards": [{**_OK_SHARD, "eval": "1"}]}),
    ("missing pattern", {"shards": [{"kind": "split", "dim": 0}]}),
    ("bad regex", {"shards": [{"kind": "replicated", "pattern": "(("}]}),
    ("empty regex", {"shards": [{"kind": "replicated", "pattern": ""}]}),
    ("huge regex", {"shards": [{"kind": "replicated", "pattern": "a" * 5000}]}),
    ("bool as int", {"shards": [{"kind": "split", "pattern": "a", "dim": True}]}),
    ("negative dim", {"shards": [{"kind": "split", "pattern": "a", "dim": -1}]}),
    ("float dim", {"shards": [{"kind": "split", "pattern": "a", "dim": 1.0}]}),
    ("huge int", {"shards": [{"kind": "split", "pattern": "a", "global_size": 1 << 80}]}),
    ("bad axis", {"shards": [{"kind": "split", "pattern": "a", "axis": "TP; rm"}]}),
    ("zero units", {"shards": [{"kind": "fused", "pattern": "a", "parts": [["q", 0]]}]}),
    ("repeated parts", {"shards": [{"kind": "fused", "pattern": "a", "parts": [["q", 1], ["q", 1]]}]}),
    ("part not a pair", {"shards": [{"kind": "fused", "pattern": "a", "parts": [["q", 1, 2]]}]}),
    ("no parts", {"shards": [{"kind": "fused", "pattern": "a", "parts": []}]}),
    ("vocab padding", {"shards": [{"kind": "vocab", "pattern": "a", "size": 3, "padding": "magic"}]}),
    ("template attr", {"shards": [{"kind": "zero_flat", "pattern": "a", "params": ["b"], "template": "{param.__class__}"}]}),
    ("template index", {"shards": [{"kind": "zero_flat", "pattern": "a", "params": ["b"], "template": "{param[0]}"}]}),
    ("template no param", {"shards": [{"kind": "zero_flat", "pattern": "a", "params": ["b"], "template": "m"}]}),
    ("template spec", {"shards": [{"kind": "zero_flat", "pattern": "a", "params": ["b"], "template": "{param:>99999}"}]}),
    ("partial placement", {"shards": [{"kind": "sharded", "pattern": "a", "mesh": ["dp"], "placements": [["partial"]]}]}),
    ("mesh mismatch", {"shards": [{"kind": "sharded", "pattern": "a", "mesh": ["dp", "tp"], "placements": [["shard", 0]]}]}),
    ("tied attr", {"renames": [{"kind": "tied", "pattern": "a", "target": "{0}"}]}),
    ("pipeline no group", {"renames": [{"kind": "pipeline", "pattern": "a"}]}),
    ("shard kind as rename", {"renames": [_OK_SHARD]}),
    ("shards not list", {"shards": {"a": 1}}),
    ("too many rules", {"shards": [_OK_SHARD] * 5000}),
    ("bad name", {"name": "../../etc", "shards": [_OK_SHARD]}),
    ("undeclared placeholder", {"shards": [{"kind": "replicated", "pattern": "${nope}"}]}),
    ("bad parameters", {"parameters": {"v": {"default": 1, "exec": "x"}}}),
    ("param object default", {"parameters": {"v": {"default": {"a": 1}}}}),
    ("deep nesting", {"shards": [{"kind": "fused", "pattern": "a", "parts": [[[[[[[[[[["q"]]]]]]]]]]]}]}),
]


@pytest.mark.parametrize("label,obj", _HOSTILE, ids=[h[0] for h in _HOSTILE])
def test_hostile_rules_json_is_rejected(label: str, obj: Any) -> None:
    if isinstance(obj, dict) and "format" not in obj:
        obj = {"format": "ckpt-rules", "version": 1, **obj}
    with pytest.raises(RulesError):
        Rules.from_json(obj)


def test_hostile_files_are_rejected(tmp_path: Any) -> None:
    cases = {
        "nan.json": '{"format": "ckpt-rules", "version": 1, "shards": [{"kind": "split", "pattern": "a", "dim": NaN}]}',
        "deep.json": "[" * 100_000 + "]" * 100_000,
        "big.json": " " * (2 << 20),
        "bad.json": "{",
        "binary.json": "\udcff",
        "python.yaml": "!!python/object/apply:os.system ['true']",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(RulesError):
            load_rules(path)
    with pytest.raises(RulesError, match="no shipped rules"):
        load_rules("nonexistent")
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "missing.json")


# -- shipped rule sets -------------------------------------------------------------------------

GPT = dict(vocab=37, multiple=4, q=4, kv=2, hd=2, ffn=8, layers=4, seq=5)
HIDDEN = GPT["q"] * GPT["hd"]


def gpt_globals() -> dict[str, np.ndarray]:
    q, kv, hd, ffn, h = GPT["q"], GPT["kv"], GPT["hd"], GPT["ffn"], HIDDEN
    shapes: dict[str, tuple[int, ...]] = {
        "model.embedding.word_embeddings.weight": (GPT["vocab"], h),
        "model.embedding.position_embeddings.weight": (GPT["seq"], h),
    }
    for layer in range(GPT["layers"]):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "input_layernorm.bias": (h,),
                p + "attention.qkv.weight": ((q + 2 * kv) * hd, h),
                p + "attention.qkv.bias": ((q + 2 * kv) * hd,),
                p + "attention.dense.weight": (h, q * hd),
                p + "attention.dense.bias": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "post_attention_layernorm.bias": (h,),
                p + "mlp.gate_up.weight": (2 * ffn, h),
                p + "mlp.down.weight": (h, ffn),
            }
        )
    shapes["model.final_layernorm.weight"] = (h,)
    shapes["model.final_layernorm.bias"] = (h,)
    out, base = {}, 0
    for name, shape in list(shapes.items()):
        for prefix in ("", "optim.exp_avg.", "optim.exp_avg_sq."):
            out[prefix + name] = distinct(shape, base)
            base += math.prod(shape)
    out["optim.step"] = distinct((), base)
    return out


def gpt_cut(name: str, g: np.ndarray, tp: int, c: int) -> np.ndarray:
    """This tp rank's slice of global model tensor ``name`` (the Megatron convention)."""
    q, kv, hd, ffn = GPT["q"], GPT["kv"], GPT["hd"], GPT["ffn"]
    if name.endswith("word_embeddings.weight"):
        return cut_vocab(g, megatron_padded_vocab(GPT["vocab"], GPT["multiple"], tp), tp, c)
    if ".qkv." in name:
        return cut_fused(g, 0, (q, kv, kv), hd, tp, c)
    if ".gate_up." in name:
        return cut_fused(g, 0, (ffn, ffn), 1, tp, c)
    if name.endswith(("dense.weight", "down.weight")):
        return cut_even(g, 1, tp, c)
    return g


def gpt_local(glob: Mapping[str, np.ndarray], lay: Layout) -> dict[str, np.ndarray]:
    """One rank's state dict: model tensors with local layer numbers, then ZeRO-1 flat state."""
    tp, pp, dp = lay.size("tp"), lay.size("pp"), lay.size("dp")
    t, s, d = lay.coord("tp"), lay.coord("pp"), lay.coord("dp")
    per = GPT["layers"] // pp
    model: dict[str, str] = {}  # local name -> global name
    if s == 0:
        for n in ("model.embedding.word_embeddings.weight", "model.embedding.position_embeddings.weight"):
            model[n] = n
    for i in range(per):
        for gname in glob:
            prefix = f"model.layers.{s * per + i}."
            if gname.startswith(prefix):
                model[f"model.layers.{i}." + gname[len(prefix) :]] = gname
    if s == pp - 1:
        model["model.final_layernorm.weight"] = "model.final_layernorm.weight"
        model["model.final_layernorm.bias"] = "model.final_layernorm.bias"
        if pp > 1:
            model["model.lm_head.weight"] = "model.embedding.word_embeddings.weight"
    out = {ln: gpt_cut(gn, glob[gn], tp, t) for ln, gn in model.items()}
    for state in ("exp_avg", "exp_avg_sq"):
        moments = [gpt_cut(gn, glob[f"optim.{state}.{gn}"], tp, t) for gn in model.values()]
        out[f"optim.{state}"] = zero_partition(moments, dp, d)
    out["optim.step"] = glob["optim.step"]
    return out


def gpt_replication(name: str, tp: int, pp: int) -> np.ndarray | int:
    """How many ranks of one dp replica hold each element of global model tensor ``name``."""
    q, kv, hd = GPT["q"], GPT["kv"], GPT["hd"]
    if name.endswith("word_embeddings.weight"):
        return 2 if pp > 1 else 1
    if ".qkv." in name:
        rows = np.ones((q + 2 * kv) * hd, dtype=np.int64)
        rows[q * hd :] = max(1, tp // kv)
        return rows if name.endswith("bias") else rows[:, None]
    if name.endswith(("dense.weight", "down.weight")) or ".gate_up." in name:
        return 1
    return tp


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (2, 1, 2), (4, 1, 1), (1, 2, 2), (2, 2, 2), (4, 2, 3)])
def test_megatron_gpt_covers_every_element(tp: int, pp: int, dp: int) -> None:
    rules = load_rules(
        "megatron_gpt",
        vocab_size=GPT["vocab"],
        pad_to_multiple=GPT["multiple"],
        q_heads=GPT["q"],
        kv_heads=GPT["kv"],
        head_dim=GPT["hd"],
        ffn=GPT["ffn"],
        layers=GPT["layers"],
    )
    glob = gpt_globals()
    sim = Sim(glob)
    for lay in ranks(pp=pp, dp=dp, tp=tp):
        local = gpt_local(glob, lay)
        out = rules.resolve({k: a.shape for k, a in local.items()}, lay)
        assert list(out) == list(local)
        for name, arr in local.items():
            sim.check(out[name], arr)
    sim.assert_covered()
    for name in glob:
        if name.startswith("model."):
            want = dp * np.broadcast_to(gpt_replication(name, tp, pp), glob[name].shape)
            np.testing.assert_array_equal(sim.cov[name], want, err_msg=name)
            for state in ("exp_avg", "exp_avg_sq"):  # flat state: exactly once per dp group
                np.testing.assert_array_equal(sim.cov[f"optim.{state}.{name}"] * dp, sim.cov[name], err_msg=name)
    assert sim.cov["optim.step"] == tp * pp * dp


def test_megatron_gpt_undeclared_tensor_fails_closed() -> None:
    rules = load_rules("megatron_gpt", vocab_size=10, q_heads=2, kv_heads=2, head_dim=2, ffn=4, layers=2)
    with pytest.raises(RulesError) as e:
        rules.resolve({"model.layers.0.attention.rotary.inv_freq": (2,), "model.layers.0.mlp.router.weight": (4, 4)}, Layout.grid(tp=2))
    assert len(e.value.problems) == 2 and "no shard rule" in str(e.value)


def test_shipped_ddp_and_fsdp() -> None:
    assert set(shipped_rules()) >= {"megatron_gpt", "ddp", "fsdp"}
    g = {"model.w": distinct((5, 3)), "optim.state.0.exp_avg": distinct((5, 3), 100), "optim.state.0.step": distinct((), 200)}
    sim = Sim(g)
    ddp = load_rules("ddp")
    for lay in ranks(dp=3):
        out = ddp.resolve({k: a.shape for k, a in g.items()}, lay)
        for k, a in g.items():
            sim.check(out[k], a)
    assert all((c == 3).all() for c in sim.cov.values())
    fsdp, sim = load_rules("fsdp"), Sim(g)
    for lay in ranks(dp=3, tp=2):
        local = {k: cut_chunk(a, 0, 3, lay.coord("dp")) if a.ndim else a for k, a in g.items()}
        hints = {k: a.shape for k, a in g.items() if a.ndim}
        out = fsdp.resolve({k: a.shape for k, a in local.items()}, lay, global_shapes=hints)
        for k, a in local.items():
            sim.check(out[k], a)
    sim.assert_covered()
    assert load_rules("fsdp", axis="fsdp").shards[0].mesh == ("fsdp",)


def test_fsdp_buffers_parameter_declares_plain_tensors() -> None:
    local = {"model.bn.weight": (2,), "model.bn.running_mean": (4,), "model.bn.num_batches_tracked": ()}
    lay = Layout.grid(dp=2, rank=1)
    with pytest.raises(RulesError, match="needs the global shape") as e:
        load_rules("fsdp").resolve(local, lay, global_shapes={"model.bn.weight": (4,)})
    assert len(e.value.problems) == 2
    rules = load_rules("fsdp", buffers=r".*\.(running_mean|running_var|num_batches_tracked)")
    out = rules.resolve(local, lay, global_shapes={"model.bn.weight": (4,)})
    assert out["model.bn.weight"].pieces[0].region == Box((2,), (2,))
    assert out["model.bn.running_mean"].pieces[0].region == Box((0,), (4,))
