"""Resharding planners: who writes which region on save, what to read and copy on load.

Pure functions over frozen data (no torch, no I/O, no collectives): every rank runs
``plan_save`` on the same gathered mappings and gets the same plan, so nothing is scattered;
each rank runs ``plan_load`` on the manifest and its own target mappings.

Save: pieces with the same ``(name, region)`` on several ranks are replicas and are written
once, by one holder, balancing bytes across ranks. The unique regions of each tensor must tile
it exactly (checked with a dedup + sweep, not pairwise, for large region counts).

Load: each target piece is intersected with the stored chunks of its tensor (found through a
sorted index along one dimension); each intersection becomes a ``CopyOp`` whose byte runs are
the intersection's elements inside the chunk's decoded bytes, in storage order. The runs of
all pieces on a chunk are merged into ``ReadOp``s: a whole chunk when it is compressed or has
no block checksums, else block-aligned ranged reads (gaps up to ``max_gap_bytes`` merged).

Executing a ``CopyOp`` (what a reader does): concatenate ``runs`` (each lies inside one
``ReadOp`` of its chunk), view them as ``inter.permute(chunk.order).sizes`` elements, permute
back to ``inter``'s dims, and copy into ``dst``, where ``dst`` is the target local tensor's
``piece.local`` box (or, for a flat piece, its 1-D range reshaped to ``piece.region.sizes``)
indexed by ``inter.relative_to(piece.region)``.
"""

from __future__ import annotations

import bisect
import itertools
import functools
import gc
import math
from dataclasses import dataclass
from operator import add, le
from typing import Mapping, Optional, Sequence

from ckpt._boxsets import find_gap, overlap_among
from ckpt.errors import CheckpointError
from ckpt.mapping import TensorMapping
from ckpt.metadata import DTYPE_ITEMSIZE
from ckpt.regions import Box, box_runs, coalesce_runs

__all__ = [
    "PlanError",
    "WriteItem",
    "SavePlan",
    "plan_save",
    "StoredChunk",
    "CopyOp",
    "ReadOp",
    "LoadPlan",
    "plan_load",
]

#: Ranks listed in full in a message before the list is abbreviated.
_MAX_RANGES_SHOWN = 12


def _gc_paused(fn):
    """Run ``fn`` with the cyclic garbage collector paused.

    The planners allocate O(pieces) long-lived tuples and lists (no reference cycles); on a
    heap holding the gathered mappings of thousands of ranks, the full collections those
    allocations trigger cost more than the planning itself (measured 2x at 4,096 ranks). The
    collector's previous state is restored; plain reference counting still frees everything.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper


class PlanError(CheckpointError, ValueError):
    """The mappings (save) or the target state (load) cannot be planned; every problem listed.

    Attributes:
        problems: one line per problem, each naming the tensor, the region and the ranks.
    """

    def __init__(self, problems: Sequence[str], *, what: str = "plan", fix: str = "") -> None:
        self.problems = list(problems)
        lines = "\n  ".join(self.problems)
        tail = f"\n{fix}" if fix else ""
        super().__init__(f"cannot {what} ({len(self.problems)} problem(s)):\n  {lines}{tail}")


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WriteItem:
    """One region a rank must write.

    Attributes:
        local_name: the local tensor holding it (key of that rank's mappings).
        piece: index into that tensor's ``TensorMapping.pieces``.
        name: the global tensor.
        region: the region of ``name`` to write (unique across the save).
        split_dim: the holder piece's ``split_dim`` (store this dim outermost).
    """

    local_name: str
    piece: int
    name: str
    region: Box
    split_dim: Optional[int]


@dataclass(frozen=True)
class SavePlan:
    """The writes of every rank and the global tensors they make up.

    Attributes:
        writes: ``writes[rank]``, in that rank's mapping order (local tensor, then piece).
        global_shapes: shape of every global tensor, including ones with no elements (which
            have no writes and are recorded with no chunks).
        dtypes: dtype name of every global tensor.
    """

    writes: tuple[tuple[WriteItem, ...], ...]
    global_shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]

    def bytes_per_rank(self) -> list[int]:
        """Bytes each rank writes (before codecs)."""
        return [
            sum(w.region.numel * DTYPE_ITEMSIZE[self.dtypes[w.name]] for w in ws) for ws in self.writes
        ]


# A holder of a region: (rank, local name, piece index, split_dim, sequence number).
_Holder = tuple[int, str, int, Optional[int], int]
# A region as a plain ``(offsets, sizes)`` tuple (hashed and compared in C).
_Key = tuple[tuple[int, ...], tuple[int, ...]]


@_gc_paused
def plan_save(mappings: Sequence[Mapping[str, TensorMapping]], dtypes: Sequence[Mapping[str, str]]) -> SavePlan:
    """Pick one writer per unique region, balancing bytes; check the regions tile each tensor.

    Args:
        mappings: ``mappings[rank][local_name]``: where that rank's local tensors live.
        dtypes: ``dtypes[rank][local_name]``: their dtype names (``"float32"``, ...).

    Returns:
        The plan. Regions are assigned largest first, each to the least-loaded rank holding it
        (ties to the lowest rank), so replicated state spreads over its replicas.

    Raises:
        PlanError: a tensor's global shape or dtype differs between ranks, a region lies
            outside its tensor, two different regions overlap, or the regions leave elements
            of a tensor uncovered. All problems are listed.
    """
    if len(mappings) != len(dtypes):
        raise PlanError([f"{len(mappings)} ranks of mappings but {len(dtypes)} ranks of dtypes"], what="plan the save")
    meta, disagree, regions, problems = _gather(mappings, dtypes)
    cut = {p.name for tms in mappings for tm in tms.values() if not tm.rule.endswith(FLAT_RULE) for p in tm.pieces}
    problems += _disagreements(mappings, dtypes, disagree)
    good: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in sorted(regions):
        if name not in disagree:
            found = _tiling_problems(name, meta[name][0], regions[name])
            if found and "overlap without being identical" in found[0] and name not in cut:
                # Replicas cut differently by flat partitions (a tied weight's ZeRO state on two
                # stages): refine the regions along all boundaries; equal cells are replicas.
                # Only for tensors held through flat partitions: anywhere else an unequal
                # overlap is a rules bug and stays an error.
                regions[name] = _refine(regions[name], len(meta[name][0]))
                found = _tiling_problems(name, meta[name][0], regions[name])
            problems += found
            if not found:
                good[name] = meta[name]
    if problems:
        raise PlanError(
            problems,
            what="plan the save",
            fix="Every rank must agree on each global tensor's shape and dtype, and the ranks' "
            "regions of it must be identical replicas or disjoint and cover it; check the sharding rules.",
        )
    return SavePlan(_assign(len(mappings), good, regions), {n: good[n][0] for n in good}, {n: good[n][1] for n in good})


#: ``TensorMapping.rule`` suffix of flat partitions (``ckpt.rules.ZeroFlat``).
FLAT_RULE = ":zero_flat"


def _refine(held: Mapping[_Key, list], ndim: int) -> dict[_Key, list]:
    """Cut every region at every other region's boundaries; cells held by several ranks become
    replicas of each other. Only used for tensors whose regions overlap unequally."""
    boxes = [rec[0] for rec in held.values() if rec[0].numel]
    cuts = [sorted({b.offsets[d] for b in boxes} | {b.ends[d] for b in boxes}) for d in range(ndim)]
    out: dict[_Key, list] = {}
    for key, rec in held.items():
        box = rec[0]
        if not box.numel:
            out[key] = rec
            continue
        segments = []
        for d in range(ndim):
            lo, hi = bisect.bisect_left(cuts[d], box.offsets[d]), bisect.bisect_right(cuts[d], box.ends[d])
            cs = cuts[d][lo:hi]
            segments.append(list(zip(cs[:-1], cs[1:])))
        for combo in itertools.product(*segments):
            cell = Box(tuple(a for a, _ in combo), tuple(b - a for a, b in combo))
            ck = (cell.offsets, cell.sizes)
            if ck in out:
                out[ck].extend(rec[1:])
            else:
                out[ck] = [cell, *rec[1:]]
    return out


def _gather(
    mappings: Sequence[Mapping[str, TensorMapping]], dtypes: Sequence[Mapping[str, str]]
) -> tuple[dict[str, tuple[tuple[int, ...], str]], set[str], dict[str, dict[_Key, list]], list[str]]:
    """Group every piece by tensor and region.

    Returns:
        ``(meta, disagree, regions, problems)``: the first ``(shape, dtype)`` seen per tensor,
        the tensors whose shape or dtype differs somewhere, ``regions[name][(offsets, sizes)] =
        [region, holder, ...]`` (plain tuple keys hash in C), and local problems (dtypes).
    """
    bad: dict[str, list[int]] = {}  # problem -> ranks
    meta: dict[str, tuple[tuple[int, ...], str]] = {}  # first (shape, dtype) seen per tensor
    disagree: set[str] = set()
    regions: dict[str, dict[_Key, list]] = {}
    seq = 0
    for rank, (tms, dts) in enumerate(zip(mappings, dtypes)):
        for local_name, tm in tms.items():
            dtype = dts.get(local_name)
            if dtype not in DTYPE_ITEMSIZE:
                what = "has no dtype" if dtype is None else f"has dtype {dtype!r}, not one of {sorted(DTYPE_ITEMSIZE)}"
                _note(bad, f"local tensor {local_name!r} {what}", rank)
                continue
            for name, shape in tm.global_shapes.items():  # tensors with no (non-empty) piece
                if name not in meta and not math.prod(shape):
                    meta[name] = (tuple(shape), dtype)
                    regions.setdefault(name, {})
            last = None
            for i, piece in enumerate(tm.pieces):
                name = piece.name
                if name != last:  # consecutive pieces of one tensor share shape and dtype
                    last, shape = name, tm.global_shapes.get(name)
                    if shape is None:
                        held = None
                        _note(bad, f"tensor {name!r}: local tensor {local_name!r} has a piece of it but no global shape", rank)
                    else:
                        known = meta.setdefault(name, (tuple(shape), dtype))
                        if known[1] != dtype or known[0] != tuple(shape):
                            disagree.add(name)
                        held = regions.setdefault(name, {})
                if held is None:
                    continue
                region = piece.region
                key = (region.offsets, region.sizes)
                rec = held.get(key)
                if rec is None:
                    held[key] = [region, (rank, local_name, i, piece.split_dim, seq)]
                else:
                    rec.append((rank, local_name, i, piece.split_dim, seq))
                seq += 1
    problems = [f"{msg} on {'rank' if len(r) == 1 else 'ranks'} {_ranges(r)}" for msg, r in bad.items()]
    return meta, disagree, regions, problems


def _disagreements(
    mappings: Sequence[Mapping[str, TensorMapping]], dtypes: Sequence[Mapping[str, str]], names: set[str]
) -> list[str]:
    """For tensors whose shape or dtype differs between ranks: which ranks say what."""
    if not names:
        return []
    shapes: dict[str, dict[tuple[int, ...], list[int]]] = {n: {} for n in names}
    kinds: dict[str, dict[str, list[int]]] = {n: {} for n in names}
    for rank, (tms, dts) in enumerate(zip(mappings, dtypes)):
        for local_name, tm in tms.items():
            for piece in tm.pieces:
                if piece.name in names and piece.name in tm.global_shapes and dts.get(local_name) in DTYPE_ITEMSIZE:
                    _note(shapes[piece.name], tuple(tm.global_shapes[piece.name]), rank)
                    _note(kinds[piece.name], dts.get(local_name), rank)
    out = []
    for name in sorted(names):
        if len(shapes[name]) > 1:
            out.append(f"tensor {name!r}: global shape differs between ranks: " + _by_value(shapes[name]))
        if len(kinds[name]) > 1:
            out.append(f"tensor {name!r}: dtype differs between ranks: " + _by_value(kinds[name]))
    return out


def _note(groups: dict, value: object, rank: int) -> None:
    ranks = groups.setdefault(value, [])
    if not ranks or ranks[-1] != rank:
        ranks.append(rank)


def _assign(world: int, tensors: Mapping[str, tuple[tuple[int, ...], str]], regions: Mapping[str, Mapping[_Key, list]]) -> tuple[tuple[WriteItem, ...], ...]:
    """Largest region first to the least-loaded holder (ties: lowest rank)."""
    items = []
    for name, (_, dtype) in tensors.items():
        size = DTYPE_ITEMSIZE[dtype]
        for key, rec in regions[name].items():
            n = math.prod(key[1])
            if n:
                items.append((-n * size, name, key, rec))
    items.sort()  # (bytes, name, key) is unique: the lists are never compared
    load = [0] * world
    chosen: list[list[tuple[int, WriteItem]]] = [[] for _ in range(world)]
    for neg, name, _, rec in items:
        if len(rec) == 2:
            best = rec[1]
        else:
            best = min(rec[1:], key=lambda h: (load[h[0]], h[0], h[4]))
        rank, local_name, piece, split_dim, seq = best
        load[rank] -= neg
        chosen[rank].append((seq, WriteItem(local_name, piece, name, rec[0], split_dim)))
    for ws in chosen:
        ws.sort(key=lambda t: t[0])
    return tuple(tuple(w for _, w in ws) for ws in chosen)


def _tiling_problems(name: str, shape: tuple[int, ...], held: Mapping[_Key, list]) -> list[str]:
    """The problems with how the distinct regions of one tensor cover ``shape``."""
    out = []
    ndim, numel = len(shape), math.prod(shape)
    recs, los, his = [], [], []
    covered = 0
    for (offsets, sizes), rec in held.items():
        ends = tuple(map(add, offsets, sizes))
        if len(offsets) != ndim or not all(map(le, ends, shape)):
            out.append(f"tensor {name!r}: region {_fmt(rec[0])} on {_ranks(rec[1:])} lies outside its shape {list(shape)}")
            continue
        n = math.prod(sizes)
        if n:
            recs.append(rec)
            los.append(offsets)
            his.append(ends)
            covered += n
    if out:
        return out
    pair = overlap_among(los, his)
    if pair is not None:
        a, b = recs[pair[0]], recs[pair[1]]
        return [
            f"tensor {name!r}: region {_fmt(a[0])} on {_ranks(a[1:])} and region {_fmt(b[0])} on "
            f"{_ranks(b[1:])} overlap without being identical"
        ]
    if covered != numel:
        gap = find_gap(Box.whole(shape), [rec[0] for rec in recs])
        return [
            f"tensor {name!r}: the ranks hold {covered} of its {numel} elements; e.g. region "
            f"{_fmt(gap)} is held by no rank"
        ]
    return []


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredChunk:
    """One stored chunk of a global tensor, as the load planner needs it.

    Attributes:
        name: the global tensor.
        index: the chunk's index in the tensor's manifest chunk list.
        box: the region it stores.
        order: storage order of the box's dims (``None``: C order).
        object: data object name.
        byte_offset: first byte of the (encoded) chunk in the object.
        byte_length: encoded length (``box.numel * itemsize`` when not compressed).
        itemsize: bytes per element.
        compressed: the chunk has codecs (any: byteshuffle reorders bytes too), so it is read
            and decoded whole.
        block_bytes: with a checksum per block of this many stored bytes (last block short),
            a reader may fetch whole blocks only; 0 means one checksum for the chunk.
    """

    name: str
    index: int
    box: Box
    order: Optional[tuple[int, ...]]
    object: str
    byte_offset: int
    byte_length: int
    itemsize: int
    compressed: bool
    block_bytes: int

    def __post_init__(self) -> None:
        if self.itemsize < 1 or self.byte_offset < 0 or self.block_bytes < 0:
            raise ValueError(f"chunk {self.index} of {self.name!r}: itemsize must be >= 1, byte_offset and block_bytes >= 0")
        if not self.compressed and self.byte_length != self.box.numel * self.itemsize:
            raise ValueError(
                f"chunk {self.index} of {self.name!r}: uncompressed byte_length {self.byte_length} != "
                f"{self.box.numel} elements x {self.itemsize} bytes"
            )

    @property
    def num_blocks(self) -> int:
        """Number of checksummed blocks (1 without block checksums)."""
        if self.compressed or not self.block_bytes:
            return 1
        return max(1, -(-self.byte_length // self.block_bytes))


@dataclass(frozen=True)
class CopyOp:
    """Move the elements of ``inter`` from a chunk into a target piece.

    Attributes:
        local_name: the target local tensor.
        piece: index into its ``TensorMapping.pieces``.
        chunk: the source chunk.
        inter: global coordinates, inside both ``chunk.box`` and the piece's region.
        runs: ``(byte offset, byte length)`` within the chunk's decoded bytes, in storage
            order; their concatenation is ``inter``'s elements in the chunk's storage order.
    """

    local_name: str
    piece: int
    chunk: StoredChunk
    inter: Box
    runs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ReadOp:
    """One ranged GET.

    Attributes:
        object: data object name.
        start: absolute first byte in the object.
        length: bytes to read.
        chunk: the chunk the bytes belong to.
        whole: the entire chunk (verify its checksum; decode it) vs a block-aligned sub-range
            of an uncompressed chunk (verify those blocks' checksums).
        first_block: first block covered (0 when whole).
        last_block: last block covered, inclusive (``chunk.num_blocks - 1`` when whole).
    """

    object: str
    start: int
    length: int
    chunk: StoredChunk
    whole: bool
    first_block: int
    last_block: int


@dataclass(frozen=True)
class LoadPlan:
    """What one rank reads and where the bytes go.

    Attributes:
        reads: ranged reads, sorted by (object, start); no two overlap.
        copies: copies into target pieces, in target order (local tensor, piece, chunk).
        bytes_needed: bytes of the target pieces (elements x itemsize).
        bytes_read: sum of the reads' lengths.
    """

    reads: tuple[ReadOp, ...]
    copies: tuple[CopyOp, ...]
    bytes_needed: int
    bytes_read: int


class _ChunkIndex:
    """The non-empty chunks of one tensor, sorted by offset along the dim where their offsets
    are most distinct; a query scans only chunks whose offset can reach the queried box."""

    def __init__(self, chunks: Sequence[StoredChunk]) -> None:
        live = [c for c in chunks if c.box.numel]
        ndim = live[0].box.ndim if live else 0
        self.dim = max(range(ndim), key=lambda k: (len({c.box.offsets[k] for c in live}), -k)) if ndim else -1
        if self.dim >= 0:
            live.sort(key=lambda c: c.box.offsets[self.dim])
        self.chunks = live
        self.los = [c.box.offsets[self.dim] for c in live] if self.dim >= 0 else []
        self.span = max((c.box.sizes[self.dim] for c in live), default=0) if self.dim >= 0 else 0
        self.itemsize = live[0].itemsize if live else 1

    def query(self, region: Box) -> list[tuple[StoredChunk, Box]]:
        if self.dim < 0:
            cands = self.chunks
        else:
            q = region.offsets[self.dim]
            lo = bisect.bisect_right(self.los, q - self.span)  # earlier chunks end at or before q
            hi = bisect.bisect_left(self.los, q + region.sizes[self.dim])
            cands = self.chunks[lo:hi]
        out = []
        for c in cands:
            inter = c.box.intersect(region)
            if inter is not None:
                out.append((c, inter))
        return out


@_gc_paused
def plan_load(
    stored: Mapping[str, tuple[tuple[int, ...], Sequence[StoredChunk]]],
    targets: Mapping[str, TensorMapping],
    *,
    max_gap_bytes: int = 64 * 1024,
) -> LoadPlan:
    """Plan the reads and copies that fill ``targets`` from a checkpoint.

    Args:
        stored: ``name -> (global shape, chunks)`` of the checkpoint's tensors. The chunks of a
            tensor must not overlap (``parse_manifest`` checks that).
        targets: this rank's local tensors and where their pieces lie in the global tensors.
        max_gap_bytes: two block-aligned ranges of a chunk closer than this are read as one.

    Raises:
        PlanError: a target tensor is not in the checkpoint, its global shape differs from the
            stored one, or a target region is not fully covered by stored chunks. All listed.
    """
    if max_gap_bytes < 0:
        raise ValueError(f"max_gap_bytes {max_gap_bytes} must be >= 0")
    problems: list[str] = []
    absent: dict[str, set[str]] = {}
    indexes: dict[str, _ChunkIndex] = {}
    copies: list[CopyOp] = []
    needed: dict[tuple[str, int], tuple[StoredChunk, list[tuple[int, int]]]] = {}
    bytes_needed = 0
    for local_name, tm in targets.items():
        for p, piece in enumerate(tm.pieces):
            entry = stored.get(piece.name)
            if entry is None:
                absent.setdefault(piece.name, set()).add(local_name)
                continue
            problem = _target_problem(local_name, p, tm, tuple(entry[0]))
            if problem is None and piece.region.numel:
                index = indexes.get(piece.name)
                if index is None:
                    index = indexes[piece.name] = _ChunkIndex(entry[1])
                ops, problem = _piece_copies(local_name, p, tm, index)
                copies += ops
                bytes_needed += piece.region.numel * index.itemsize
                for op in ops:
                    key = (op.chunk.name, op.chunk.index)
                    if key not in needed:
                        needed[key] = (op.chunk, [])
                    needed[key][1].extend(op.runs)
            if problem is not None:
                problems.append(problem)
    for name, locals_ in sorted(absent.items()):
        problems.append(f"tensor {name!r} (wanted by local tensor(s) {sorted(locals_)[:4]}) is not in the checkpoint")
    if problems:
        raise PlanError(
            list(dict.fromkeys(problems)),  # a flat tensor's pieces repeat its shape problem
            what="plan the load",
            fix="Build the model with the configuration that wrote the checkpoint (shapes must match; "
            "the parallel layout may differ).",
        )
    reads: list[ReadOp] = []
    for chunk, runs in needed.values():
        reads += _chunk_reads(chunk, runs, max_gap_bytes)
    reads.sort(key=lambda r: (r.object, r.start))
    return LoadPlan(tuple(reads), tuple(copies), bytes_needed, sum(r.length for r in reads))


def _where(local_name: str, tm: TensorMapping) -> str:
    return f"local tensor {local_name!r}" + (f", rule {tm.rule!r}" if tm.rule else "")


def _target_problem(local_name: str, p: int, tm: TensorMapping, shape: tuple[int, ...]) -> Optional[str]:
    """Why piece ``p`` of a target cannot load from a tensor stored with ``shape``, if it can't."""
    piece = tm.pieces[p]
    expected = tm.global_shapes.get(piece.name)
    if expected is None or tuple(expected) != shape:
        return (
            f"tensor {piece.name!r}: the state expects global shape {_shape(expected)} "
            f"({_where(local_name, tm)}) but the checkpoint stores {list(shape)}"
        )
    region = piece.region
    if region.ndim != len(shape) or not Box.whole(shape).contains(region):
        return f"tensor {piece.name!r}: region {_fmt(region)} ({_where(local_name, tm)}) lies outside its shape {list(shape)}"
    return None


def _piece_copies(local_name: str, p: int, tm: TensorMapping, index: _ChunkIndex) -> tuple[list[CopyOp], Optional[str]]:
    """The copies that fill piece ``p`` of a target, or a problem if chunks do not cover it."""
    region = tm.pieces[p].region
    hits = index.query(region)
    covered = sum(inter.numel for _, inter in hits)
    if covered != region.numel:
        gap = find_gap(region, [inter for _, inter in hits])
        return [], (
            f"tensor {tm.pieces[p].name!r}: region {_fmt(region)} ({_where(local_name, tm)}, piece {p}) is not "
            f"fully covered by stored chunks ({region.numel - covered} of {region.numel} elements missing); "
            f"e.g. {_fmt(gap) if gap else '?'} is not stored"
        )
    ops = []
    for chunk, inter in hits:
        size = chunk.itemsize
        runs = tuple((s * size, n * size) for s, n in box_runs(chunk.box, inter, chunk.order))
        ops.append(CopyOp(local_name, p, chunk, inter, runs))
    return ops, None


def _chunk_reads(chunk: StoredChunk, runs: list[tuple[int, int]], max_gap: int) -> list[ReadOp]:
    """Block-aligned, coalesced reads of one chunk covering ``runs`` (decoded byte runs)."""
    whole = ReadOp(chunk.object, chunk.byte_offset, chunk.byte_length, chunk, True, 0, chunk.num_blocks - 1)
    size, block = chunk.byte_length, chunk.block_bytes
    if chunk.compressed or not block:
        return [whole]
    aligned = sorted({(s - s % block, min(size, -(-(s + n) // block) * block)) for s, n in runs if n})
    merged = coalesce_runs(((a, b - a) for a, b in aligned), max_gap=max_gap)
    if merged == [(0, size)]:
        return [whole]
    return [
        ReadOp(chunk.object, chunk.byte_offset + s, n, chunk, False, s // block, (s + n - 1) // block)
        for s, n in merged
    ]


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------
def _fmt(box: Box) -> str:
    return f"offsets {list(box.offsets)} sizes {list(box.sizes)}"


def _shape(shape: Optional[Sequence[int]]) -> str:
    return "(none)" if shape is None else str(list(shape))


def _ranks(holders: Sequence[_Holder]) -> str:
    ranks = sorted({h[0] for h in holders})
    return ("rank " if len(ranks) == 1 else "ranks ") + _ranges(ranks)


def _ranges(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``; long lists are cut after ``_MAX_RANGES_SHOWN`` ranges."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans[:_MAX_RANGES_SHOWN])
    if len(spans) > _MAX_RANGES_SHOWN:
        text += f",... ({len(ranks)} ranks)"
    return text


def _by_value(groups: Mapping[object, list[int]]) -> str:
    def show(v: object) -> str:
        return str(list(v)) if isinstance(v, tuple) else str(v)

    return "; ".join(f"{show(v)} on {'rank' if len(r) == 1 else 'ranks'} {_ranges(r)}" for v, r in groups.items())
