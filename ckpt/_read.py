"""Executing a load plan: ranged reads, checksum verification, copies into target tensors.

The planner (``ckpt._plan_load.plan_load``) decides which byte ranges to fetch and where each
element goes; this module does the I/O. Work is grouped by stored chunk and spread over a
thread pool (reads, CRC32C and zstd release the GIL). A chunk that maps whole onto a contiguous
part of a target tensor is read straight into the tensor's memory and checksummed piece by
piece while still in cache; everything else goes through one buffer per read.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ckpt._plan_load import CopyOp, LoadPlan, ReadOp, StoredChunk, plan_load
from ckpt._tensors import byte_view
from ckpt.codecs import CodecChain, Hasher, checksum
from ckpt.errors import ChunkFailure, CodecError, CorruptChunkError, ObjectNotFoundError, StoreError
from ckpt.mapping import TensorMapping
from ckpt.metadata import CHECKSUM_WIDTH, ChunkMeta, Manifest
from ckpt.regions import Box
from ckpt.store import Store

__all__ = ["stored_chunks", "read_into", "Target"]

#: Rows per slab of a transposing copy into a strided destination.
_SLAB = 64

#: ``(tensor to fill, its mapping)``.
Target = tuple[torch.Tensor, TensorMapping]


def stored_chunks(manifest: Manifest, names: Sequence[str]) -> dict[str, tuple[tuple[int, ...], list[StoredChunk]]]:
    """The planner's view of the manifest's chunks for the tensors ``names``."""
    out = {}
    for name in names:
        meta = manifest.tensors.get(name)
        if meta is None:
            continue
        out[name] = (tuple(meta.shape), [
            StoredChunk(
                name=name, index=i, box=Box(tuple(c.offsets), tuple(c.sizes)), order=c.order,
                object=manifest.data_prefix + c.object, byte_offset=c.byte_offset, byte_length=c.byte_length,
                itemsize=meta.itemsize, compressed=bool(c.codecs), block_bytes=c.block_bytes,
            )
            for i, c in enumerate(meta.chunks)
        ])
    return out


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))


def _destination(target: torch.Tensor, mapping: TensorMapping, op: CopyOp) -> torch.Tensor:
    """The view of ``target`` that receives ``op.inter``'s elements (global C order)."""
    piece = mapping.pieces[op.piece]
    rel = op.inter.relative_to(piece.region)
    if piece.local.sizes == piece.region.sizes:
        return target[_slices(rel.shift(piece.local.offsets))]
    start = piece.local.offsets[0]
    return target.reshape(-1)[start : start + piece.local.sizes[0]].view(piece.region.sizes)[_slices(rel)]


def _inverse(order: Sequence[int]) -> list[int]:
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return inv


def read_into(
    store: Store,
    manifest: Manifest,
    targets: Mapping[str, Target],
    *,
    verify: bool,
    threads: int,
    max_gap_bytes: int = 64 * 1024,
) -> tuple[int, LoadPlan]:
    """Fill every target tensor from the checkpoint. Returns (bytes read, plan).

    Raises:
        PlanError: a target needs a tensor or region the checkpoint does not have.
        CorruptChunkError: a chunk failed verification (all are listed).
    """
    names = sorted({p.name for _, m in targets.values() for p in m.pieces})
    plan = plan_load(stored_chunks(manifest, names), {k: m for k, (_, m) in targets.items()}, max_gap_bytes=max_gap_bytes)
    staged: dict[str, torch.Tensor] = {}
    work: dict[str, torch.Tensor] = {}
    for local, (t, m) in targets.items():
        if t.device.type != "cpu" or not t.is_contiguous() or t.is_conj() or t.is_neg():
            staged[local] = torch.empty(t.shape, dtype=t.dtype)
            work[local] = staged[local]
        else:
            work[local] = t
        covered = sum(p.local.numel for p in m.pieces)
        if covered < t.numel():  # padding rows no piece covers: zero, as on save
            work[local].zero_()
    reads: dict[tuple[str, int], list[ReadOp]] = defaultdict(list)
    copies: dict[tuple[str, int], list[CopyOp]] = defaultdict(list)
    chunks: dict[tuple[str, int], StoredChunk] = {}
    for r in plan.reads:
        key = (r.chunk.name, r.chunk.index)
        reads[key].append(r)
        chunks[key] = r.chunk
    for c in plan.copies:
        copies[(c.chunk.name, c.chunk.index)].append(c)

    def run(key: tuple[str, int]) -> tuple[int, Optional[ChunkFailure]]:
        meta = manifest.tensors[key[0]].chunks[key[1]]
        return _read_chunk(store, chunks[key], meta, reads[key], copies[key], targets, work, verify)

    keys = sorted(chunks, key=lambda k: (chunks[k].object, chunks[k].byte_offset))
    if threads <= 1 or len(keys) <= 1:
        results = [run(k) for k in keys]
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckpt-load") as pool:
            results = list(pool.map(run, keys))
    failures = [f for _, f in results if f is not None]
    if failures:
        raise CorruptChunkError(failures, where=f"{store.url} step {manifest.step} (save {manifest.save_id})")
    for local, buf in staged.items():
        with torch.no_grad():
            targets[local][0].copy_(buf)
    return sum(n for n, _ in results), plan


def _read_chunk(
    store: Store,
    chunk: StoredChunk,
    meta: ChunkMeta,
    reads: list[ReadOp],
    copies: list[CopyOp],
    targets: Mapping[str, Target],
    work: Mapping[str, torch.Tensor],
    verify: bool,
) -> tuple[int, Optional[ChunkFailure]]:
    def fail(reason: str) -> tuple[int, ChunkFailure]:
        return 0, ChunkFailure(chunk.name, chunk.object, chunk.byte_offset, chunk.byte_length, reason)

    try:
        direct = _direct_destination(chunk, copies, targets, work, store)
        if direct is not None:
            return _read_direct(store, chunk, meta, direct, verify, fail)
        buf = np.empty(meta.raw_length if chunk.compressed else chunk.byte_length, dtype=np.uint8)
        nbytes = 0
        for r in reads:
            nbytes += r.length
            if chunk.compressed:
                data = store.get_range(r.object, r.start, r.length) if r.length else b""
                problem = _verify_read(chunk, meta, r, data) if verify else None
                if problem:
                    return fail(problem)
                decoded = CodecChain.from_json(list(meta.codecs)).decode(memoryview(data), decoded_size=meta.raw_length)
                buf[:] = np.frombuffer(decoded, dtype=np.uint8)
                continue
            lo = r.start - chunk.byte_offset
            dst = memoryview(buf)[lo : lo + r.length]
            checker = _BlockChecker(meta, r, lo) if verify else None
            if not r.length:
                pass
            elif store.capabilities.readinto:  # straight into the buffer, verified piece by piece
                store.get_range_into(r.object, r.start, dst, on_piece=None if checker is None else checker.feed)
            else:
                dst[:] = store.get_range(r.object, r.start, r.length)
                if checker is not None:
                    checker.feed(dst)
            problem = checker.result() if checker is not None else None
            if problem:
                return fail(problem)
        for op in copies:
            _copy_out(buf, chunk, op, targets, work)
        return nbytes, None
    except ObjectNotFoundError as e:
        return fail(f"object missing: {e}")
    except StoreError as e:
        return fail(f"truncated or unreadable: {e}")
    except CodecError as e:
        return fail(f"does not decode: {e}")


class _BlockChecker:
    """Verifies an uncompressed read as its pieces arrive: the whole-chunk checksum for a whole
    read, else each block's checksum."""

    def __init__(self, meta: ChunkMeta, r: ReadOp, offset_in_chunk: int) -> None:
        self.meta, self.whole = meta, r.whole
        self.alg = meta.checksum.algorithm
        self.width = CHECKSUM_WIDTH[self.alg]
        self.block = r.first_block if not r.whole else 0
        self.hasher = Hasher(self.alg)
        self.filled = 0
        self.problem: Optional[str] = None

    def feed(self, piece: memoryview) -> None:
        if self.whole:
            self.hasher.update(piece)
            return
        size = self.meta.block_bytes
        while len(piece):
            take = piece[: size - self.filled]
            self.hasher.update(take)
            self.filled += len(take)
            piece = piece[len(take) :]
            if self.filled == size:
                self._close_block()

    def _close_block(self) -> None:
        want = self.meta.block_checksums[self.block * self.width : (self.block + 1) * self.width]
        got = self.hasher.hexdigest()
        if got != want and self.problem is None:
            self.problem = (f"{self.alg} checksum mismatch in block {self.block} of {self.meta.block_bytes} "
                            f"bytes (stored {want}, computed {got})")
        self.block += 1
        self.hasher = Hasher(self.alg)
        self.filled = 0

    def result(self) -> Optional[str]:
        if self.whole:
            got = self.hasher.hexdigest()
            if got != self.meta.checksum.value:
                return f"{self.alg} checksum mismatch (stored {self.meta.checksum.value}, computed {got})"
            return None
        if self.filled:  # the chunk's last, short block
            self._close_block()
        return self.problem


def _verify_read(chunk: StoredChunk, meta: ChunkMeta, r: ReadOp, data: bytes) -> Optional[str]:
    alg = meta.checksum.algorithm
    if r.whole:
        got = checksum(alg, data)
        if got != meta.checksum.value:
            return f"{alg} checksum mismatch (stored {meta.checksum.value}, computed {got})"
        return None
    width = CHECKSUM_WIDTH[alg]
    mv = memoryview(data)
    for b in range(r.first_block, r.last_block + 1):
        lo = b * meta.block_bytes - (r.start - chunk.byte_offset)
        want = meta.block_checksums[b * width : (b + 1) * width]
        got = checksum(alg, mv[lo : lo + meta.block_bytes])
        if got != want:
            return f"{alg} checksum mismatch in block {b} of {meta.block_bytes} bytes (stored {want}, computed {got})"
    return None


def _copy_out(buf: np.ndarray, chunk: StoredChunk, op: CopyOp, targets: Mapping[str, Target], work: Mapping[str, torch.Tensor]) -> None:
    parts = [buf[s : s + n] for s, n in op.runs]
    src_bytes = parts[0] if len(parts) == 1 else np.concatenate(parts)
    target, mapping = targets[op.local_name]
    dtype = target.dtype
    order = chunk.order
    shape = op.inter.permute(order).sizes if order else op.inter.sizes
    src = torch.from_numpy(src_bytes).view(dtype).reshape(shape) if src_bytes.size else torch.empty(shape, dtype=dtype)
    dst = _destination(work[op.local_name], mapping, op)
    with torch.no_grad():
        if order and not dst.is_contiguous() and src.dim() and src.shape[0] > _SLAB:
            # A transposing copy into a strided destination is much faster in slabs along the
            # stored-outermost dimension (cache-sized tiles) than in one go.
            inv = _inverse(order)
            for s0 in range(0, src.shape[0], _SLAB):
                n = min(_SLAB, src.shape[0] - s0)
                dst.narrow(order[0], s0, n).copy_(src[s0 : s0 + n].permute(inv))
        else:
            dst.copy_(src.permute(_inverse(order)) if order else src)


def _direct_destination(
    chunk: StoredChunk, copies: list[CopyOp], targets: Mapping[str, Target], work: Mapping[str, torch.Tensor], store: Store
) -> Optional[np.ndarray]:
    """The target bytes a whole uncompressed chunk can be read into directly, if any."""
    if chunk.compressed or chunk.order or len(copies) != 1 or not store.capabilities.readinto:
        return None
    op = copies[0]
    if op.inter != chunk.box:
        return None
    dst = _destination(work[op.local_name], targets[op.local_name][1], op)
    return byte_view(dst) if dst.is_contiguous() else None


def _read_direct(store: Store, chunk: StoredChunk, meta: ChunkMeta, dst: np.ndarray, verify: bool, fail) -> tuple[int, Optional[ChunkFailure]]:
    hasher = Hasher(meta.checksum.algorithm) if verify else None
    if chunk.byte_length:
        store.get_range_into(chunk.object, chunk.byte_offset, memoryview(dst), on_piece=None if hasher is None else hasher.update)
    if hasher is not None:
        got = hasher.hexdigest()
        if got != meta.checksum.value:
            return fail(f"{meta.checksum.algorithm} checksum mismatch (stored {meta.checksum.value}, computed {got})")
    return chunk.byte_length, None
