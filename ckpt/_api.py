"""Public functions over stores and manifests that need no torch: listing, retention, verify."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Mapping, Optional, Union

from ckpt import _commit
from ckpt._verify import VerifyReport, verify as _verify
from ckpt.metadata import Manifest
from ckpt.store import Store, open_store

__all__ = ["list_steps", "open_manifest", "retain", "verify"]


def list_steps(url: Union[str, Store], *, storage_options: Optional[Mapping[str, Any]] = None) -> list[int]:
    """Committed steps under ``url``, ascending (found by manifest key, never by listing data)."""
    store = open_store(url, storage_options=storage_options)
    return sorted(_commit.latest_saves(_commit.list_saves(store)))


def open_manifest(
    url: Union[str, Store], *, step: Optional[int] = None, storage_options: Optional[Mapping[str, Any]] = None
) -> tuple[Store, Manifest]:
    """The store and the validated manifest of ``step`` (latest committed by default)."""
    store = open_store(url, storage_options=storage_options)
    return store, _commit.read_manifest(store, _commit.resolve_save(store, step))


def retain(
    url: Union[str, Store],
    *,
    keep_last: int,
    grace: timedelta = _commit.DEFAULT_GRACE,
    storage_options: Optional[Mapping[str, Any]] = None,
) -> _commit.RetentionReport:
    """Keep the newest ``keep_last`` committed steps under ``url``; delete older ones safely.

    Data of saves that never committed is removed once it is older than ``grace`` (younger
    data may belong to a save in flight). See ``docs/format.md``, "Commit protocol".
    """
    return _commit.retain(open_store(url, storage_options=storage_options), keep_last, grace=grace)


def verify(
    url: Union[str, Store],
    *,
    step: Optional[int] = None,
    storage_options: Optional[Mapping[str, Any]] = None,
    threads: int = 4,
) -> VerifyReport:
    """Read every chunk of ``step`` (latest by default), check its checksum and that it decodes."""
    store, manifest = open_manifest(url, step=step, storage_options=storage_options)
    return _verify(store, manifest, threads=threads)
