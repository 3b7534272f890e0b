"""Storage backends behind one ``Store`` interface, and ``open_store`` to pick one by URL.

=====================================  ==================================================
URL                                    Backend
=====================================  ==================================================
``/path``, ``rel/path``, ``file://``   ``LocalStore`` (atomic rename + fsync)
``memory://NAME[/prefix]``             ``MemoryStore`` (process-global, for tests)
anything else (``s3://``, ``gs://``)   ``FsspecStore`` (needs the fsspec implementation)
=====================================  ==================================================
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from ckpt.store._base import Store, StoreCapabilities, join_key, validate_key
from ckpt.store.fsspec_store import FsspecStore
from ckpt.store.local import LocalStore
from ckpt.store.memory import MemoryStore

__all__ = [
    "Store",
    "StoreCapabilities",
    "MemoryStore",
    "LocalStore",
    "FsspecStore",
    "open_store",
    "validate_key",
    "join_key",
]


def open_store(
    url_or_store: Union[str, "os.PathLike[str]", Store],
    *,
    storage_options: Optional[dict[str, Any]] = None,
) -> Store:
    """Return the store for a URL or path; a ``Store`` instance is returned unchanged.

    Args:
        url_or_store: a ``Store``, a local path (``str`` or ``os.PathLike``), a ``file://``
            URL, ``memory://NAME[/prefix]``, or any fsspec URL such as ``s3://bucket/prefix``.
        storage_options: options for the fsspec file system (credentials, endpoint). Only
            fsspec URLs take them.

    Returns:
        The store. Nothing is opened or created yet: backends do I/O on first use.

    Raises:
        StoreError: the URL's protocol has no fsspec implementation installed; the message
            names the package to install (``pip install s3fs`` for ``s3://``).
        ValueError: ``storage_options`` were given for a store that takes none.
        TypeError: ``url_or_store`` is neither a ``Store``, a string nor a path.
    """
    if isinstance(url_or_store, Store):
        return url_or_store
    if not isinstance(url_or_store, (str, os.PathLike)):
        raise TypeError(
            f"open_store() takes a Store, a path or a URL string, not "
            f"{type(url_or_store).__name__}"
        )
    url = os.fspath(url_or_store)
    if not isinstance(url, str):
        raise TypeError(f"open_store() takes a text path, not {url!r}")
    protocol = url.split("://", 1)[0].lower() if "://" in url else ""
    if protocol in ("", "file", "memory") and storage_options:
        raise ValueError(
            f"storage_options only apply to fsspec URLs (s3://, gs://...), not {url!r}; "
            "drop them"
        )
    if protocol in ("", "file"):
        return LocalStore(url)
    if protocol == "memory":
        return MemoryStore(url)
    return FsspecStore(url, storage_options=storage_options)
