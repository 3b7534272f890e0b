"""Finding committed saves by their manifest keys, reading manifests, and retention.

The commit protocol (``docs/format.md``, "Commit"): data objects first, under a prefix unique to
the save; the manifest last, in one atomic ``put``. A step exists only through its manifest.
Retention deletes manifests first and data only when no remaining manifest references it, so a
crash at any point leaves every kept step loadable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional

from ckpt.errors import CheckpointNotFoundError, ManifestTooLargeError, ObjectNotFoundError
from ckpt.metadata import MAX_MANIFEST_BYTES, Manifest, SaveRef, parse_manifest, parse_manifest_key
from ckpt.store import Store

__all__ = ["list_saves", "latest_saves", "resolve_save", "read_manifest", "retain", "RetentionReport"]

log = logging.getLogger(__name__)

_DATA_DIR = "data/"


def list_saves(store: Store) -> list[SaveRef]:
    """Every committed save (manifest) under the store, sorted by (step, save_id)."""
    refs = (parse_manifest_key(k) for k in store.list("manifests/"))
    return sorted(r for r in refs if r is not None)


def latest_saves(refs: Iterable[SaveRef]) -> dict[int, SaveRef]:
    """The newest save of each step: a re-save of a step supersedes the earlier one."""
    out: dict[int, SaveRef] = {}
    for ref in refs:
        if ref.step not in out or ref.save_id > out[ref.step].save_id:
            out[ref.step] = ref
    return out


def resolve_save(store: Store, step: Optional[int] = None) -> SaveRef:
    """The save to load: the newest of ``step``, or of the latest committed step."""
    latest = latest_saves(list_saves(store))
    if not latest:
        raise CheckpointNotFoundError(
            f"{store.url}: no committed checkpoint (no manifests under 'manifests/'); a save "
            "that crashed before its manifest was written does not count"
        )
    if step is None:
        return latest[max(latest)]
    if step not in latest:
        shown = sorted(latest)[-10:]
        raise CheckpointNotFoundError(
            f"{store.url}: step {step} is not committed; committed steps include {shown}"
        )
    return latest[step]


def read_manifest(store: Store, ref: SaveRef, *, max_bytes: int = MAX_MANIFEST_BYTES) -> Manifest:
    """Read and validate one manifest; the size cap is checked before the bytes are fetched."""
    key = ref.manifest_key
    source = f"{store.url}/{key}"
    size = store.size(key)
    if size > max_bytes:
        raise ManifestTooLargeError(f"{source}: manifest is {size} bytes, over the cap of {max_bytes}; refusing to read it")
    manifest = parse_manifest(store.get(key), source=source, max_bytes=max_bytes)
    if manifest.ref != ref:
        from ckpt.errors import ManifestError

        raise ManifestError(
            f"{source}: the manifest says step {manifest.step} save {manifest.save_id}, but its key "
            f"says step {ref.step} save {ref.save_id}; it was copied or tampered with"
        )
    return manifest


@dataclass
class RetentionReport:
    """What ``retain`` kept and removed."""

    kept_steps: list[int] = field(default_factory=list)
    deleted_manifests: list[str] = field(default_factory=list)
    deleted_objects: int = 0


def _data_ref(key: str) -> Optional[SaveRef]:
    if not key.startswith(_DATA_DIR):
        return None
    head = key[len(_DATA_DIR) :].split("/", 1)[0]
    return parse_manifest_key(f"manifests/{head}.json")


def retain(store: Store, keep_last: int) -> RetentionReport:
    """Keep the newest save of the last ``keep_last`` committed steps; delete the rest.

    Order: superseded and expired manifests first (that un-commits them), then data objects
    that no kept manifest references and that belong to a step no newer than the newest kept
    one (newer unreferenced data may be a save still in flight).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    report = RetentionReport()
    refs = list_saves(store)
    latest = latest_saves(refs)
    if not latest:
        return report
    kept_steps = sorted(latest)[-keep_last:]
    kept = {latest[s] for s in kept_steps}
    report.kept_steps = kept_steps
    for ref in refs:
        if ref not in kept:
            store.delete(ref.manifest_key)
            report.deleted_manifests.append(ref.manifest_key)
    newest = max(kept_steps)
    doomed = []
    for key in store.list(_DATA_DIR):
        ref = _data_ref(key)
        if ref is not None and ref not in kept and ref.step <= newest:
            doomed.append(key)
    store.delete_many(doomed)
    report.deleted_objects = len(doomed)
    if report.deleted_manifests or doomed:
        log.info("retention at %s kept steps %s, deleted %d manifest(s) and %d object(s)",
                 store.url, kept_steps, len(report.deleted_manifests), len(doomed))
    return report


def delete_save_data(store: Store, ref: SaveRef) -> int:
    """Remove the data objects of an uncommitted save (best effort); returns how many."""
    try:
        keys = store.list(ref.data_prefix)
        store.delete_many(keys)
        return len(keys)
    except (OSError, ObjectNotFoundError) as e:  # cleanup must never mask the real error
        log.warning("could not clean up data of failed save %s at %s: %s", ref, store.url, e)
        return 0
