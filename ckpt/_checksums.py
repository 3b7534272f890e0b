"""Checksums of stored chunk bytes: CRC32C (default) and XXH3-64.

Written in the manifest as ``{"algorithm": "crc32c", "value": "e3069283"}`` (fixed-width
lowercase hex); :func:`parse_checksum` validates that form from untrusted input. Every function
takes any C-contiguous buffer and reads it without copying. No torch.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

import crc32c as _crc32c
import numpy as np
import xxhash as _xxhash

from ckpt.errors import CodecError

__all__ = ["CHECKSUM_ALGORITHMS", "DEFAULT_CHECKSUM", "Hasher", "checksum", "parse_checksum", "BufferLike", "byte_view", "short_repr", "check_keys"]

BufferLike = Union[bytes, bytearray, memoryview, np.ndarray]
"""Anything exporting a C-contiguous buffer; numpy arrays of any dtype are accepted."""

CHECKSUM_ALGORITHMS: tuple[str, ...] = ("crc32c", "xxh3_64")
DEFAULT_CHECKSUM = "crc32c"
_HEX_WIDTH: dict[str, int] = {"crc32c": 8, "xxh3_64": 16}
_LOWER_HEX = frozenset("0123456789abcdef")

def byte_view(data: BufferLike) -> memoryview:
    """Returns a flat, unsigned-byte memoryview over ``data`` without copying.

    Raises:
        CodecError: ``data`` is not a buffer, or is not C-contiguous (copy it with
            ``np.ascontiguousarray`` first).
    """
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise CodecError(
                f"numpy array of shape {data.shape} is not C-contiguous; codecs and checksums "
                "read the buffer in place: pass np.ascontiguousarray(array)"
            )
        return memoryview(data.reshape(-1).view(np.uint8))
    try:
        view = data if isinstance(data, memoryview) else memoryview(data)
    except TypeError as exc:
        raise CodecError(
            f"expected a bytes-like buffer (bytes, bytearray, memoryview, numpy array), got "
            f"{type(data).__name__}"
        ) from exc
    if not view.c_contiguous:
        raise CodecError(
            f"buffer of shape {view.shape} is not C-contiguous; copy it into a contiguous "
            "buffer first"
        )
    if view.ndim == 1 and view.format == "B":
        return view
    try:
        return view.cast("B")
    except TypeError as exc:
        raise CodecError(f"cannot view buffer of format {view.format!r} as bytes: {exc}") from exc


def short_repr(value: object) -> str:
    """Returns ``repr(value)`` cut to 60 characters, for messages about untrusted input."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------- checksums


def _check_algorithm(algorithm: object, *, where: str) -> str:
    if not isinstance(algorithm, str) or algorithm not in _HEX_WIDTH:
        raise CodecError(
            f"{where}: unknown checksum algorithm {short_repr(algorithm)}; known algorithms: "
            f"{', '.join(CHECKSUM_ALGORITHMS)}"
        )
    return algorithm


class Hasher:
    """Incremental checksum over one or more buffers, fed back to back.

    Example::

        h = Hasher("crc32c")
        h.update(b"1234")
        h.update(memoryview(b"56789"))
        h.hexdigest()  # "e3069283", same as checksum("crc32c", b"123456789")

    Args:
        algorithm: one of :data:`CHECKSUM_ALGORITHMS`.

    Raises:
        CodecError: the algorithm is unknown.
    """

    __slots__ = ("algorithm", "_crc", "_xxh")

    def __init__(self, algorithm: str) -> None:
        self.algorithm = _check_algorithm(algorithm, where="Hasher")
        self._crc = 0
        self._xxh = _xxhash.xxh3_64() if algorithm == "xxh3_64" else None

    def update(self, data: BufferLike) -> None:
        """Feeds ``data`` (any C-contiguous buffer) to the hash; the buffer is not copied."""
        view = byte_view(data)
        if self._xxh is not None:
            self._xxh.update(view)
        else:
            self._crc = _crc32c.crc32c(view, self._crc)

    def hexdigest(self) -> str:
        """Returns the digest as fixed-width lowercase hex (8 chars crc32c, 16 xxh3_64)."""
        if self._xxh is not None:
            return format(self._xxh.intdigest(), "016x")
        return format(self._crc, "08x")


def checksum(algorithm: str, data: BufferLike | list[BufferLike] | tuple[BufferLike, ...]) -> str:
    """Returns the hex checksum of ``data``; a list or tuple of buffers is hashed back to back.

    Raises:
        CodecError: the algorithm is unknown or a buffer is not C-contiguous.
    """
    hasher = Hasher(algorithm)
    if isinstance(data, (list, tuple)):
        for part in data:
            hasher.update(part)
    else:
        hasher.update(data)
    return hasher.hexdigest()


def parse_checksum(obj: object, *, where: str) -> tuple[str, str]:
    """Validates an untrusted ``{"algorithm": ..., "value": ...}`` checksum record.

    Args:
        obj: the parsed JSON value.
        where: field path used in error messages, e.g. ``"tensors['w'].chunks[3].checksum"``.

    Returns:
        ``(algorithm, lowercase_hex_value)``.

    Raises:
        CodecError: ``obj`` is not such an object, has missing or extra keys, names an unknown
            algorithm, or its value is not lowercase hex of the algorithm's width.
    """
    if not isinstance(obj, dict):
        raise CodecError(
            f"{where}: expected an object {{'algorithm': ..., 'value': ...}}, got "
            f"{type(obj).__name__}; the manifest is corrupt"
        )
    check_keys(obj, required=("algorithm", "value"), where=where)
    algorithm = _check_algorithm(obj["algorithm"], where=f"{where}.algorithm")
    value = obj["value"]
    width = _HEX_WIDTH[algorithm]
    if not isinstance(value, str) or len(value) != width or not _LOWER_HEX.issuperset(value):
        raise CodecError(
            f"{where}.value: expected {width} lowercase hex digits for {algorithm}, got "
            f"{short_repr(value)}; the manifest is corrupt"
        )
    return algorithm, value


def check_keys(obj: Mapping[Any, Any], *, required: tuple[str, ...], where: str) -> None:
    """Raises CodecError unless ``obj`` has exactly the keys ``required``."""
    missing = [k for k in required if k not in obj]
    extra = [k for k in obj if k not in required]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unexpected {', '.join(short_repr(k) for k in sorted(extra, key=repr)[:8])}")
        raise CodecError(
            f"{where}: {'; '.join(parts)} (expected exactly the keys "
            f"{', '.join(map(repr, required))})"
        )
