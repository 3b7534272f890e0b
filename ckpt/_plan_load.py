"""The load planner: what to read and copy to fill a target state from stored chunks.

Pure functions over frozen data (no torch, no I/O, no collectives); the save planner and the
shared messages are in ``ckpt._reshard``.

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
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ckpt._boxsets import find_gap
from ckpt._reshard import PlanError, fmt_box, fmt_shape, gc_paused
from ckpt.mapping import TensorMapping
from ckpt.regions import Box, box_runs, coalesce_runs

__all__ = ["StoredChunk", "CopyOp", "ReadOp", "LoadPlan", "plan_load"]


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


@gc_paused
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
            f"tensor {piece.name!r}: the state expects global shape {fmt_shape(expected)} "
            f"({_where(local_name, tm)}) but the checkpoint stores {list(shape)}"
        )
    region = piece.region
    if region.ndim != len(shape) or not Box.whole(shape).contains(region):
        return f"tensor {piece.name!r}: region {fmt_box(region)} ({_where(local_name, tm)}) lies outside its shape {list(shape)}"
    return None


def _piece_copies(local_name: str, p: int, tm: TensorMapping, index: _ChunkIndex) -> tuple[list[CopyOp], Optional[str]]:
    """The copies that fill piece ``p`` of a target, or a problem if chunks do not cover it."""
    region = tm.pieces[p].region
    hits = index.query(region)
    covered = sum(inter.numel for _, inter in hits)
    if covered != region.numel:
        gap = find_gap(region, [inter for _, inter in hits])
        return [], (
            f"tensor {tm.pieces[p].name!r}: region {fmt_box(region)} ({_where(local_name, tm)}, piece {p}) is not "
            f"fully covered by stored chunks ({region.numel - covered} of {region.numel} elements missing); "
            f"e.g. {fmt_box(gap) if gap else '?'} is not stored"
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
