"""An in-process store for tests and for single-process experiments.

``MemoryStore("memory://NAME[/prefix]")`` keeps objects in a process-global registry keyed by
``NAME``, so two instances opened on the same URL see the same objects (the way two
``LocalStore`` instances on one directory do). Nothing survives the process.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence, Union

from ckpt.errors import InvalidKeyError, ObjectNotFoundError
from ckpt.store._base import (
    PieceCallback,
    Buffer,
    Store,
    StoreCapabilities,
    _check_range,
    _validate_prefix,
    as_buffers,
    validate_key,
)

__all__ = ["MemoryStore"]

_SCHEME = "memory://"

# NAME -> {full key (prefix included) -> object bytes}. One lock guards every namespace: the
# operations are dictionary lookups and memory copies, so contention is not a concern.
_REGISTRY: dict[str, dict[str, bytes]] = {}
_LOCK = threading.Lock()


def _parse_url(url: str) -> tuple[str, str]:
    """Split ``memory://NAME[/prefix]`` into ``(NAME, "prefix/")`` (``""`` when no prefix)."""
    if not isinstance(url, str) or not url.startswith(_SCHEME):
        raise InvalidKeyError(
            f"memory store URL {url!r} must look like 'memory://NAME[/prefix]'"
        )
    name, _, prefix = url[len(_SCHEME) :].strip("/").partition("/")
    if not name:
        raise InvalidKeyError(
            f"memory store URL {url!r} has no NAME: use 'memory://NAME[/prefix]'"
        )
    validate_key(name, what=f"name in memory store URL {url!r}")
    if prefix:
        validate_key(prefix, what=f"prefix in memory store URL {url!r}")
        prefix += "/"
    return name, prefix


class MemoryStore(Store):
    """A thread-safe store held in this process's memory.

    Args:
        url: ``memory://NAME`` or ``memory://NAME/some/prefix``. Instances with the same
            ``NAME`` share objects; a prefix scopes an instance to the keys below it.

    Raises:
        InvalidKeyError: the URL is not a ``memory://`` URL or its name/prefix is unsafe.
    """

    capabilities = StoreCapabilities(readinto=True, durable=False)

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._name, self._prefix = _parse_url(url)

    def _full(self, key: str) -> str:
        return self._prefix + validate_key(key)

    def _lookup(self, key: str) -> bytes:
        """Return the stored bytes of ``key``; the caller must hold ``_LOCK``."""
        data = _REGISTRY.get(self._name, {}).get(self._prefix + key)
        if data is None:
            raise ObjectNotFoundError(f"{self.url}: object {key!r} does not exist")
        return data

    # -- reads -------------------------------------------------------------------------------
    def get(self, key: str) -> bytes:
        """Return the whole object. Raises ``ObjectNotFoundError`` if it does not exist."""
        validate_key(key)
        with _LOCK:
            return self._lookup(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return ``length`` bytes from ``start``; raise ``StoreError`` if the object is short."""
        validate_key(key)
        _check_range(self.url, key, start, length)
        with _LOCK:
            data = self._lookup(key)
        if start + length > len(data):
            raise self._short_read(key, start, length, max(0, len(data) - start))
        return data[start : start + length]

    def get_range_into(self, key: str, start: int, out: memoryview, *, on_piece: Optional[PieceCallback] = None) -> None:
        """Copy ``len(out)`` bytes from ``start`` straight into ``out``."""
        validate_key(key)
        view = memoryview(out).cast("B")
        _check_range(self.url, key, start, view.nbytes)
        with _LOCK:
            data = self._lookup(key)
        end = start + view.nbytes
        if end > len(data):
            raise self._short_read(key, start, view.nbytes, max(0, len(data) - start))
        view[:] = memoryview(data)[start:end]
        if on_piece is not None:
            on_piece(view)

    def exists(self, key: str) -> bool:
        """Whether object ``key`` exists."""
        full = self._full(key)
        with _LOCK:
            return full in _REGISTRY.get(self._name, {})

    def size(self, key: str) -> int:
        """The object's size in bytes. Raises ``ObjectNotFoundError`` if it does not exist."""
        validate_key(key)
        with _LOCK:
            return len(self._lookup(key))

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (a plain string prefix, not a glob)."""
        full = self._prefix + _validate_prefix(prefix)
        cut = len(self._prefix)
        with _LOCK:
            keys = [k[cut:] for k in _REGISTRY.get(self._name, {}) if k.startswith(full)]
        return sorted(keys)

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: str, data: Union[Buffer, Sequence[Buffer]]) -> None:
        """Store a copy of ``data`` under ``key``, replacing any previous object whole."""
        full = self._full(key)
        blob = b"".join(as_buffers(data))
        with _LOCK:
            _REGISTRY.setdefault(self._name, {})[full] = blob

    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error. An emptied namespace is dropped."""
        full = self._full(key)
        with _LOCK:
            space = _REGISTRY.get(self._name)
            if space is None:
                return
            space.pop(full, None)
            if not space:
                del _REGISTRY[self._name]
