"""The one storage interface every backend implements.

Call order and guarantees (the contract suite in ``tests/contract`` checks each one):

* Keys are relative ``/``-separated paths below the store's root. ``validate_key`` rejects
  anything else (absolute paths, ``..``, empty segments, backslashes, control characters)
  before a backend sees it.
* ``put`` is atomic: a reader sees either the whole object or no object, never a prefix.
  ``put`` over an existing key replaces it whole (the commit protocol never relies on that for
  data; it writes new keys instead).
* ``get_range(key, start, length)`` returns exactly ``length`` bytes or raises
  ``ObjectNotFoundError`` (missing key) / ``StoreError`` (short object): it never returns fewer
  bytes silently.
* ``list(prefix)`` returns every committed key that starts with ``prefix``, sorted, and never a
  temporary object of an unfinished ``put``.
* ``delete`` of a missing key is not an error (deletes are idempotent).

Backends are constructed without I/O; the first call opens what it needs.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

from ckpt.errors import InvalidKeyError, StoreError

__all__ = ["Buffer", "PieceCallback", "Store", "StoreCapabilities", "as_buffers", "validate_key", "join_key"]

#: Anything with the buffer protocol: bytes, bytearray, memoryview, numpy arrays.
Buffer = Union[bytes, bytearray, memoryview]

#: Receives each piece of a ``get_range_into`` read as soon as it is in (see there).
PieceCallback = Callable[[memoryview], None]

_SEGMENT = re.compile(r"^[A-Za-z0-9._=+-]+$")
_MAX_KEY = 1024


def validate_key(key: str, *, what: str = "key") -> str:
    """Return ``key`` if it is a safe relative store key, else raise ``InvalidKeyError``.

    A safe key is 1..1024 characters of ``/``-separated segments, each made of letters, digits
    and ``. _ = + -``, none of them ``.`` or ``..``.
    """
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY:
        raise InvalidKeyError(f"{what} {key!r} must be a non-empty string of at most {_MAX_KEY} characters")
    for seg in key.split("/"):
        if seg in ("", ".", "..") or not _SEGMENT.fullmatch(seg):
            raise InvalidKeyError(
                f"{what} {key!r} is not a safe relative key: segment {seg!r} must be non-empty, "
                "not '.' or '..', and use only letters, digits and '._=+-'"
            )
    return key


def _validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a safe ``list`` prefix, else raise ``InvalidKeyError``.

    Every segment before the last ``/`` must be a whole valid key segment; the last one may
    be empty (a trailing ``/``) or any run of key characters (a partial segment).
    """
    if not isinstance(prefix, str) or len(prefix) > _MAX_KEY:
        raise InvalidKeyError(
            f"prefix {prefix!r} must be a string of at most {_MAX_KEY} characters"
        )
    if not prefix:
        return prefix
    head, _, last = prefix.rpartition("/")
    if head:
        validate_key(head, what="prefix")
    elif prefix.startswith("/"):
        raise InvalidKeyError(f"prefix {prefix!r} must be relative: drop the leading '/'")
    if last and not _SEGMENT.fullmatch(last):
        raise InvalidKeyError(
            f"prefix {prefix!r} is not a safe key prefix: {last!r} must use only letters, "
            "digits and '._=+-'"
        )
    return prefix


def _check_range(url: str, key: str, start: int, length: int) -> None:
    """Raise ``ValueError`` unless ``start`` and ``length`` are non-negative integers."""
    for name, value in (("start", start), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{url}: object {key!r}: {name} must be a non-negative int, got {value!r}"
            )


def join_key(*parts: str) -> str:
    """Join key parts with ``/`` and validate the result."""
    return validate_key("/".join(p.strip("/") for p in parts if p))


@dataclass(frozen=True)
class StoreCapabilities:
    """What a backend can do, so callers pick the right path instead of guessing.

    Attributes:
        atomic_put: ``put`` is all-or-nothing (always true for shipped backends).
        ranged_get: ``get_range`` reads only the requested bytes (no whole-object fetch).
        readinto: ``get_range_into`` fills a caller buffer without an intermediate copy.
        durable: a returned ``put`` survives power loss (fsync on local disk; S3 by design).
        compress_by_default: whether saves compress by default on this backend (object stores
            pay per byte moved; local disk is faster than zstd).
        remote: bytes cross a network.
    """

    atomic_put: bool = True
    ranged_get: bool = True
    readinto: bool = False
    durable: bool = True
    compress_by_default: bool = False
    remote: bool = False


class Store(ABC):
    """A flat key -> bytes store rooted at ``url``."""

    #: What this backend can do.
    capabilities: StoreCapabilities = StoreCapabilities()

    def __init__(self, url: str) -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- reads -------------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the whole object. Raises ``ObjectNotFoundError`` if it does not exist."""

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return ``length`` bytes from ``start``; raise ``StoreError`` if the object is short."""

    def get_range_into(self, key: str, start: int, out: memoryview, *, on_piece: Optional[PieceCallback] = None) -> None:
        """Fill ``out`` (a writable byte buffer) with ``out.nbytes`` bytes from ``start``.

        ``on_piece``, if given, is called with consecutive slices of ``out`` that together
        cover it, each as soon as its bytes are in. Backends that read in pieces call it while
        a piece is still in the CPU cache, so a checksum over the pieces costs far less than a
        second pass over the whole buffer.
        """
        view = memoryview(out).cast("B")
        view[:] = self.get_range(key, start, view.nbytes)
        if on_piece is not None:
            on_piece(view)

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a committed object ``key`` exists."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes. Raises ``ObjectNotFoundError`` if it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (a plain string prefix, not a glob)."""

    # -- writes ------------------------------------------------------------------------------
    @abstractmethod
    def put(self, key: str, data: Union[Buffer, Sequence[Buffer]]) -> None:
        """Atomically write ``data`` (one buffer or a sequence written back to back)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete every key (backends may batch)."""
        for key in keys:
            self.delete(key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (ending in ``/``), and whatever interrupted
        writes left there; returns how many listed objects were deleted."""
        keys = self.list(prefix)
        self.delete_many(keys)
        return len(keys)

    def sweep_interrupted(self, prefix: str, *, older_than_s: float, now_s: float) -> int:
        """Remove leftovers of ``put`` calls that died mid-write (a killed process), under
        ``prefix`` and older than ``older_than_s`` seconds at time ``now_s`` (Unix seconds).

        Backends whose puts leave nothing visible behind (S3, memory) have nothing to sweep.
        Returns how many leftovers were removed.
        """
        return 0

    def close(self) -> None:
        """Release connections and handles. The store is unusable afterwards."""

    # -- helpers for backends ----------------------------------------------------------------
    def _short_read(self, key: str, start: int, length: int, got: int) -> StoreError:
        return StoreError(
            f"{self.url}: object {key!r} is shorter than expected: asked for bytes "
            f"[{start}, {start + length}) but only {got} byte(s) are there (truncated object?)"
        )


def as_buffers(data: Union[Buffer, Sequence[Buffer]]) -> list[memoryview]:
    """Normalise ``put`` input to a list of flat byte memoryviews."""
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    out = []
    for item in items:
        mv = memoryview(item)
        if mv.ndim != 1 or mv.itemsize != 1 or not mv.c_contiguous:
            mv = mv.cast("B") if mv.c_contiguous else memoryview(bytes(mv))
        out.append(mv)
    return out
