"""``ckpt.save``: every rank writes the tensors it owns in parallel; one rank commits.

Collectives (three, all tiny JSON): gather the local tensor lists (and rank 0's save id),
gather each rank's written chunks or its error, broadcast the commit outcome. A failure on any
rank fails the save on every rank, names the rank, deletes the partial data, and commits
nothing; the previous step stays the latest.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union, cast

import numpy as np
import torch

from ckpt import _commit
from ckpt._comm import Comm, default_comm
from ckpt._reshard import PlanError, SavePlan, WriteItem, plan_save
from ckpt._save_plan import pack_objects
from ckpt._sharding import layout_json, local_mappings, resolve_rules
from ckpt._state import FlatState, flatten, mark_shards
from ckpt._tensors import byte_view, dtype_name, host_contiguous
from ckpt.codecs import DEFAULT_CHECKSUM, Hasher, checksum, default_chain
from ckpt.layout import Layout
from ckpt.mapping import Piece, TensorMapping, mapping_from_json, mapping_to_json
from ckpt.regions import Box, split_box
from ckpt.errors import SaveFailedError
from ckpt.metadata import (
    MAX_STEP,
    Checksum,
    ChunkMeta,
    Manifest,
    SaveRef,
    TensorMeta,
    new_save_id,
)
from ckpt.store import Store, open_store

__all__ = ["save", "SaveResult"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024 * 1024
#: Uncompressed chunks carry a checksum per block this size, so sub-ranges can be verified.
BLOCK_BYTES = 256 * 1024
MAX_OBJECT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class SaveResult:
    """What a committed save wrote.

    Attributes:
        step: the step saved.
        save_id: the id of this save (its manifest is ``manifests/step-<step>.<save_id>.json``).
        url: the checkpoint root.
        logical_bytes: decoded size of every tensor in the checkpoint.
        stored_bytes: bytes of data objects written by all ranks (after compression).
        rank_bytes: bytes this rank wrote.
        seconds: wall time of the whole save on this rank.
    """

    step: int
    save_id: str
    url: str
    logical_bytes: int
    stored_bytes: int
    rank_bytes: int
    seconds: float


def resolve_compression(store: Store, compression: Union[str, None, bool]) -> Optional[str]:
    if compression == "auto":
        return "zstd" if store.capabilities.compress_by_default else None
    if compression in (None, False, "none"):
        return None
    if compression in (True, "zstd"):
        return "zstd"
    raise ValueError(f"compression must be 'auto', 'zstd' or None, got {compression!r}")


def save(
    state: Any,
    url: Union[str, Store],
    *,
    step: int,
    storage_options: Optional[Mapping[str, Any]] = None,
    compression: Union[str, None, bool] = "auto",
    compression_level: int = 3,
    checksum_algorithm: str = DEFAULT_CHECKSUM,
    keep_last: Optional[int] = None,
    extras: Optional[Mapping[str, Any]] = None,
    rank_local: Sequence[str] = (),
    layout: Optional[Layout] = None,
    rules: Any = None,
    io_threads: Optional[int] = None,
    comm: Optional[Comm] = None,
) -> SaveResult:
    """Save ``state`` as step ``step`` under ``url`` and commit it.

    Under ``torch.distributed`` every rank calls ``save`` with its own state. Tensors with the
    same name on several ranks are replicas of one logical tensor and are written once (the
    writes spread across the replicas); tensors under a top-level key listed in ``rank_local``
    are kept per rank (e.g. RNG states).

    Args:
        state: nested dicts/lists/tuples of tensors, numpy arrays, plain values and objects
            with ``state_dict()``/``load_state_dict()`` (modules, optimizers, schedulers).
        url: checkpoint root: a path, ``file://``, ``s3://bucket/prefix``, any fsspec URL,
            ``memory://name``, or a ``Store``.
        step: training step, 0 <= step < 10**12.
        storage_options: fsspec options (e.g. S3 endpoint and credentials).
        compression: ``"auto"`` (zstd on object stores, off on local disk), ``"zstd"`` or None.
        compression_level: zstd level.
        checksum_algorithm: ``"crc32c"`` (default) or ``"xxh3_64"``.
        keep_last: after committing, keep only the newest N steps (see ``ckpt.retain``).
        extras: user metadata stored in the manifest (a JSON object).
        rank_local: top-level state keys whose tensors are per rank, not replicas.
        layout: this rank's place in the parallel layout (``ckpt.layout.Layout``); recorded in
            the manifest. Required with ``rules`` when there is more than one rank.
        rules: sharding rules (``ckpt.rules.Rules`` or a shipped name) mapping each local tensor
            to its region of the logical tensor, so the checkpoint loads into any layout. Every
            tensor must be covered by exactly one rule. Without rules, equal names are replicas.
        io_threads: parallel writes per rank (default: min(4, CPUs)).
        comm: collectives to use (default: ``torch.distributed`` if initialised, else local).

    Returns:
        A ``SaveResult`` once the manifest is durable.

    Raises:
        SaveFailedError: a rank failed; nothing was committed.
        UnsupportedStateError: the state holds a value that cannot be stored without pickle.
    """
    started = time.perf_counter()
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an int in [0, {MAX_STEP}], got {step!r}")
    store = open_store(url, storage_options=storage_options)
    comm = comm or default_comm()
    rank = comm.rank
    codec = resolve_compression(store, compression)
    threads = io_threads or min(4, os.cpu_count() or 1)
    rules_obj = resolve_rules(rules)

    flat, mappings, local_error = None, {}, None
    try:
        flat = flatten(state, rank_local=tuple(rank_local), rank=rank)
        mappings = local_mappings(flat.tensors, layout, rules_obj, rank, comm.world_size)
        info = {n: mapping_to_json(m) for n, m in mappings.items()}
        dtypes = {n: dtype_name(t.dtype) for n, t in flat.tensors.items()}
    except Exception as e:  # every rank must reach the gather, or the others hang
        local_error, info, dtypes = e, {}, {}
    created = time.time_ns()
    proposal = new_save_id(created, secrets.randbits(32)) if rank == 0 else None
    gathered = comm.all_gather_json({
        "mappings": info, "dtypes": dtypes, "save_id": proposal, "created": created,
        "error": None if local_error is None else f"{type(local_error).__name__}: {local_error}",
    })
    if local_error is not None:
        raise local_error
    bad = {r: g["error"] for r, g in enumerate(gathered) if g["error"]}
    if bad:
        raise SaveFailedError(bad, step=step)
    flat = cast(FlatState, flat)
    save_id = gathered[0]["save_id"]
    ref = SaveRef(step, save_id)
    try:
        plan = plan_save(
            [{n: mapping_from_json(n, m) for n, m in g["mappings"].items()} for g in gathered],
            [g["dtypes"] for g in gathered],
        )
    except PlanError as e:  # identical on every rank: the input was gathered
        raise SaveFailedError({r: str(e) for r in range(comm.world_size)}, step=step) from e

    written: dict[str, list] = {}
    error = None
    try:
        items = plan.writes[rank]
        written = _write_items(store, ref, rank, items, flat.tensors, mappings, codec, compression_level, checksum_algorithm, threads)
    except Exception as e:  # latched: decided at the commit point, on every rank
        log.exception("rank %d: writing step %d failed", rank, step)
        error = f"{type(e).__name__}: {e}"
    whole = {n for n, m in mappings.items() if _is_whole(n, m)}
    tree = mark_shards(flat.tree, set(mappings) - whole)
    results = comm.all_gather_json({"error": error, "chunks": written, "tree": tree})
    failures = {r: res["error"] for r, res in enumerate(results) if res["error"]}

    outcome: dict[str, Any] = {"error": None}
    if rank == 0:
        recorded = layout_json(layout, rules_obj)
        outcome = _commit_or_clean(store, ref, gathered, results, failures, plan, recorded, extras, keep_last)
    outcome = comm.broadcast_json(outcome, src=0)
    if failures:
        raise SaveFailedError(failures, step=step)
    if outcome["error"]:
        raise SaveFailedError({0: outcome["error"]}, step=step)
    rank_bytes = sum(c["byte_length"] for cs in written.values() for c in cs)
    return SaveResult(
        step=step,
        save_id=save_id,
        url=store.url,
        logical_bytes=outcome["logical_bytes"],
        stored_bytes=outcome["stored_bytes"],
        rank_bytes=rank_bytes,
        seconds=time.perf_counter() - started,
    )


def _commit_or_clean(
    store: Store,
    ref: SaveRef,
    gathered: list,
    results: list,
    failures: dict,
    plan: SavePlan,
    layout: Optional[Mapping[str, Any]],
    extras: Optional[Mapping[str, Any]],
    keep_last: Optional[int],
) -> dict:
    """Rank 0: write the manifest if every rank succeeded, else remove the partial data."""
    if failures:
        _commit.delete_save_data(store, ref)
        return {"error": None}
    try:
        chunks: dict[str, list[ChunkMeta]] = {name: [] for name in plan.global_shapes}
        for res in results:
            for name, records in res["chunks"].items():
                chunks[name].extend(_chunk_from_json(c) for c in records)
        tensors = {
            name: TensorMeta(dtype=plan.dtypes[name], shape=tuple(shape), chunks=tuple(chunks[name]))
            for name, shape in plan.global_shapes.items()
        }
        manifest = Manifest(
            step=ref.step,
            save_id=ref.save_id,
            created_unix_ns=gathered[0]["created"],
            world_size=len(results),
            tensors=tensors,
            ranks=tuple(res["tree"] for res in results),
            writer={"library": "ckpt", "version": _version(), "torch": torch.__version__},
            layout=layout,
            extras=dict(extras or {}),
        )
        store.put(ref.manifest_key, manifest.to_bytes())
    except Exception as e:
        log.exception("committing step %d failed", ref.step)
        _commit.delete_save_data(store, ref)
        return {"error": f"commit failed: {type(e).__name__}: {e}"}
    if keep_last is not None:
        try:
            _commit.retain(store, keep_last)
        except Exception:  # retention trouble never fails a committed save
            log.exception("retention after step %d failed; the save itself is committed", ref.step)
    return {"error": None, "logical_bytes": manifest.nbytes, "stored_bytes": manifest.stored_bytes}


def _chunk_from_json(c: Mapping[str, Any]) -> ChunkMeta:
    blocks = c.get("blocks") or {}
    return ChunkMeta(
        offsets=tuple(c["offsets"]),
        sizes=tuple(c["sizes"]),
        object=c["object"],
        byte_offset=c["byte_offset"],
        byte_length=c["byte_length"],
        raw_length=c["raw_length"],
        codecs=tuple(c["codecs"]),
        checksum=Checksum(**c["checksum"]),
        order=None if c.get("order") is None else tuple(c["order"]),
        block_bytes=blocks.get("size", 0),
        block_checksums=blocks.get("checksums", ""),
    )


def _version() -> str:
    from ckpt import __version__

    return __version__


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))


def _is_whole(local_name: str, m: TensorMapping) -> bool:
    """The local tensor is exactly the global tensor of the same name (no renaming, no split)."""
    if len(m.pieces) != 1:
        return False
    p = m.pieces[0]
    return p.name == local_name and p.local == p.region and tuple(m.global_shapes[p.name]) == tuple(m.local_shape)


def storage_order(split_dim: Optional[int], ndim: int) -> Optional[tuple[int, ...]]:
    """Store the split dimension outermost, so re-slicing it later is one contiguous range."""
    if split_dim is None or split_dim == 0 or ndim < 2:
        return None
    return (split_dim,) + tuple(d for d in range(ndim) if d != split_dim)


def _piece_data(t: torch.Tensor, piece: Piece, region: Box, order: Optional[tuple[int, ...]]) -> torch.Tensor:
    """The elements of ``region`` (all or part of the piece's region), from the local tensor,
    in storage order, contiguous."""
    rel = region.relative_to(piece.region)
    if piece.local.sizes == piece.region.sizes:
        src = t[_slices(rel.shift(piece.local.offsets))]
    else:  # a flat (1-D) local range holding the piece's region in C order
        start = piece.local.offsets[0]
        src = t.reshape(-1)[start : start + piece.local.sizes[0]].reshape(piece.region.sizes)[_slices(rel)]
    if order is not None:
        src = src.permute(order)
    return host_contiguous(src)


def encode_chunk(view: np.ndarray, itemsize: int, codec: Optional[str], level: int, algorithm: str) -> tuple[Any, dict]:
    """Encode one chunk; returns (stored buffer, its JSON fields besides position)."""
    chain = default_chain(itemsize, compression=codec, level=level)
    encoded = chain.encode(memoryview(view))
    fields: dict[str, Any] = {"codecs": chain.to_json(), "raw_length": view.nbytes}
    if chain.codecs:
        fields["checksum"] = {"algorithm": algorithm, "value": checksum(algorithm, encoded)}
        return encoded, fields
    whole, blocks = Hasher(algorithm), []
    mv = memoryview(view)
    for start in range(0, view.nbytes, BLOCK_BYTES):
        block = mv[start : start + BLOCK_BYTES]
        whole.update(block)
        blocks.append(checksum(algorithm, block))
    fields["checksum"] = {"algorithm": algorithm, "value": whole.hexdigest()}
    if view.nbytes > BLOCK_BYTES:
        fields["blocks"] = {"size": BLOCK_BYTES, "checksums": "".join(blocks)}
    return encoded, fields


def _write_items(
    store: Store,
    ref: SaveRef,
    rank: int,
    items: Sequence[WriteItem],
    tensors: Mapping[str, torch.Tensor],
    mappings: Mapping[str, TensorMapping],
    codec: Optional[str],
    level: int,
    algorithm: str,
    threads: int,
) -> dict[str, list]:
    """Write this rank's regions; returns ``{global name: [chunk JSON, ...]}``."""
    chunk_items = []  # (global name, box, order, itemsize, byte view)
    for item in items:
        t = tensors[item.local_name]
        piece = mappings[item.local_name].pieces[item.piece]
        order = storage_order(item.split_dim, item.region.ndim)
        data = _piece_data(t, piece, item.region, order)
        itemsize = data.element_size()
        flat = byte_view(data)
        outer = order[0] if order else 0
        per_slice = (item.region.numel // item.region.sizes[outer]) * itemsize if item.region.ndim and item.region.sizes[outer] else 0
        for box in split_box(item.region, max_numel=max(1, CHUNK_BYTES // itemsize), order=order):
            if box.ndim == 0 or per_slice == 0:
                view = flat
            else:
                first = (box.offsets[outer] - item.region.offsets[outer]) * per_slice
                view = flat[first : first + box.sizes[outer] * per_slice]
            chunk_items.append((item.name, box, order, itemsize, view))
    groups = pack_objects([c[4].nbytes for c in chunk_items], max_object_bytes=MAX_OBJECT_BYTES, min_objects=threads)

    def write_group(index: int, members: list[int]) -> list[tuple[str, dict]]:
        obj = f"r{rank:05d}-{index:04d}.bin"
        buffers, records, offset = [], [], 0
        for i in members:
            name, box, order, itemsize, view = chunk_items[i]
            encoded, fields = encode_chunk(view, itemsize, codec, level, algorithm)
            length = memoryview(encoded).nbytes
            rec = {"offsets": list(box.offsets), "sizes": list(box.sizes), "object": obj,
                   "byte_offset": offset, "byte_length": length, **fields}
            if order is not None:
                rec["order"] = list(order)
            records.append((name, rec))
            buffers.append(encoded)
            offset += length
        store.put(ref.data_prefix + obj, buffers)
        return records

    if len(groups) <= 1 or threads <= 1:
        done = [write_group(i, g) for i, g in enumerate(groups)]
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"ckpt-save-r{rank}") as pool:
            done = list(pool.map(lambda ig: write_group(*ig), enumerate(groups)))
    out: dict[str, list] = {}
    for records in done:
        for name, rec in records:
            out.setdefault(name, []).append(rec)
    return out
