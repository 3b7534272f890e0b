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

import torch

from ckpt import _commit
from ckpt._comm import Comm, default_comm
from ckpt._save_plan import LocalTensor, assign_owners, pack_objects, split_rows
from ckpt._state import FlatState, flatten
from ckpt._tensors import byte_view, dtype_name, host_contiguous
from ckpt.codecs import DEFAULT_CHECKSUM, checksum, default_chain
from ckpt.errors import SaveFailedError
from ckpt.metadata import (
    DTYPE_ITEMSIZE,
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


def _resolve_compression(store: Store, compression: Union[str, None, bool]) -> Optional[str]:
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
    codec = _resolve_compression(store, compression)
    threads = io_threads or min(4, os.cpu_count() or 1)

    flat, local, local_error = None, {}, None
    try:
        flat = flatten(state, rank_local=tuple(rank_local), rank=rank)
        local = {n: [dtype_name(t.dtype), list(t.shape)] for n, t in flat.tensors.items()}
    except Exception as e:  # every rank must reach the gather, or the others hang
        local_error = e
    created = time.time_ns()
    proposal = new_save_id(created, secrets.randbits(32)) if rank == 0 else None
    gathered = comm.all_gather_json({
        "tensors": local, "save_id": proposal, "created": created,
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
    plans = [{n: LocalTensor(d, tuple(s)) for n, (d, s) in g["tensors"].items()} for g in gathered]
    owners, problems = assign_owners(plans)
    if problems:
        raise SaveFailedError({r: "; ".join(problems) for r in range(comm.world_size)}, step=step)

    mine = sorted(n for n, r in owners.items() if r == rank)
    written: dict[str, Any] = {}
    error = None
    try:
        written = _write_owned(store, ref, rank, mine, flat.tensors, codec, compression_level, checksum_algorithm, threads)
    except Exception as e:  # latched: decided at the commit point, on every rank
        log.exception("rank %d: writing step %d failed", rank, step)
        error = f"{type(e).__name__}: {e}"
    results = comm.all_gather_json({"error": error, "tensors": written, "tree": flat.tree})
    failures = {r: res["error"] for r, res in enumerate(results) if res["error"]}

    outcome: dict[str, Any] = {"error": None}
    if rank == 0:
        outcome = _commit_or_clean(store, ref, gathered, results, failures, extras, keep_last)
    outcome = comm.broadcast_json(outcome, src=0)
    if failures:
        raise SaveFailedError(failures, step=step)
    if outcome["error"]:
        raise SaveFailedError({0: outcome["error"]}, step=step)
    rank_bytes = sum(c["byte_length"] for cs in written.values() for c in cs["chunks"])
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
    extras: Optional[Mapping[str, Any]],
    keep_last: Optional[int],
) -> dict:
    """Rank 0: write the manifest if every rank succeeded, else remove the partial data."""
    if failures:
        _commit.delete_save_data(store, ref)
        return {"error": None}
    try:
        tensors = {}
        for res in results:
            for name, t in res["tensors"].items():
                tensors[name] = TensorMeta(
                    dtype=t["dtype"],
                    shape=tuple(t["shape"]),
                    chunks=tuple(_chunk_from_json(c) for c in t["chunks"]),
                )
        manifest = Manifest(
            step=ref.step,
            save_id=ref.save_id,
            created_unix_ns=gathered[0]["created"],
            world_size=len(results),
            tensors=tensors,
            ranks=tuple(res["tree"] for res in results),
            writer={"library": "ckpt", "version": _version(), "torch": torch.__version__},
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
    return ChunkMeta(
        offsets=tuple(c["offsets"]),
        sizes=tuple(c["sizes"]),
        object=c["object"],
        byte_offset=c["byte_offset"],
        byte_length=c["byte_length"],
        raw_length=c["raw_length"],
        codecs=tuple(c["codecs"]),
        checksum=Checksum(**c["checksum"]),
    )


def _version() -> str:
    from ckpt import __version__

    return __version__


def _write_owned(
    store: Store,
    ref: SaveRef,
    rank: int,
    names: list[str],
    tensors: Mapping[str, torch.Tensor],
    codec: Optional[str],
    level: int,
    algorithm: str,
    threads: int,
) -> dict[str, Any]:
    """Write this rank's tensors; returns ``{name: tensor meta JSON}``."""
    items = []  # (name, offsets, sizes, bytes view)
    metas: dict[str, dict[str, Any]] = {}
    for name in names:
        t = host_contiguous(tensors[name])
        dtype = dtype_name(t.dtype)
        itemsize = DTYPE_ITEMSIZE[dtype]
        metas[name] = {"dtype": dtype, "shape": list(t.shape), "chunks": []}
        flat = byte_view(t)
        row_bytes = (t.numel() // t.shape[0]) * itemsize if t.dim() and t.shape[0] else 0
        for offsets, sizes in split_rows(tuple(t.shape), itemsize, CHUNK_BYTES):
            if t.dim() == 0:
                view = flat
            else:
                start = offsets[0] * row_bytes
                view = flat[start : start + sizes[0] * row_bytes]
            items.append((name, offsets, sizes, itemsize, view))
    groups = pack_objects([it[4].nbytes for it in items], max_object_bytes=MAX_OBJECT_BYTES, min_objects=threads)

    def write_group(index: int, members: list[int]) -> list[tuple[str, dict]]:
        obj = f"r{rank:05d}-{index:04d}.bin"
        buffers, records, offset = [], [], 0
        for i in members:
            name, offsets, sizes, itemsize, view = items[i]
            chain = default_chain(itemsize, compression=codec, level=level)
            encoded = chain.encode(memoryview(view))
            length = memoryview(encoded).nbytes
            records.append((name, {
                "offsets": list(offsets), "sizes": list(sizes), "object": obj,
                "byte_offset": offset, "byte_length": length, "raw_length": view.nbytes,
                "codecs": chain.to_json(),
                "checksum": {"algorithm": algorithm, "value": checksum(algorithm, encoded)},
            }))
            buffers.append(encoded)
            offset += length
        store.put(ref.data_prefix + obj, buffers)
        return records

    if len(groups) <= 1 or threads <= 1:
        done = [write_group(i, g) for i, g in enumerate(groups)]
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"ckpt-save-r{rank}") as pool:
            done = list(pool.map(lambda ig: write_group(*ig), enumerate(groups)))
    for records in done:
        for name, rec in records:
            metas[name]["chunks"].append(rec)
    return metas

