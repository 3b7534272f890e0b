"""Sharding rules: the universal checkpoint language. Pure (no torch); only ``load_rules`` reads.

A ``Rules`` set turns one rank's local tensor names and shapes, plus its ``Layout``, into
``TensorMapping``s: which box of each local tensor holds which region of which global tensor
(``ckpt.mapping``). Two stages, each matched by ``re.fullmatch`` on the tensor name:

1. **renames** (``Pipeline``, ``Tied``), applied in order, each to the output of the previous:
   they turn a local name into the global name (pipeline stages renumber their local layers;
   a tied weight is stored as the tensor it is tied to).
2. **shard rules** (``Replicated``, ``Split``, ``Fused``, ``Vocab``, ``ZeroFlat``, ``Sharded``),
   matched on the global name: exactly one must match every tensor.

``resolve`` fails closed: a tensor no shard rule matches, or that two match, is an error, never
a default (DeepSpeed UCP's silent dim-0 concatenation is what this avoids). Every problem of a
rank is listed in one ``RulesError``. See ``docs/layouts.md``.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
import string
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

from ckpt.errors import CheckpointError
from ckpt.layout import Layout
from ckpt.mapping import Piece, TensorMapping
from ckpt.regions import Box, flat_range_to_boxes

__all__ = [
    "RulesError",
    "Pipeline",
    "Tied",
    "Replicated",
    "Split",
    "Fused",
    "Vocab",
    "ZeroFlat",
    "Sharded",
    "Rules",
    "load_rules",
    "shipped_rules",
    "mapping_from_placements",
    "padded_vocab_size",
    "RULES_FORMAT",
    "RULES_VERSION",
]

RULES_FORMAT = "ckpt-rules"
RULES_VERSION = 1
MAX_RULES_BYTES = 1 << 20
MAX_RULES = 4096
MAX_PATTERN_CHARS = 1024
MAX_INT = 1 << 62
MAX_DIM = 64
VOCAB_PADDINGS = ("megatron", "multiple", "any")
ZERO_PARTITIONS = ("padded", "chunk")
_AXIS = re.compile(r"[a-z][a-z0-9_]{0,31}")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")


class RulesError(CheckpointError, ValueError):
    """Rules are malformed, or do not cover a rank's tensors; every problem is listed.

    Attributes:
        problems: one line per problem (tensor, rule, rank coordinate, what to do).
    """

    def __init__(self, problems: Sequence[str], *, where: str = "", fix: str = "") -> None:
        self.problems = tuple(problems)
        head = f"{len(self.problems)} problem(s){(' ' + where) if where else ''}"
        body = "\n  ".join(self.problems)
        super().__init__(f"{head}:\n  {body}" + (f"\n{fix}" if fix else ""))


class _Problem(RulesError):
    """One problem with one tensor; ``Rules.resolve`` collects them into one ``RulesError``."""

    def __init__(self, message: str) -> None:
        super().__init__([message])
        self.message = message

    def __str__(self) -> str:
        return self.message


# -- validation helpers --------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _rx(pattern: str) -> "re.Pattern[str]":
    return re.compile(pattern)


def _bad(msg: str) -> RulesError:
    return RulesError([msg])


def _check_pattern(pattern: Any, what: str = "pattern") -> "re.Pattern[str]":
    if not isinstance(pattern, str) or not pattern:
        raise _bad(f"{what} must be a non-empty string, got {pattern!r}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise _bad(f"{what} has {len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
    try:
        return _rx(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise _bad(f"{what} {pattern!r} is not a valid regular expression: {e}") from None


def _check_int(value: Any, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _check_axis(axis: Any) -> str:
    if not isinstance(axis, str) or not _AXIS.fullmatch(axis):
        raise _bad(f"axis {axis!r} must be a layout axis name (lowercase letters, digits, '_', e.g. 'tp')")
    return axis


def _check_choice(value: Any, what: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _bad(f"{what} must be one of {list(choices)}, got {value!r}")
    return value


def _check_template(template: Any, allowed: set[str], what: str, require: Optional[str] = None) -> str:
    """A ``str.format`` template using only plain ``{name}`` fields from ``allowed``."""
    if not isinstance(template, str) or not template or len(template) > MAX_PATTERN_CHARS:
        raise _bad(f"{what} must be a non-empty string of at most {MAX_PATTERN_CHARS} characters")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise _bad(f"{what} {template!r} is not a valid template: {e}") from None
    used = set()
    for _, field, spec, conv in parsed:
        if field is None:
            continue
        if field not in allowed or spec or conv:
            raise _bad(
                f"{what} {template!r}: field {{{field}}} is not allowed; use plain fields from {sorted(allowed)}"
            )
        used.add(field)
    if require and require not in used:
        raise _bad(f"{what} {template!r} must contain {{{require}}}")
    return template


def _as_tuple(value: Any) -> Any:
    """Lists (from JSON) to tuples, recursively; other values unchanged."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _describe(layout: Layout) -> str:
    coords = ", ".join(f"{n}={c}" for n, c in layout.coords.items()) or "single"
    return f"rank {layout.rank} ({coords} of {layout.describe()})"


def _chunk(total: int, n: int, c: int) -> tuple[int, int]:
    """torch.chunk / DTensor ``Shard``: ``(start, size)`` of part ``c`` of ``n`` (ceil pieces)."""
    size = -(-total // n) if total else 0
    start = min(c * size, total)
    return start, min(size, total - start)


def _replace(shape: Sequence[int], dim: int, size: int) -> tuple[int, ...]:
    return tuple(size if d == dim else s for d, s in enumerate(shape))


def _rows(shape: Sequence[int], dim: int, start: int, size: int) -> Box:
    """The box of ``shape`` with ``[start, start + size)`` along ``dim``, everything else whole."""
    return Box(_replace((0,) * len(shape), dim, start), _replace(shape, dim, size))


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
        m = _rx(self.pattern).fullmatch(name)
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
        m = _rx(self.pattern).fullmatch(name)
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
            start, size = _chunk(total, n, c)
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
        start, size = _chunk(sizes[d], ctx.layout.size(axis), ctx.layout.coord(axis))
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
        return any(_rx(p).fullmatch(local_name) for p in self.params)

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
        groups = {k: v or "" for k, v in _rx(self.pattern).fullmatch(ctx.name).groupdict().items()}  # type: ignore[union-attr]
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


# -- flat-range geometry -------------------------------------------------------------------------


def _flat_index(offsets: Sequence[int], shape: Sequence[int]) -> int:
    index = 0
    for o, s in zip(offsets, shape):
        index = index * s + o
    return index


def _contiguous_boxes(box: Box, shape: Sequence[int]) -> list[Box]:
    """Cut ``box`` into boxes each contiguous in the C-order flattening of ``shape``, in C order."""
    j = box.ndim - 1
    while j > 0 and box.sizes[j] == shape[j]:
        j -= 1
    if j <= 0 or all(s == 1 for s in box.sizes[:j]):
        return [box]
    out = []
    for head in itertools.product(*(range(o, e) for o, e in zip(box.offsets[:j], box.ends[:j]))):
        out.append(Box(tuple(head) + box.offsets[j:], (1,) * j + box.sizes[j:]))
    return out


# -- rule sets -----------------------------------------------------------------------------------


def _as_shape(shape: Any) -> Optional[tuple[int, ...]]:
    """``shape`` as a tuple of ints >= 0 (``torch.Size`` and numpy integers accepted), else None."""
    if not isinstance(shape, (tuple, list)) or len(shape) > MAX_DIM:
        return None
    try:
        out = tuple(operator.index(s) for s in shape)
    except TypeError:
        return None
    return out if all(s >= 0 for s in out) and not any(isinstance(s, bool) for s in shape) else None


_FIX_MATCH = (
    "Every tensor needs exactly one shard rule: add one whose pattern fullmatches the global name "
    "(Replicated if every rank holds it whole), or narrow overlapping patterns."
)
_FIX_FIT = "Check the rule's sizes (heads, vocabulary, layers) and axes against the model configuration and the layout."


@dataclass(frozen=True)
class Rules:
    """A named set of renames and shard rules.

    Attributes:
        renames: ``Pipeline`` / ``Tied`` rules, applied in order.
        shards: shard rules; exactly one must match each (renamed) tensor name.
        name: shown in errors and recorded in the manifest.
        description: free text.
    """

    renames: tuple[Rename, ...] = ()
    shards: tuple[ShardRule, ...] = ()
    name: str = "custom"
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "renames", tuple(self.renames))
        object.__setattr__(self, "shards", tuple(self.shards))
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise _bad(f"rules name {self.name!r} must be 1-64 letters, digits, '_', '.', '-'")
        if not isinstance(self.description, str) or len(self.description) > 4096:
            raise _bad("rules description must be a string of at most 4096 characters")
        if len(self.renames) + len(self.shards) > MAX_RULES:
            raise _bad(f"{len(self.renames) + len(self.shards)} rules; at most {MAX_RULES}")
        for i, r in enumerate(self.renames):
            if not isinstance(r, (Pipeline, Tied)):
                raise _bad(f"renames[{i}] is a {type(r).__name__}, not Pipeline or Tied")
        for i, r in enumerate(self.shards):
            if not isinstance(r, tuple(_SHARD_KINDS.values())):
                raise _bad(f"shards[{i}] is a {type(r).__name__}, not a shard rule")

    def global_name(self, local_name: str, layout: Layout) -> str:
        """``local_name`` after every rename (raises ``RulesError`` if a rename fails)."""
        try:
            return self._rename(local_name, layout)
        except _Problem as e:
            raise RulesError([f"{local_name!r} at {_describe(layout)}: {e}"]) from None

    def _rename(self, name: str, layout: Layout) -> str:
        for rule in self.renames:
            new = rule.rename(name, layout)
            name = name if new is None else new
        return name

    def matching(self, global_name: str) -> list[tuple[int, ShardRule]]:
        """``(index, rule)`` of every shard rule whose pattern fullmatches ``global_name``."""
        return [(i, r) for i, r in enumerate(self.shards) if _rx(r.pattern).fullmatch(global_name)]

    def resolve(
        self,
        local: Mapping[str, tuple[int, ...]],
        layout: Layout,
        *,
        global_shapes: Optional[Mapping[str, tuple[int, ...]]] = None,
    ) -> dict[str, TensorMapping]:
        """Map every local tensor of the rank at ``layout`` to global regions.

        Args:
            local: local name -> local shape, in state order (``ZeroFlat`` flattens in it).
            layout: the rank's layout.
            global_shapes: local name -> global shape, for tensors that know it (DTensors);
                ``Sharded`` rules need it.

        Returns:
            local name -> ``TensorMapping``.

        Raises:
            RulesError: listing every tensor no rule or several rules match, and every tensor
                whose shape does not fit its rule, each with the rank's coordinates.
        """
        hints = dict(global_shapes or {})
        where = _describe(layout)
        problems: list[str] = []
        out: dict[str, TensorMapping] = {}
        flats: list[tuple[_Ctx, ZeroFlat]] = []
        unmatched = 0
        for lname, raw in local.items():
            shape = _as_shape(raw)
            if shape is None:
                problems.append(f"{lname!r} at {where}: shape {raw!r} is not a tuple of integers >= 0")
                continue
            try:
                gname = self._rename(lname, layout)
            except _Problem as e:
                problems.append(f"{lname!r} at {where}: {e}")
                continue
            label = repr(lname) if gname == lname else f"{lname!r} (global name {gname!r})"
            hits = self.matching(gname)
            if len(hits) != 1:
                listed = "; ".join(f"shards[{i}] {r.describe()}" for i, r in hits)
                what = "no shard rule matches it" if not hits else f"{len(hits)} shard rules match it ({listed})"
                problems.append(f"{label} at {where}: {what}")
                unmatched += 1
                continue
            i, rule = hits[0]
            hint = hints.get(lname)
            ctx = _Ctx(lname, gname, shape, layout, f"{self.name}:shards[{i}]:{rule.kind}", None if hint is None else tuple(hint))
            if isinstance(rule, ZeroFlat):
                flats.append((ctx, rule))
                continue
            try:
                out[lname] = rule._map(ctx)
            except _Problem as e:
                problems.append(f"{label} at {where} [shards[{i}] {rule.describe()}]: {e}")
        flat_names = {ctx.local_name for ctx, _ in flats}
        for ctx, rule in flats:
            problems += self._resolve_flat(ctx, rule, local, out, flat_names, where)
        problems += _shape_conflicts(out, where)
        if problems:
            fix = [_FIX_MATCH] if unmatched else []
            fix += [_FIX_FIT] if len(problems) > unmatched else []
            fix.append("See docs/layouts.md.")
            raise RulesError(problems, where=f"resolving rules {self.name!r} at {where}", fix=" ".join(fix))
        return {name: out[name] for name in local}

    def _resolve_flat(self, ctx: _Ctx, rule: ZeroFlat, local: Mapping, out: dict, flat_names: set, where: str) -> list[str]:
        label = f"{ctx.local_name!r} at {where} [{ctx.rule} {rule.pattern!r}]"
        params, missing = [], []
        for name in local:
            if name == ctx.local_name or not rule.selects(name):
                continue
            if name in flat_names:
                return [f"{label}: its params select {name!r}, which is itself a zero_flat tensor"]
            if name not in out:
                missing.append(name)
            params.append(out.get(name))
        if missing:
            return [f"{label}: cannot place it while its params {missing} have problems (listed here)"]
        try:
            out[ctx.local_name] = rule._map_flat(ctx, params)
        except _Problem as e:
            return [f"{label}: {e}"]
        return []

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Plain JSON (placeholders already substituted); ``from_json`` reads it back."""
        return {
            "format": RULES_FORMAT,
            "version": RULES_VERSION,
            "name": self.name,
            "description": self.description,
            "renames": [r.to_json() for r in self.renames],
            "shards": [r.to_json() for r in self.shards],
        }

    @classmethod
    def from_json(cls, obj: Any, params: Optional[Mapping[str, Any]] = None) -> "Rules":
        """Validate untrusted rules JSON, substituting ``${name}`` placeholders from ``params``.

        Raises:
            RulesError: naming the field path of the first problem.
        """
        if not isinstance(obj, dict):
            raise _bad(f"rules must be a JSON object, got {type(obj).__name__}")
        allowed = {"format", "version", "name", "description", "parameters", "renames", "shards"}
        extra = sorted(set(map(str, obj)) - allowed)
        if extra:
            raise _bad(f"rules: unknown field(s) {extra}; allowed {sorted(allowed)}")
        if obj.get("format") != RULES_FORMAT or type(obj.get("version")) is not int:
            raise _bad(f"rules: 'format' must be {RULES_FORMAT!r} and 'version' an integer")
        if obj["version"] != RULES_VERSION:
            raise _bad(f"rules: version {obj['version']} is not supported (this reader knows {RULES_VERSION})")
        values = _parameter_values(obj.get("parameters", {}), dict(params or {}))
        lists = {}
        for key, kinds in (("renames", _RENAME_KINDS), ("shards", _SHARD_KINDS)):
            items = obj.get(key, [])
            if not isinstance(items, list) or len(items) > MAX_RULES:
                raise _bad(f"rules.{key} must be a list of at most {MAX_RULES} rules")
            try:
                lists[key] = tuple(_rule_from_json(item, kinds, f"{key}[{i}]", values) for i, item in enumerate(items))
            except RecursionError:
                raise _bad(f"rules.{key}: nested too deeply") from None
        try:
            return cls(lists["renames"], lists["shards"], obj.get("name", "custom"), obj.get("description", ""))
        except RulesError as e:
            raise _bad(f"rules: {e.problems[0]}") from None


def _shape_conflicts(out: Mapping[str, TensorMapping], where: str) -> list[str]:
    seen: dict[str, tuple[tuple[int, ...], str]] = {}
    problems = []
    for m in out.values():
        for name, shape in m.global_shapes.items():
            prev = seen.setdefault(name, (shape, m.local_name))
            if prev[0] != shape:
                problems.append(
                    f"global tensor {name!r} at {where}: {prev[1]!r} gives it shape {prev[0]} but {m.local_name!r} gives {shape}"
                )
    return problems


def _parameter_values(declared: Any, given: dict[str, Any]) -> dict[str, Any]:
    """Declared parameters (``{name: {"default": v, "doc": s}}``) merged with ``given``."""
    if not isinstance(declared, dict) or len(declared) > 256:
        raise _bad("rules.parameters must be an object {name: {'default': value, 'doc': text}}")
    values, missing = {}, []
    for name, spec in declared.items():
        if not isinstance(name, str) or not _PLACEHOLDER.fullmatch("${" + name + "}"):
            raise _bad(f"rules.parameters: {name!r} is not a valid parameter name")
        if not isinstance(spec, dict) or not set(spec) <= {"default", "doc"}:
            raise _bad(f"rules.parameters.{name} must be an object with 'default' and/or 'doc'")
        if name in given:
            values[name] = _as_param(given[name], name)
        elif "default" in spec:
            values[name] = _as_param(spec["default"], name)
        else:
            missing.append(name)
    unknown = sorted(set(given) - set(declared))
    if missing or unknown:
        parts = ([f"missing required parameter(s) {missing}"] if missing else []) + (
            [f"unknown parameter(s) {unknown}"] if unknown else []
        )
        raise _bad(f"rules parameters: {'; '.join(parts)}; declared: {sorted(declared)}")
    return values


def _as_param(value: Any, name: str) -> Any:
    if value is None or isinstance(value, str) or (type(value) is int and abs(value) <= MAX_INT):
        return value
    if isinstance(value, (list, tuple)) and len(value) <= 1 << 16 and all(type(v) is int for v in value):
        return list(value)
    raise _bad(f"parameter {name!r} must be null, a string, an integer or a list of integers, got {value!r}")


def _substitute(value: Any, values: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, list):
        return [_substitute(v, values, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    for name in _PLACEHOLDER.findall(value):
        if name not in values:
            raise _bad(f"{where}: placeholder ${{{name}}} names no declared parameter")
    whole = _PLACEHOLDER.fullmatch(value)
    if whole:
        return values[whole.group(1)]

    def text(m: "re.Match[str]") -> str:
        v = values[m.group(1)]
        if not isinstance(v, (str, int)):
            raise _bad(f"{where}: parameter {m.group(1)!r} = {v!r} cannot be inserted into text")
        return str(v)

    return _PLACEHOLDER.sub(text, value)


def _rule_from_json(item: Any, kinds: Mapping[str, type], where: str, values: Mapping[str, Any]) -> Any:
    if not isinstance(item, dict) or not isinstance(item.get("kind"), str):
        raise _bad(f"{where}: must be an object with a 'kind'")
    cls = kinds.get(item["kind"])
    if cls is None:
        raise _bad(f"{where}: unknown kind {item['kind']!r}; expected one of {sorted(kinds)}")
    names = {f.name for f in fields(cls)}
    extra = sorted(set(map(str, item)) - names - {"kind"})
    if extra:
        raise _bad(f"{where} ({item['kind']}): unknown field(s) {extra}; allowed {sorted(names)}")
    args = {k: _as_tuple(_substitute(v, values, f"{where}.{k}")) for k, v in item.items() if k != "kind"}
    try:
        return cls(**args)
    except RulesError as e:
        raise _bad(f"{where} ({item['kind']}): {e.problems[0]}") from None
    except TypeError as e:
        raise _bad(f"{where} ({item['kind']}): {e}") from None


# -- loading -------------------------------------------------------------------------------------


def shipped_rules() -> tuple[str, ...]:
    """Names of the rule sets shipped in ``ckpt/rules_data``."""
    folder = resources.files("ckpt") / "rules_data"
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json")))


def _parse_text(text: str, where: str, yaml_file: bool) -> Any:
    try:
        if yaml_file:
            try:
                import yaml
            except ImportError:
                raise _bad(f"{where}: reading YAML rules needs PyYAML (pip install pyyaml); or use JSON") from None
            return yaml.safe_load(text)

        def no_constant(c: str) -> Any:
            raise ValueError(f"{c} is not valid JSON")

        return json.loads(text, parse_constant=no_constant)
    except RulesError:
        raise
    except Exception as e:  # json: ValueError, RecursionError; yaml: yaml.YAMLError
        raise _bad(f"{where}: not valid {'YAML' if yaml_file else 'JSON'}: {type(e).__name__}: {e}") from None


def load_rules(name_or_path: Union[str, Path], **params: Any) -> Rules:
    """A shipped rule set (``"megatron_gpt"``, ``"ddp"``, ``"fsdp"``) or a JSON/YAML rules file.

    Args:
        name_or_path: a shipped name, or a path ending in ``.json``, ``.yaml`` or ``.yml``.
        **params: values for the file's ``${name}`` placeholders (e.g. ``vocab_size=50257``).

    Raises:
        RulesError: unknown name, unreadable or oversized file, invalid rules, missing or
            unknown parameters.
    """
    text_name = str(name_or_path)
    if isinstance(name_or_path, str) and re.fullmatch(r"[a-z0-9_]+", name_or_path):
        if name_or_path not in shipped_rules():
            raise _bad(f"no shipped rules named {name_or_path!r}; shipped: {list(shipped_rules())}, or pass a file path")
        data = (resources.files("ckpt") / "rules_data" / f"{name_or_path}.json").read_bytes()
    else:
        path = Path(name_or_path)
        try:
            size = path.stat().st_size
            if size > MAX_RULES_BYTES:
                raise _bad(f"rules file {text_name!r} has {size} bytes; at most {MAX_RULES_BYTES}")
            data = path.read_bytes()
        except OSError as e:
            raise _bad(f"cannot read rules file {text_name!r}: {e}") from None
    if len(data) > MAX_RULES_BYTES:
        raise _bad(f"rules {text_name!r} have {len(data)} bytes; at most {MAX_RULES_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"rules {text_name!r} are not UTF-8: {e}") from None
    obj = _parse_text(text, text_name, text_name.endswith((".yaml", ".yml")))
    try:
        return Rules.from_json(obj, params)
    except RulesError as e:
        raise RulesError(e.problems, where=f"in rules {text_name!r}") from None
