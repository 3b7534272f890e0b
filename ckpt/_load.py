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
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union, cast


from ckpt import _commit
from ckpt._comm import Comm, default_comm
from ckpt._read import Target, read_into
from ckpt._sharding import check_layout, local_mappings, resolve_rules
from ckpt.resume import source_rank
from ckpt._state import RestorePlan, flatten, init_optimizer_state, optimizers_in, plan_restore, restore_plain
from ckpt.layout import Layout
from ckpt.mapping import TensorMapping
from ckpt._tensors import dtype_name
from ckpt.errors import CheckpointError, StateMismatchError
from ckpt.metadata import Manifest, SaveRef
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
    layout: Optional[Layout] = None,
    rules: Any = None,
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
        layout: this rank's place in the layout the job runs with now (may differ from the
            writers': other TP/PP/DP sizes). With ``rules``, each rank reads only the regions
            its tensors hold.
        rules: sharding rules of the target layout (``ckpt.rules.Rules`` or a shipped name).
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
    created: list[Any] = []
    manifest = plan = None
    bytes_read = 0
    try:
        manifest = _commit.read_manifest(store, ref)
        target_layout = check_layout(layout, None, comm.rank, comm.world_size)
        saved_axes = (manifest.layout or {}).get("axes") if isinstance(manifest.layout, dict) else None
        tree = manifest.ranks[source_rank(saved_axes, manifest.world_size, target_layout)]
        threads = io_threads or min(4, os.cpu_count() or 1)
        if layout is None and rules is None:
            plan = plan_restore(state, tree, manifest.tensors, strict=strict)
            if plan.problems:
                raise StateMismatchError(plan.problems, where=f"{store.url} step {ref.step}")
            targets = {name: (t, TensorMapping.identity(name, tuple(t.shape))) for name, t in plan.fills}
        else:
            # the target's own tensors are filled: a fresh optimizer needs its state first
            created = [o for o in optimizers_in(state) if init_optimizer_state(o)]
            plan, targets = _plan_layout_restore(state, tree, manifest, layout, rules, comm, strict, f"{store.url} step {ref.step}")
        bytes_read, _ = read_into(store, manifest, targets, verify=verify, threads=threads)
    except Exception as e:
        error = e
    try:
        _agree(comm, error, f"loading step {ref.step} from {store.url}")
    except BaseException:
        for opt in created:  # nothing is loaded: the optimizers as they were
            opt.state.clear()
        raise
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


def _plan_layout_restore(
    state: Any, tree: Any, manifest: Manifest, layout: Optional[Layout], rules: Any, comm: Comm, strict: bool, where: str
) -> tuple[RestorePlan, dict[str, Target]]:
    """Target-driven restore: the target's own tensors, mapped by the target's rules."""
    flat = flatten(state)
    mappings = local_mappings(flat.tensors, layout, resolve_rules(rules), comm.rank, comm.world_size)
    problems = []
    for local, m in mappings.items():
        t = flat.tensors[local]
        for p in m.pieces:
            meta = manifest.tensors.get(p.name)
            if meta is None:
                if strict:
                    problems.append(f"{local}: needs tensor {p.name!r} (rule {m.rule!r}), which the checkpoint does not have")
            elif dtype_name(t.dtype) != meta.dtype:
                problems.append(f"{local}: dtype {dtype_name(t.dtype)} in the state, {meta.dtype} in the checkpoint ({p.name!r})")
            elif tuple(meta.shape) != tuple(m.global_shapes[p.name]):
                problems.append(f"{local}: global shape of {p.name!r} is {list(m.global_shapes[p.name])} under the target rules, {list(meta.shape)} in the checkpoint")
    if problems:
        raise StateMismatchError(sorted(set(problems)), where=where)
    targets = {n: (flat.tensors[n], m) for n, m in mappings.items() if all(p.name in manifest.tensors for p in m.pieces)}
    plan = RestorePlan()
    plan.state = restore_plain(state, tree, plan, flat.state_dicts)
    return plan, targets
