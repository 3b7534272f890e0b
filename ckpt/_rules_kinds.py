"""The rule kinds of the rules language: renames (``Pipeline``, ``Tied``) and shard rules
(``Replicated``, ``Split``, ``Fused``, ``Vocab``, ``Sharded``, ``ZeroFlat``). See ``ckpt.rules``."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Optional, Sequence, Union

from ckpt.layout import Layout
from ckpt.mapping import Piece, TensorMapping
from ckpt.regions import Box, flat_range_to_boxes
from ckpt._rules_base import (
    _as_shape,
    MAX_DIM,
    RulesError,
    VOCAB_PADDINGS,
    ZERO_PARTITIONS,
    _NAME,
    _Problem,
    _as_tuple,
    _bad,
    _check_axis,
    _check_choice,
    _check_int,
    _check_pattern,
    _check_template,
    even_chunk,
    _contiguous_boxes,
    _describe,
    _flat_index,
    _jsonable,
    _replace,
    _rows,
    compiled_pattern,
)

# -- renames -------------------------------------------------------------------------------------


class _Rule:
    """Shared JSON plumbing of the rule dataclasses."""

    kind: ClassVar[str] = ""
    pattern: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}}  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"{self.kind} {self.pattern!r}"


@dataclass(frozen=True)
class Pipeline(_Rule):
    """Renumber layers: local index ``i`` on pipeline stage ``s`` is global ``offset(s) + i``.

    Attributes:
        pattern: regex with a named group ``layer`` (digits), e.g. ``r"model\\.layers\\.(?P<layer>\\d+)\\..+"``.
        axis: the pipeline axis of the layout.
        layers: total layers; stages hold ``layers // pp`` each (must divide evenly).
        stage_layers: layers per stage for uneven splits (its length must equal the pp size).
    """

    kind: ClassVar[str] = "pipeline"
    pattern: str
    axis: str = "pp"
    layers: Optional[int] = None
    stage_layers: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if "layer" not in _check_pattern(self.pattern).groupindex:
            raise _bad(f"pipeline pattern {self.pattern!r} needs a named group (?P<layer>\\d+)")
        _check_axis(self.axis)
        if self.layers is not None:
            _check_int(self.layers, "pipeline layers", 1, 1 << 20)
        if self.stage_layers is not None:
            object.__setattr__(self, "stage_layers", _as_tuple(self.stage_layers))
            if not isinstance(self.stage_layers, tuple) or not 1 <= len(self.stage_layers) <= 1 << 16:
                raise _bad(f"pipeline stage_layers must be a list of layer counts, got {self.stage_layers!r}")
            for n in self.stage_layers:
                _check_int(n, "pipeline stage_layers entry", 0, 1 << 20)
            if self.layers is not None and sum(self.stage_layers) != self.layers:
                raise _bad(f"pipeline stage_layers {list(self.stage_layers)} sum to {sum(self.stage_layers)}, not layers={self.layers}")

    def stage_sizes(self, pp: int) -> Optional[tuple[int, ...]]:
        """Layers held by each of ``pp`` stages (``None``: unknown, only allowed at ``pp == 1``)."""
        if self.stage_layers is not None:
            if len(self.stage_layers) != pp:
                raise _Problem(f"pipeline stage_layers has {len(self.stage_layers)} entries but {self.axis}={pp}; give one count per stage")
            return self.stage_layers
        if self.layers is None:
            if pp == 1:
                return None
            raise _Problem(f"pipeline rule {self.pattern!r} needs layers= (or stage_layers=) to renumber at {self.axis}={pp}")
        if self.layers % pp:
            raise _Problem(f"{self.layers} layers do not split evenly over {self.axis}={pp}; give stage_layers=[...]")
        return (self.layers // pp,) * pp

    def rename(self, name: str, layout: Layout) -> Optional[str]:
        """The name with its layer index made global, or ``None`` if the pattern does not match."""
        m = compiled_pattern(self.pattern).fullmatch(name)
        if m is None:
            return None
        text = m.group("layer")
        if text is None or not (text.isascii() and text.isdigit()):
            raise _Problem(f"pipeline group 'layer' matched {text!r}, not a layer number")
        local, stage = int(text), layout.coord(self.axis)
        sizes = self.stage_sizes(layout.size(self.axis))
        offset = 0
        if sizes is not None:
            if local >= sizes[stage]:
                raise _Problem(f"local layer {local} but stage {self.axis}={stage} holds {sizes[stage]} layers")
            offset = sum(sizes[:stage])
        return name[: m.start("layer")] + str(offset + local) + name[m.end("layer") :]

    def locate(self, layer: int, pp: int) -> tuple[int, int]:
        """The inverse: ``(stage, local index)`` of global ``layer`` at pipeline size ``pp``."""
        sizes = self.stage_sizes(pp) or (layer + 1,)
        offset = 0
        for stage, n in enumerate(sizes):
            if layer < offset + n:
                return stage, layer - offset
            offset += n
        raise _bad(f"layer {layer} is beyond the {offset} layers of stages {list(sizes)}")


@dataclass(frozen=True)
class Tied(_Rule):
    """A local tensor stored as (a replica of) another global tensor.

    Attributes:
        pattern: regex on the (renamed) name, e.g. ``r"model\\.lm_head\\.weight"``.
        target: the global name; may use ``{group}`` fields naming the pattern's named groups.
    """

    kind: ClassVar[str] = "tied"
    pattern: str
    target: str

    def __post_init__(self) -> None:
        groups = set(_check_pattern(self.pattern).groupindex)
        _check_template(self.target, groups, "tied target")

    def rename(self, name: str, layout: Layout) -> Optional[str]:
        m = compiled_pattern(self.pattern).fullmatch(name)
        if m is None:
            return None
        return self.target.format(**{k: v or "" for k, v in m.groupdict().items()})


# -- shard rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    """One tensor being mapped on one rank."""

    local_name: str
    name: str
    shape: tuple[int, ...]
    layout: Layout
    rule: str
    global_shape: Optional[tuple[int, ...]] = None

    def mapping(self, pieces: Sequence[Piece], global_shape: Sequence[int]) -> TensorMapping:
        kept = tuple(p for p in pieces if p.local.numel)
        return TensorMapping(self.local_name, self.shape, kept, {self.name: tuple(global_shape)}, self.rule)

    def need_dim(self, dim: int) -> None:
        if dim >= len(self.shape):
            raise _Problem(f"rule splits dim {dim} but the local tensor has shape {self.shape}")


@dataclass(frozen=True)
class Replicated(_Rule):
    """Every rank holds the whole tensor (norms, biases of row-parallel layers, ``step``)."""

    kind: ClassVar[str] = "replicated"
    pattern: str

    def __post_init__(self) -> None:
        _check_pattern(self.pattern)

    def _map(self, ctx: _Ctx) -> TensorMapping:
        box = Box.whole(ctx.shape)
        return ctx.mapping([Piece(box, ctx.name, box)], ctx.shape)


@dataclass(frozen=True)
class Split(_Rule):
    """Cut along ``dim`` over ``axis``: dim 0 column-parallel, dim 1 row-parallel.

    Attributes:
        dim: the split dimension.
        axis: the layout axis.
        global_size: the global size of ``dim`` for uneven (torch.chunk / DTensor) splits: rank
            ``c`` holds ``[c*k, (c+1)*k)`` clipped to it, ``k = ceil(global_size / n)``, so the
            last ranks may hold fewer rows or none. ``None``: even, global = local * n.
    """

    kind: ClassVar[str] = "split"
    pattern: str
    dim: int = 0
    axis: str = "tp"
    global_size: Optional[int] = None

    def __post_init__(self) -> None:
        _check_pattern(self.pattern)
        _check_int(self.dim, "split dim", 0, MAX_DIM - 1)
        _check_axis(self.axis)
        if self.global_size is not None:
            _check_int(self.global_size, "split global_size")

    def _map(self, ctx: _Ctx) -> TensorMapping:
        ctx.need_dim(self.dim)
        n, c = ctx.layout.size(self.axis), ctx.layout.coord(self.axis)
        if self.global_size is None:
            total, size = ctx.shape[self.dim] * n, ctx.shape[self.dim]
            start = c * size
        else:
            total = self.global_size
            start, size = even_chunk(total, n, c)
            want = _replace(ctx.shape, self.dim, size)
            if want != ctx.shape:
                raise _Problem(
                    f"expected local shape {want} (dim {self.dim} of size {total} in torch.chunk pieces over "
                    f"{self.axis}={n}) but got {ctx.shape}"
                )
        local = _rows(ctx.shape, self.dim, 0, size)
        region = _rows(ctx.shape, self.dim, start, size)
        return ctx.mapping([Piece(local, ctx.name, region, self.dim)], _replace(ctx.shape, self.dim, total))


@dataclass(frozen=True)
class Fused(_Rule):
    """Sub-parameters concatenated along ``dim`` (QKV, SwiGLU gate/up), each split over ``axis``.

    The global tensor is the unsharded one: parts concatenated in order, all units of each.
    Locally each rank holds its units of every part, concatenated in the same part order.
    A part of ``n`` units over ``t`` ranks: ``n % t == 0`` -> rank ``c`` holds units
    ``[c*n/t, (c+1)*n/t)``; ``t % n == 0`` (GQA, fewer KV heads than ranks) -> rank ``c`` holds
    the one unit ``c*n // t`` (replicas across ``t/n`` ranks, Megatron's convention).

    Attributes:
        dim: the fused dimension.
        parts: ``((name, units), ...)``, e.g. ``(("q", 32), ("k", 8), ("v", 8))``.
        unit: rows per unit along ``dim`` (``head_dim`` for attention, 1 for gate/up).
        axis: the layout axis.
    """

    kind: ClassVar[str] = "fused"
    pattern: str
    dim: int = 0
    parts: tuple[tuple[str, int], ...] = ()
    unit: int = 1
    axis: str = "tp"

    def __post_init__(self) -> None:
        _check_pattern(self.pattern)
        _check_int(self.dim, "fused dim", 0, MAX_DIM - 1)
        _check_int(self.unit, "fused unit", 1)
        _check_axis(self.axis)
        parts = _as_tuple(self.parts)
        object.__setattr__(self, "parts", parts)
        if not isinstance(parts, tuple) or not 1 <= len(parts) <= 256:
            raise _bad(f"fused parts must be a list of [name, units] pairs, got {self.parts!r}")
        for p in parts:
            if not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and _NAME.fullmatch(p[0])):
                raise _bad(f"fused part {p!r} must be [name, units] with a short name")
            _check_int(p[1], f"fused part {p[0]!r} units", 1)
        if len({p[0] for p in parts}) != len(parts):
            raise _bad(f"fused part names {[p[0] for p in parts]} repeat")

    def _map(self, ctx: _Ctx) -> TensorMapping:
        ctx.need_dim(self.dim)
        n, c = ctx.layout.size(self.axis), ctx.layout.coord(self.axis)
        pieces, local_off, global_off = [], 0, 0
        for part, units in self.parts:
            if units % n == 0:
                held, first = units // n, c * (units // n)
            elif n % units == 0:
                held, first = 1, c * units // n
            else:
                raise _Problem(f"fused part {part!r} has {units} units, which neither divides evenly over nor into {self.axis}={n}")
            rows = held * self.unit
            if local_off + rows <= ctx.shape[self.dim]:
                local = _rows(ctx.shape, self.dim, local_off, rows)
                region = _rows(ctx.shape, self.dim, global_off + first * self.unit, rows)
                pieces.append(Piece(local, ctx.name, region, self.dim))
            local_off += rows
            global_off += units * self.unit
        if local_off != ctx.shape[self.dim]:
            want = _replace(ctx.shape, self.dim, local_off)
            raise _Problem(f"expected local shape {want} (parts {list(self.parts)} x {self.unit} over {self.axis}={n}) but got {ctx.shape}")
        return ctx.mapping(pieces, _replace(ctx.shape, self.dim, global_off))


def padded_vocab_size(vocab_size: int, axis_size: int, pad_to_multiple: int = 1, padding: str = "megatron") -> int:
    """The padded vocabulary of a vocab-parallel embedding.

    ``megatron``: ``ceil(V / (M * tp)) * M * tp`` (``make_vocab_size_divisible_by`` times the TP
    size); ``multiple``: ``ceil(V / M) * M``, which must divide by ``tp``.
    """
    _check_choice(padding, "vocab padding", VOCAB_PADDINGS[:2])
    _check_int(vocab_size, "vocab size", 1)
    _check_int(axis_size, "axis size", 1)
    _check_int(pad_to_multiple, "pad_to_multiple", 1)
    step = pad_to_multiple * axis_size if padding == "megatron" else pad_to_multiple
    padded = -(-vocab_size // step) * step
    if padded % axis_size:
        raise _bad(f"vocabulary {vocab_size} padded to a multiple of {pad_to_multiple} is {padded}, which does not divide over {axis_size} ranks")
    return padded


@dataclass(frozen=True)
class Vocab(_Rule):
    """Vocabulary-parallel embedding / LM head: padded rows split over ``axis``, padding dropped.

    Rank ``c`` holds padded rows ``[c*R, (c+1)*R)``, ``R = padded / n``; the global tensor has
    exactly ``size`` rows, so rows ``>= size`` are padding (not saved, zero on load) and a target
    with another padding pads its own way.

    Attributes:
        size: the real vocabulary size ``V``.
        dim: the vocabulary dimension (0 for embeddings and ``[V, hidden]`` LM heads).
        pad_to_multiple: ``M`` (Megatron's ``make_vocab_size_divisible_by``).
        padding: ``megatron`` (pad to ``M * n``), ``multiple`` (pad to ``M``, must divide by
            ``n``), or ``any`` (accept the local size, requiring ``local * n >= V``).
    """

    kind: ClassVar[str] = "vocab"
    pattern: str
    size: int = 0
    dim: int = 0
    axis: str = "tp"
    pad_to_multiple: int = 1
    padding: str = "megatron"

    def __post_init__(self) -> None:
        _check_pattern(self.pattern)
        _check_int(self.size, "vocab size", 1)
        _check_int(self.dim, "vocab dim", 0, MAX_DIM - 1)
        _check_axis(self.axis)
        _check_int(self.pad_to_multiple, "vocab pad_to_multiple", 1, 1 << 30)
        _check_choice(self.padding, "vocab padding", VOCAB_PADDINGS)

    def _map(self, ctx: _Ctx) -> TensorMapping:
        ctx.need_dim(self.dim)
        n, c = ctx.layout.size(self.axis), ctx.layout.coord(self.axis)
        if self.padding == "any":
            per_rank = ctx.shape[self.dim]
            if per_rank * n < self.size:
                raise _Problem(f"{per_rank} rows x {self.axis}={n} cannot hold a vocabulary of {self.size}")
        else:
            try:
                per_rank = padded_vocab_size(self.size, n, self.pad_to_multiple, self.padding) // n
            except RulesError as e:
                raise _Problem(e.problems[0]) from None
            want = _replace(ctx.shape, self.dim, per_rank)
            if want != ctx.shape:
                raise _Problem(
                    f"expected local shape {want} (vocabulary {self.size} padded '{self.padding}' to a multiple "
                    f"of {self.pad_to_multiple}, over {self.axis}={n}) but got {ctx.shape}"
                )
        start = c * per_rank
        real = max(0, min(per_rank, self.size - start))
        piece = Piece(_rows(ctx.shape, self.dim, 0, real), ctx.name, _rows(ctx.shape, self.dim, start, real), self.dim)
        return ctx.mapping([piece], _replace(ctx.shape, self.dim, self.size))


def _norm_placements(mesh_axes: Sequence[str], placements: Sequence[Any]) -> tuple[tuple[str, tuple], ...]:
    """Validate ``placements`` (one per mesh axis) as plain data; raises ``RulesError``."""
    mesh_axes, placements = _as_tuple(mesh_axes), _as_tuple(placements)
    if not isinstance(mesh_axes, tuple) or not isinstance(placements, tuple) or len(mesh_axes) != len(placements):
        raise _bad(f"mesh axes {mesh_axes!r} and placements {placements!r} must be lists of equal length")
    for axis in mesh_axes:
        _check_axis(axis)
    if not 1 <= len(mesh_axes) <= 16 or len(set(mesh_axes)) != len(mesh_axes):
        raise _bad(f"mesh axes {list(mesh_axes)} must be 1 to 16 distinct layout axes")
    out = []
    for axis, p in zip(mesh_axes, placements):
        if p == ("replicate",):
            out.append((axis, p))
        elif isinstance(p, tuple) and len(p) == 2 and p[0] == "shard":
            out.append((axis, ("shard", _check_int(p[1], "shard dim", 0, MAX_DIM - 1))))
        elif isinstance(p, tuple) and p and p[0] == "partial":
            raise _bad(f"placement {p!r} on {axis!r}: a Partial DTensor is not saved; redistribute it to Replicate first")
        else:
            raise _bad(f"placement {p!r} on {axis!r} must be ['shard', dim] or ['replicate'] (strided shards are not supported)")
    return tuple(out)


def _placement_pieces(ctx: _Ctx, placements: tuple[tuple[str, tuple], ...]) -> TensorMapping:
    gshape = ctx.global_shape
    if gshape is None:
        raise _Problem("a 'sharded' rule needs the global shape: pass global_shapes={name: dtensor.shape} to resolve")
    offsets, sizes, split_dim = [0] * len(gshape), list(gshape), None
    for axis, p in placements:
        if p[0] != "shard":
            continue
        d = p[1]
        if d >= len(gshape):
            raise _Problem(f"placement shards dim {d} of a {len(gshape)}-d tensor (global shape {gshape})")
        start, size = even_chunk(sizes[d], ctx.layout.size(axis), ctx.layout.coord(axis))
        offsets[d] += start
        sizes[d] = size
        split_dim = d if split_dim is None else split_dim
    if tuple(sizes) != ctx.shape:
        desc = ", ".join(f"{a}:{'/'.join(map(str, p))}" for a, p in placements)
        raise _Problem(f"expected local shape {tuple(sizes)} (global {gshape}, placements {desc}) but got {ctx.shape}")
    local = Box.whole(ctx.shape)
    return ctx.mapping([Piece(local, ctx.name, Box(tuple(offsets), ctx.shape), split_dim)], gshape)


def mapping_from_placements(
    name: str,
    local_shape: Sequence[int],
    global_shape: Sequence[int],
    layout: Layout,
    mesh_axes: Sequence[str],
    placements: Sequence[Any],
    *,
    local_name: Optional[str] = None,
    rule: str = "dtensor",
) -> TensorMapping:
    """The mapping of a DTensor's local shard, from its placements as plain data.

    Follows DTensor: each ``("shard", dim)`` cuts the current extent of ``dim`` in torch.chunk
    pieces (ceil, trailing ranks possibly empty); several mesh axes sharding one dim nest in
    mesh order. ``split_dim`` is the first sharded dim.

    Args:
        name: the global tensor name.
        local_shape: the local shard's shape (validated).
        global_shape: the DTensor's shape.
        layout: this rank's layout; ``mesh_axes`` are among its axes.
        mesh_axes: the layout axis of each DTensor mesh dimension, in mesh order.
        placements: one per mesh axis: ``("shard", dim)`` or ``("replicate",)``.
        local_name: the local tensor's name (defaults to ``name``).
        rule: recorded in the mapping.

    Raises:
        RulesError: malformed placements, ``partial``, or a local shape that does not match.
    """
    norm = _norm_placements(mesh_axes, placements)
    lshape, gshape = _as_shape(local_shape), _as_shape(global_shape)
    if lshape is None or gshape is None or len(lshape) != len(gshape):
        raise _bad(f"{name!r}: local shape {local_shape!r} and global shape {global_shape!r} must be shapes of one rank")
    ctx = _Ctx(local_name or name, name, lshape, layout, rule, gshape)
    try:
        return _placement_pieces(ctx, norm)
    except _Problem as e:
        raise RulesError([f"{ctx.local_name!r} at {_describe(layout)}: {e}"]) from None


@dataclass(frozen=True)
class Sharded(_Rule):
    """DTensor-style placements (FSDP2 ``Shard(0)``); needs ``resolve(global_shapes=...)``.

    Attributes:
        mesh: the layout axis of each mesh dimension, e.g. ``("dp",)``.
        placements: one per mesh axis: ``("shard", dim)`` or ``("replicate",)``.
    """

    kind: ClassVar[str] = "sharded"
    pattern: str
    mesh: tuple[str, ...] = ("dp",)
    placements: tuple[tuple[Any, ...], ...] = (("shard", 0),)

    def __post_init__(self) -> None:
        _check_pattern(self.pattern)
        norm = _norm_placements(self.mesh, self.placements)
        object.__setattr__(self, "mesh", tuple(a for a, _ in norm))
        object.__setattr__(self, "placements", tuple(p for _, p in norm))

    def _map(self, ctx: _Ctx) -> TensorMapping:
        return _placement_pieces(ctx, tuple(zip(self.mesh, self.placements)))


@dataclass(frozen=True)
class ZeroFlat(_Rule):
    """A flat 1-D partition of concatenated parameters (ZeRO-1/2 optimizer state, flat buffers).

    The parameters are the local tensors whose local names fullmatch one of ``params``, in the
    order of the local state (``resolve``'s mapping order). Their (tensor-parallel local) flat
    concatenation is partitioned over ``axis``; each element lands in the global tensor
    ``template.format(param=<global name of that element's tensor>, **pattern groups)``, at the
    place the parameter's own mapping gives it. Elements of padding stay padding.

    Attributes:
        params: regexes on local names, e.g. ``(r"model\\..+",)``.
        template: global name of each parameter's state, e.g. ``"optim.exp_avg.{param}"``.
        axis: the data-parallel axis.
        align: ``padded`` partitions: total padded to a multiple of ``n * align``, each rank
            holds ``[c*P, (c+1)*P)``; ``chunk`` partitions: ``P = ceil(total / (n*align)) * align``
            clipped to the total (trailing ranks hold less, or nothing).
        partition: ``padded`` (DeepSpeed ZeRO-1/2, Megatron distributed optimizer) or ``chunk``.
    """

    kind: ClassVar[str] = "zero_flat"
    pattern: str
    params: tuple[str, ...] = ()
    template: str = ""
    axis: str = "dp"
    align: int = 1
    partition: str = "padded"

    def __post_init__(self) -> None:
        groups = set(_check_pattern(self.pattern).groupindex)
        params = _as_tuple(self.params)
        object.__setattr__(self, "params", params)
        if not isinstance(params, tuple) or not 1 <= len(params) <= 256:
            raise _bad(f"zero_flat params must be a list of 1 to 256 regexes, got {self.params!r}")
        for p in params:
            _check_pattern(p, "zero_flat params entry")
        _check_template(self.template, groups | {"param"}, "zero_flat template", require="param")
        _check_axis(self.axis)
        _check_int(self.align, "zero_flat align", 1, 1 << 30)
        _check_choice(self.partition, "zero_flat partition", ZERO_PARTITIONS)

    def selects(self, local_name: str) -> bool:
        return any(compiled_pattern(p).fullmatch(local_name) for p in self.params)

    def _range(self, total: int, layout: Layout) -> tuple[int, int, int]:
        """``(start, stop, local numel)`` of this rank's partition."""
        n, c = layout.size(self.axis), layout.coord(self.axis)
        q = n * self.align
        if self.partition == "padded":
            per = -(-total // q) * q // n
            start = c * per
            return start, min(start + per, total), per
        per = -(-total // q) * self.align
        start = min(c * per, total)
        stop = min(start + per, total)
        return start, stop, stop - start

    def _map_flat(self, ctx: _Ctx, params: Sequence[TensorMapping]) -> TensorMapping:
        groups = {k: v or "" for k, v in compiled_pattern(self.pattern).fullmatch(ctx.name).groupdict().items()}  # type: ignore[union-attr]
        total = sum(math.prod(m.local_shape) for m in params)
        start, stop, numel = self._range(total, ctx.layout)
        if ctx.shape != (numel,):
            raise _Problem(
                f"expected a flat local shape ({numel},) ({total} elements of {len(params)} parameters, "
                f"partition '{self.partition}' over {self.axis}={ctx.layout.size(self.axis)}, align {self.align}) but got {ctx.shape}"
            )
        found: list[tuple[int, Piece]] = []
        gshapes: dict[str, tuple[int, ...]] = {}
        offset = 0
        for m in params:
            size = math.prod(m.local_shape)
            for gname, gshape in m.global_shapes.items():
                gshapes[self.template.format(param=gname, **groups)] = gshape
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                for box in flat_range_to_boxes(m.local_shape, lo - offset, hi - offset):
                    for piece in m.pieces:
                        found += self._sub_pieces(box, piece, m.local_shape, offset - start, groups)
            offset += size
        found.sort(key=lambda t: t[0])
        return TensorMapping(ctx.local_name, ctx.shape, tuple(p for _, p in found), gshapes, ctx.rule)

    def _sub_pieces(self, box: Box, piece: Piece, shape: tuple[int, ...], base: int, groups: dict) -> list:
        if piece.local.sizes != piece.region.sizes:
            raise _Problem(f"parameter piece of {piece.name!r} is itself flat; zero_flat params must be unflattened tensors")
        inter = box.intersect(piece.local)
        if inter is None:
            return []
        name = self.template.format(param=piece.name, **groups)
        delta = tuple(r - l for r, l in zip(piece.region.offsets, piece.local.offsets))
        out = []
        for sub in _contiguous_boxes(inter, shape):
            at = base + _flat_index(sub.offsets, shape)
            out.append((at, Piece(Box((at,), (sub.numel,)), name, sub.shift(delta))))
        return out


ShardRule = Union[Replicated, Split, Fused, Vocab, ZeroFlat, Sharded]
Rename = Union[Pipeline, Tied]
_SHARD_KINDS = {k.kind: k for k in (Replicated, Split, Fused, Vocab, ZeroFlat, Sharded)}
_RENAME_KINDS = {k.kind: k for k in (Pipeline, Tied)}


