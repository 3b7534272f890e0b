"""``ckpt.load`` and ``ckpt.verify``: read only what the state needs, verify every byte.

Load order: resolve the step (rank 0 decides and tells the others, so every rank loads the
same save even while a newer one commits), read and validate the manifest, match the target
state against it (every mismatch listed in one error), read the chunks in parallel straight
into the target tensors where possible, verify each chunk's checksum, and only when every rank
succeeded call the ``load_state_dict`` of stateful objects and report success.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union, cast

import numpy as np
import torch

from ckpt import _commit
from ckpt._comm import Comm, default_comm
from ckpt._state import RestorePlan, plan_restore
from ckpt._tensors import byte_view
from ckpt._verify import read_chunk
from ckpt.errors import CheckpointError, ChunkFailure, CorruptChunkError, StateMismatchError
from ckpt.metadata import ChunkMeta, Manifest, SaveRef, TensorMeta
from ckpt.store import Store, open_store

__all__ = ["load", "LoadResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadResult:
    """What ``load`` restored.

    Attributes:
        step: the step loaded.
        save_id: the save it came from.
        state: the restored state tree (the caller's own containers and tensors, filled in
            place; new tensors where the caller had none).
        tensors: number of tensors filled.
        bytes_read: bytes fetched from the store by this rank.
        seconds: wall time on this rank.
        manifest: the validated manifest.
    """

    step: int
    save_id: str
    state: Any
    tensors: int
    bytes_read: int
    seconds: float
    manifest: Manifest


def _agree(comm: Comm, error: Optional[BaseException], what: str) -> None:
    """Make every rank fail if any rank failed; the failing rank re-raises its own error."""
    if comm.world_size == 1:
        if error is not None:
            raise error
        return
    msgs = comm.all_gather_json(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    bad = {r: m for r, m in enumerate(msgs) if m}
    if bad:
        detail = "; ".join(f"rank {r}: {m.splitlines()[0]}" for r, m in bad.items())
        raise CheckpointError(f"{what} failed on rank(s) {sorted(bad)}, so it failed here too: {detail}")


def load(
    state: Any,
    url: Union[str, Store],
    *,
    step: Optional[int] = None,
    strict: bool = True,
    verify: bool = True,
    storage_options: Optional[Mapping[str, Any]] = None,
    io_threads: Optional[int] = None,
    comm: Optional[Comm] = None,
) -> LoadResult:
    """Load a committed step into ``state``, filling its tensors in place.

    Args:
        state: the same structure that was saved (modules, optimizers, dicts of tensors...).
            Tensors with the saved shape and dtype are filled in place; entries that are
            ``None`` or absent get new CPU tensors; ``load_state_dict`` is called on stateful
            objects after all bytes are in and verified.
        url: checkpoint root (see ``save``) or a ``Store``.
        step: the step to load; default the latest committed one.
        strict: fail when the state holds tensors the checkpoint lacks, or the types differ.
        verify: check every chunk's checksum (on by default; off only for benchmarks).
        storage_options: fsspec options.
        io_threads: parallel reads (default: min(4, CPUs)).
        comm: collectives to use (default: ``torch.distributed`` if initialised, else local).

    Raises:
        CheckpointNotFoundError: nothing (or not ``step``) is committed.
        StateMismatchError: shapes, dtypes or entries differ; all are listed.
        CorruptChunkError: a chunk failed its checksum or is truncated; each is named. The
            state's tensors may be partly overwritten, and no ``load_state_dict`` was called.
        ManifestError: the manifest is malformed or hostile.
    """
    started = time.perf_counter()
    comm = comm or default_comm()
    store = open_store(url, storage_options=storage_options)

    chosen: dict[str, Any] = {}
    if comm.rank == 0:
        try:
            ref = _commit.resolve_save(store, step)
            chosen = {"step": ref.step, "save_id": ref.save_id}
        except CheckpointError as e:
            chosen = {"error": str(e)}
    chosen = comm.broadcast_json(chosen, src=0)
    if "error" in chosen:
        from ckpt.errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(chosen["error"])
    ref = SaveRef(chosen["step"], chosen["save_id"])

    error: Optional[BaseException] = None
    manifest = plan = None
    bytes_read = 0
    try:
        manifest = _commit.read_manifest(store, ref)
        tree = manifest.ranks[comm.rank if comm.rank < manifest.world_size else 0]
        plan = plan_restore(state, tree, manifest.tensors, strict=strict)
        if plan.problems:
            raise StateMismatchError(plan.problems, where=f"{store.url} step {ref.step}")
        bytes_read = _read_all(store, manifest, plan.fills, verify=verify, threads=io_threads or min(4, os.cpu_count() or 1))
    except Exception as e:
        error = e
    _agree(comm, error, f"loading step {ref.step} from {store.url}")
    manifest, plan = cast(Manifest, manifest), cast(RestorePlan, plan)  # set: no error was raised
    for finalize in plan.finalizers:
        finalize()
    return LoadResult(
        step=ref.step,
        save_id=ref.save_id,
        state=plan.state,
        tensors=len(plan.fills),
        bytes_read=bytes_read,
        seconds=time.perf_counter() - started,
        manifest=manifest,
    )


def _target_view(target: torch.Tensor) -> tuple[np.ndarray, Optional[torch.Tensor]]:
    """A writable flat byte view to read into, and the tensor to copy back from (if staged)."""
    if target.device.type == "cpu" and target.is_contiguous() and not target.is_conj() and not target.is_neg():
        return byte_view(target), None
    staging = torch.empty(target.shape, dtype=target.dtype)
    return byte_view(staging), staging


def _read_all(store: Store, manifest: Manifest, fills: list[tuple[str, torch.Tensor]], *, verify: bool, threads: int) -> int:
    tasks = []  # (tensor name, meta, chunk, destination byte view)
    staged = []  # (target, staging tensor)
    for name, target in fills:
        meta = manifest.tensors[name]
        view, staging = _target_view(target)
        if staging is not None:
            staged.append((target, staging))
        row_bytes = meta.nbytes // meta.shape[0] if meta.shape and meta.shape[0] else 0
        for chunk in meta.chunks:
            start = chunk.offsets[0] * row_bytes if meta.shape else 0
            # Chunks written by ``save`` are whole rows; other tilings come with layouts.
            if meta.shape and any(o != 0 for o in chunk.offsets[1:]) or (meta.shape and tuple(chunk.sizes[1:]) != tuple(meta.shape[1:])):
                raise CheckpointError(f"tensor {name!r}: chunk at {list(chunk.offsets)} is not a run of whole rows; this reader needs the layouts support to load it")
            tasks.append((name, meta, chunk, view[start : start + chunk.raw_length]))
    prefix = manifest.data_prefix

    def run(task: tuple[str, TensorMeta, ChunkMeta, np.ndarray]) -> tuple[int, Optional[ChunkFailure]]:
        name, _meta, chunk, dst = task
        return read_chunk(store, prefix, name, chunk, dst, verify)

    if threads <= 1 or len(tasks) <= 1:
        results = [run(t) for t in tasks]
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckpt-load") as pool:
            results = list(pool.map(run, tasks))
    failures = [f for _, f in results if f is not None]
    if failures:
        raise CorruptChunkError(failures, where=f"{store.url} step {manifest.step} (save {manifest.save_id})")
    for target, staging in staged:
        with torch.no_grad():
            target.copy_(staging)
    return sum(n for n, _ in results)
