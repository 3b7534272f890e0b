"""Finding committed saves by their manifest keys, reading manifests, and retention.

The commit protocol (``docs/format.md``, "Commit"): data objects first, under a prefix unique to
the save; the manifest last, in one atomic ``put``. A step exists only through its manifest.
Retention deletes manifests first and data only when no remaining manifest references it, so a
crash at any point leaves every kept step loadable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
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


#: Uncommitted data younger than this may belong to a save still in flight: retention keeps it.
DEFAULT_GRACE = timedelta(minutes=10)


def save_created_s(ref: SaveRef) -> float:
    """When the save started, in Unix seconds, from the clock part of its save id."""
    return int(ref.save_id[:16], 16) / 1e9


def retain(store: Store, keep_last: int, *, now_s: Optional[float] = None, grace: timedelta = DEFAULT_GRACE) -> RetentionReport:
    """Keep the newest save of the last ``keep_last`` committed steps; delete the rest.

    Order: superseded and expired manifests first (that un-commits them), then their data.
    Data that no manifest ever referenced (a crashed save) is deleted only when its step is no
    newer than the newest kept step and its save started more than ``grace`` before ``now_s``:
    younger uncommitted data may be a save still in flight (e.g. a re-save of an older step).
    Leftovers of puts killed mid-write that are older than ``grace`` are swept too.

    Args:
        store: the checkpoint root.
        keep_last: how many committed steps to keep (>= 1).
        now_s: the current time in Unix seconds (default: the system clock).
        grace: the age below which uncommitted data is never deleted.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    now = time.time() if now_s is None else now_s
    report = RetentionReport()
    refs = list_saves(store)
    latest = latest_saves(refs)
    if not latest:
        return report
    kept_steps = sorted(latest)[-keep_last:]
    kept = {latest[s] for s in kept_steps}
    report.kept_steps = kept_steps
    dropped = [ref for ref in refs if ref not in kept]
    for ref in dropped:
        store.delete(ref.manifest_key)
        report.deleted_manifests.append(ref.manifest_key)
    newest = max(kept_steps)
    was_committed = set(dropped)
    doomed = set(was_committed)
    for ref in {r for r in map(_data_ref, store.list(_DATA_DIR)) if r is not None}:
        if ref in kept or ref in doomed:
            continue
        if ref.step <= newest and save_created_s(ref) < now - grace.total_seconds():
            doomed.add(ref)
    for ref in sorted(doomed):
        report.deleted_objects += store.delete_prefix(ref.data_prefix)
    swept = store.sweep_interrupted("manifests/", older_than_s=grace.total_seconds(), now_s=now)
    if report.deleted_manifests or doomed or swept:
        log.info("retention at %s kept steps %s, deleted %d manifest(s), %d object(s) of %d save(s), "
                 "swept %d interrupted write(s)", store.url, kept_steps, len(report.deleted_manifests),
                 report.deleted_objects, len(doomed), swept)
    return report


def delete_save_data(store: Store, ref: SaveRef) -> int:
    """Remove the data objects of an uncommitted save (best effort); returns how many."""
    try:
        return store.delete_prefix(ref.data_prefix)
    except (OSError, ObjectNotFoundError) as e:  # cleanup must never mask the real error
        log.warning("could not clean up data of failed save %s at %s: %s", ref, store.url, e)
        return 0
