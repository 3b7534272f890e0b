"""ckpt: checksummed, pickle-free, crash-safe checkpoints for PyTorch training.

Public API::

    ckpt.save(state, url, step=N)          # every rank writes its part; one rank commits
    ckpt.load(state, url)                  # latest committed step, filled in place
    ckpt.list_steps(url)                   # committed steps
    ckpt.retain(url, keep_last=N)          # delete old steps safely
    ckpt.verify(url)                       # check every checksum

``url`` is a local path, ``file://``, ``s3://bucket/prefix`` (or any fsspec URL), ``memory://``,
or a ``ckpt.store.Store``. See ``docs/format.md`` for the on-disk format.

Importing ``ckpt`` (or ``ckpt.metadata``, ``ckpt.errors``, ``ckpt.store``) does not import
torch: the functions that need it load on first use, so the coordinator and tools stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptChunkError,
    ManifestError,
    SaveFailedError,
    StateMismatchError,
    UnsupportedStateError,
)
from ckpt.metadata import Manifest
from ckpt.store import Store, open_store

_LAZY = {
    "save": "ckpt._save",
    "SaveResult": "ckpt._save",
    "load": "ckpt._load",
    "LoadResult": "ckpt._load",
    "list_steps": "ckpt._api",
    "open_manifest": "ckpt._api",
    "VerifyReport": "ckpt._verify",
    "retain": "ckpt._api",
    "verify": "ckpt._api",
    "RetentionReport": "ckpt._commit",
    "CheckpointHook": "ckpt.hook",
    "convert": "ckpt.convert",
    "diff": "ckpt.convert",
}

if TYPE_CHECKING:  # pragma: no cover
    from ckpt._api import list_steps, open_manifest, retain, verify
    from ckpt._commit import RetentionReport
    from ckpt._load import LoadResult, load
    from ckpt._verify import VerifyReport
    from ckpt.convert import convert, diff
    from ckpt.hook import CheckpointHook
    from ckpt._save import SaveResult, save

__all__ = [
    "__version__",
    "save",
    "load",
    "list_steps",
    "retain",
    "verify",
    "open_manifest",
    "convert",
    "diff",
    "CheckpointHook",
    "SaveResult",
    "LoadResult",
    "VerifyReport",
    "RetentionReport",
    "Manifest",
    "Store",
    "open_store",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptChunkError",
    "ManifestError",
    "SaveFailedError",
    "StateMismatchError",
    "UnsupportedStateError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
