"""Named, configured, composable codecs and the checksums recorded in the manifest.

A stored chunk is ``chain.encode(raw_bytes)``; the manifest records ``chain.to_json()`` next to
the chunk, so a reader rebuilds the exact chain with :meth:`CodecChain.from_json` and calls
``chain.decode(stored, decoded_size)``. Codec specs use the zarr v3 shape::

    {"name": "zstd", "configuration": {"level": 3, "checksum": false}}

Codecs live in a registry keyed by ``name`` (:func:`register_codec`); :func:`codec_from_json`
treats its input as untrusted and checks every field before a codec is built.

Checksums (:class:`Hasher`, :func:`checksum`) are taken over the *stored* bytes and written as
``{"algorithm": "crc32c", "value": "e3069283"}``; :func:`parse_checksum` validates that form.

Buffers: every function here takes any C-contiguous buffer (``bytes``, ``bytearray``,
``memoryview``, a numpy array) and reads it through a byte ``memoryview`` without copying.

This module imports numpy, ``crc32c``, ``xxhash`` and ``zstandard``, never torch.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import numpy as np
import zstandard as _zstd

from ckpt._checksums import (
    CHECKSUM_ALGORITHMS,
    DEFAULT_CHECKSUM,
    BufferLike,
    Hasher,
    byte_view as _byte_view,
    checksum,
    parse_checksum,
    check_keys as _check_keys,
    short_repr as _short,
)
from ckpt.errors import CodecError

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "DEFAULT_CHECKSUM",
    "MAX_CHAIN_LENGTH",
    "Hasher",
    "checksum",
    "parse_checksum",
    "Codec",
    "ByteShuffle",
    "Zstd",
    "codec_from_json",
    "register_codec",
    "CodecChain",
    "default_chain",
]

JSONObject = dict[str, Any]

MAX_CHAIN_LENGTH = 16
"""Most codecs a chain read from a manifest may hold (a bound on hostile input)."""

MAX_ELEMENTSIZE = 256
"""Largest ``ByteShuffle.elementsize`` (and ``default_chain`` itemsize) accepted."""

_CODEC_NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")


def _check_decoded_size(decoded_size: int) -> None:
    if isinstance(decoded_size, bool) or not isinstance(decoded_size, int):
        raise TypeError(f"decoded_size must be an int, got {type(decoded_size).__name__}")
    if decoded_size < 0:
        raise CodecError(f"decoded_size must be >= 0, got {decoded_size}")

# ------------------------------------------------------------------------ field validation


def _int_field(value: object, *, lo: int, hi: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"{where}: expected an integer in [{lo}, {hi}], got {_short(value)}")
    if not lo <= value <= hi:
        raise CodecError(f"{where}: {value} is out of range; expected an integer in [{lo}, {hi}]")
    return value


def _bool_field(value: object, *, where: str) -> bool:
    if not isinstance(value, bool):
        raise CodecError(f"{where}: expected true or false, got {_short(value)}")
    return value


# ------------------------------------------------------------------------------------ codecs


class Codec(ABC):
    """A named, configured, bytes-to-bytes transform recorded in the manifest.

    Subclasses are frozen dataclasses whose fields are the configuration, registered with
    :func:`register_codec`. Call order for a reader: :func:`codec_from_json` checks the
    ``{"name", "configuration"}`` envelope, looks ``name`` up in the registry and calls
    :meth:`from_configuration`; the chain then calls :meth:`decode` once per stored chunk.
    ``encode``/``decode`` may be called from many threads at once and must not mutate ``self``.

    Attributes:
        name: registry key written to the manifest.
        size_preserving: ``True`` when ``len(encode(x)) == len(x)`` always; a chain allows a
            size-changing codec only in the last position (see :class:`CodecChain`).
    """

    name: ClassVar[str]
    size_preserving: ClassVar[bool] = False

    @abstractmethod
    def configuration(self) -> JSONObject:
        """Returns the JSON-serialisable configuration (may be ``{}``)."""

    @classmethod
    @abstractmethod
    def from_configuration(cls, config: JSONObject, *, where: str) -> Codec:
        """Builds the codec from an untrusted configuration dict.

        Raises:
            CodecError: a key is missing, unexpected, of the wrong type or out of range; the
                message names ``where`` and the field.
        """

    @abstractmethod
    def encode(self, data: memoryview) -> bytes | memoryview:
        """Encodes a flat byte view; the input is never modified."""

    @abstractmethod
    def decode(self, data: memoryview, *, decoded_size: int) -> bytes | memoryview:
        """Decodes ``data`` into exactly ``decoded_size`` bytes.

        Raises:
            CodecError: ``data`` does not decode, or not to ``decoded_size`` bytes.
        """

    def to_json(self) -> JSONObject:
        """Returns the zarr-v3-style spec ``{"name": ..., "configuration": {...}}``."""
        return {"name": self.name, "configuration": self.configuration()}

    def describe(self) -> str:
        """Returns a short human form such as ``zstd(level=3, checksum=False)``."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.configuration().items())
        return f"{self.name}({args})"


_REGISTRY: dict[str, type[Codec]] = {}

_C = TypeVar("_C", bound=type)


def register_codec(cls: _C) -> _C:
    """Class decorator adding a :class:`Codec` subclass to the registry under ``cls.name``.

    Raises:
        TypeError: ``cls`` is not a Codec subclass.
        CodecError: ``cls.name`` is not a lowercase identifier (``[a-z][a-z0-9_.-]*``, at most
            64 chars) or is already registered to another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, Codec)):
        raise TypeError(f"register_codec expects a Codec subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _CODEC_NAME_RE.fullmatch(name):
        raise CodecError(
            f"{cls.__qualname__}.name must be a lowercase identifier matching "
            f"{_CODEC_NAME_RE.pattern}, got {name!r}"
        )
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise CodecError(
            f"codec name {name!r} is already registered to {existing.__module__}."
            f"{existing.__qualname__}; give {cls.__qualname__} another name"
        )
    _REGISTRY[name] = cls
    return cls


def codec_from_json(obj: object, *, where: str = "codec") -> Codec:
    """Builds a codec from an untrusted ``{"name": ..., "configuration": {...}}`` spec.

    Args:
        obj: the parsed JSON value.
        where: field path used in error messages.

    Raises:
        CodecError: ``obj`` is not an object, has missing or extra keys, names an unknown
            codec, or its configuration is invalid; the message names ``where`` and the field.
    """
    if not isinstance(obj, dict):
        raise CodecError(
            f"{where}: expected a codec object {{'name': ..., 'configuration': {{...}}}}, got "
            f"{type(obj).__name__}"
        )
    _check_keys(obj, required=("name", "configuration"), where=where)
    name = obj["name"]
    if not isinstance(name, str):
        raise CodecError(f"{where}.name: expected a string, got {type(name).__name__}")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise CodecError(
            f"{where}.name: unknown codec {_short(name)}; known codecs: "
            f"{', '.join(sorted(_REGISTRY))}. The checkpoint was written by a newer ckpt or "
            "with a plugin codec: upgrade ckpt or import the module that registers it"
        )
    config = obj["configuration"]
    if not isinstance(config, dict):
        raise CodecError(
            f"{where}.configuration: expected an object, got {type(config).__name__}"
        )
    return cls.from_configuration(config, where=f"{where}.configuration")


def _block_transpose(dst: np.ndarray, src: np.ndarray) -> None:
    """Copies ``src`` into ``dst`` (both ``(n, k)`` views, one of them transposed).

    A plain ``dst[...] = src`` runs at 0.6-2 GB/s depending on k; copying one column of a
    1 MiB row block at a time keeps both sides streaming (about 3 GB/s on one EPYC core for
    every k up to 16, see ``tests/benchmarks/bench_codecs.py``).
    """
    n, k = src.shape
    rows = max(1, (1 << 20) // k)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        for j in range(k):
            dst[start:stop, j] = src[start:stop, j]


@register_codec
@dataclass(frozen=True)
class ByteShuffle(Codec):
    """Byte-grouping pre-filter: byte ``j`` of every element is stored together.

    The input is viewed as ``n`` elements of ``elementsize`` bytes, an ``(n, k)`` byte matrix,
    and stored transposed, ``(k, n)``. For floats the sign/exponent bytes then form long
    near-constant runs that zstd compresses far better. If the length is not a multiple of
    ``elementsize`` the trailing ``len % elementsize`` bytes are kept unshuffled at the end.
    The output length always equals the input length.

    Attributes:
        elementsize: element size in bytes, 1 to 256 (1 is the identity).
    """

    name: ClassVar[str] = "byteshuffle"
    size_preserving: ClassVar[bool] = True

    elementsize: int

    def __post_init__(self) -> None:
        _int_field(self.elementsize, lo=1, hi=MAX_ELEMENTSIZE, where="ByteShuffle.elementsize")

    def configuration(self) -> JSONObject:
        return {"elementsize": self.elementsize}

    @classmethod
    def from_configuration(cls, config: JSONObject, *, where: str) -> ByteShuffle:
        _check_keys(config, required=("elementsize",), where=where)
        size = _int_field(
            config["elementsize"], lo=1, hi=MAX_ELEMENTSIZE, where=f"{where}.elementsize"
        )
        return cls(elementsize=size)

    def _apply(self, view: memoryview, *, forward: bool) -> memoryview:
        k = self.elementsize
        n = len(view) // k
        if k == 1 or n <= 1:
            return view
        src = np.frombuffer(view, dtype=np.uint8)
        out = np.empty(len(view), dtype=np.uint8)
        body = n * k
        if forward:
            _block_transpose(out[:body].reshape(k, n).T, src[:body].reshape(n, k))
        else:
            _block_transpose(out[:body].reshape(n, k), src[:body].reshape(k, n).T)
        out[body:] = src[body:]
        return memoryview(out)

    def encode(self, data: memoryview) -> memoryview:
        """Returns the shuffled bytes (the input view itself when shuffling is a no-op)."""
        return self._apply(_byte_view(data), forward=True)

    def decode(self, data: memoryview, *, decoded_size: int) -> memoryview:
        """Undoes :meth:`encode`; ``len(data)`` must equal ``decoded_size``."""
        _check_decoded_size(decoded_size)
        view = _byte_view(data)
        if len(view) != decoded_size:
            raise CodecError(
                f"byteshuffle: got {len(view)} bytes but byteshuffle preserves length and "
                f"{decoded_size} were expected; the chunk is truncated or the chain is wrong"
            )
        return self._apply(view, forward=False)


class _ZstdContexts(threading.local):
    """Per-thread zstd contexts, one per configuration (``None`` keys the decompressor).

    zstandard contexts are not thread safe, but compress/decompress release the GIL, so each
    thread reuses its own and chunks encode in parallel.
    """

    def __init__(self) -> None:
        self.cache: dict[object, Any] = {}

    def compressor(self, level: int, checksum: bool) -> _zstd.ZstdCompressor:
        key = (level, checksum)
        if key not in self.cache:
            self.cache[key] = _zstd.ZstdCompressor(
                level=level, write_checksum=checksum, write_content_size=True
            )
        return self.cache[key]

    def decompressor(self) -> _zstd.ZstdDecompressor:
        if None not in self.cache:
            self.cache[None] = _zstd.ZstdDecompressor()
        return self.cache[None]


_ZSTD_CONTEXTS = _ZstdContexts()
ZSTD_MIN_LEVEL = -7
ZSTD_MAX_LEVEL = 22


@register_codec
@dataclass(frozen=True)
class Zstd(Codec):
    """Zstandard compression, one frame per chunk, with the content size in the frame header.

    Decoding is bounded: a frame whose header declares a size other than ``decoded_size`` is
    refused before any output is allocated, and a frame without a declared size is decoded
    into a buffer of at most ``decoded_size`` bytes, so a small hostile frame cannot expand
    into gigabytes. Trailing bytes after the frame are refused.

    Attributes:
        level: compression level, -7 (fastest) to 22 (smallest); 1 to 3 suit checkpoints.
        checksum: also write zstd's own 32-bit content checksum. Off by default because the
            manifest already carries a checksum of every stored chunk.
    """

    name: ClassVar[str] = "zstd"

    level: int = 3
    checksum: bool = False

    def __post_init__(self) -> None:
        _int_field(self.level, lo=ZSTD_MIN_LEVEL, hi=ZSTD_MAX_LEVEL, where="Zstd.level")
        _bool_field(self.checksum, where="Zstd.checksum")

    def configuration(self) -> JSONObject:
        return {"level": self.level, "checksum": self.checksum}

    @classmethod
    def from_configuration(cls, config: JSONObject, *, where: str) -> Zstd:
        _check_keys(config, required=("level", "checksum"), where=where)
        level = _int_field(
            config["level"], lo=ZSTD_MIN_LEVEL, hi=ZSTD_MAX_LEVEL, where=f"{where}.level"
        )
        return cls(level=level, checksum=_bool_field(config["checksum"], where=f"{where}.checksum"))

    def encode(self, data: memoryview) -> bytes:
        """Compresses ``data`` into one zstd frame (releases the GIL while compressing)."""
        return _ZSTD_CONTEXTS.compressor(self.level, self.checksum).compress(_byte_view(data))

    def decode(self, data: memoryview, *, decoded_size: int) -> bytes:
        """Decompresses one frame into exactly ``decoded_size`` bytes.

        Raises:
            CodecError: ``data`` is not a complete zstd frame, has trailing bytes, fails zstd's
                checksum, or does not decompress to exactly ``decoded_size`` bytes.
        """
        _check_decoded_size(decoded_size)
        view = _byte_view(data)
        try:
            declared = _zstd.get_frame_parameters(view).content_size
        except _zstd.ZstdError as exc:
            raise CodecError(
                f"zstd: {len(view)} input bytes do not start with a zstd frame header ({exc}); "
                "the chunk is corrupt, truncated or was not written with this codec"
            ) from exc
        if declared != _zstd.CONTENTSIZE_UNKNOWN and declared != decoded_size:
            raise CodecError(
                f"zstd: the frame header declares {declared} decompressed bytes but "
                f"{decoded_size} were expected; refusing to decompress (corrupt chunk or "
                "wrong manifest entry)"
            )
        try:
            out = _ZSTD_CONTEXTS.decompressor().decompress(
                view, max_output_size=max(decoded_size, 1), allow_extra_data=False
            )
        except _zstd.ZstdError as exc:
            raise CodecError(
                f"zstd: {len(view)} input bytes do not decompress to {decoded_size} bytes "
                f"({exc}); the chunk is corrupt or truncated"
            ) from exc
        if len(out) != decoded_size:
            raise CodecError(
                f"zstd: the frame decompressed to {len(out)} bytes but {decoded_size} were "
                "expected; the chunk is corrupt or the manifest entry is wrong"
            )
        return out


# ------------------------------------------------------------------------------------ chains


@dataclass(frozen=True)
class CodecChain:
    """An ordered, immutable list of codecs: encode applies them in order, decode in reverse.

    Sizes: the manifest records only the final decoded size of a chunk, so every codec but
    the last must be size preserving (:attr:`Codec.size_preserving`). Decoding then passes the
    final size to every stage: the last codec (e.g. zstd) decodes to the input size of the
    size-preserving codecs before it, which equals the final size. Chains breaking this rule
    (``[zstd, byteshuffle]``, ``[zstd, zstd]``) are refused at construction.

    The empty chain is the identity and returns the input as a byte memoryview, uncopied.

    Attributes:
        codecs: the codecs in encode order.
    """

    codecs: tuple[Codec, ...] = ()

    def __post_init__(self) -> None:
        codecs = tuple(self.codecs)
        for i, codec in enumerate(codecs):
            if not isinstance(codec, Codec):
                raise TypeError(f"CodecChain.codecs[{i}] is {codec!r}, not a Codec")
            if not codec.size_preserving and i != len(codecs) - 1:
                raise CodecError(
                    f"codec chain [{', '.join(c.describe() for c in codecs)}]: "
                    f"{codec.name!r} changes the data size, so it must be the last codec; "
                    "put size-preserving filters such as byteshuffle before it"
                )
        object.__setattr__(self, "codecs", codecs)

    def describe(self) -> str:
        """Returns a short human form such as ``byteshuffle(elementsize=4) | zstd(...)``."""
        return " | ".join(c.describe() for c in self.codecs) or "identity"

    def to_json(self) -> list[JSONObject]:
        """Returns the list of codec specs in encode order."""
        return [c.to_json() for c in self.codecs]

    @classmethod
    def from_json(cls, obj: object, *, where: str = "codecs") -> CodecChain:
        """Builds a chain from an untrusted list of codec specs.

        Raises:
            CodecError: ``obj`` is not a list, is longer than :data:`MAX_CHAIN_LENGTH`, holds
                an invalid spec, or describes an invalid chain; the message names ``where``.
        """
        if not isinstance(obj, list):
            raise CodecError(f"{where}: expected a list of codec objects, got {type(obj).__name__}")
        if len(obj) > MAX_CHAIN_LENGTH:
            raise CodecError(
                f"{where}: {len(obj)} codecs, more than the limit of {MAX_CHAIN_LENGTH}; "
                "the manifest is corrupt"
            )
        codecs = tuple(codec_from_json(spec, where=f"{where}[{i}]") for i, spec in enumerate(obj))
        try:
            return cls(codecs)
        except CodecError as exc:
            raise CodecError(f"{where}: {exc}") from exc

    def _run(self, stage: int, fn: Callable[[], bytes | memoryview]) -> memoryview:
        try:
            return _byte_view(fn())
        except CodecError as exc:
            raise CodecError(f"codec {stage} of [{self.describe()}]: {exc}") from exc

    def encode(self, data: BufferLike) -> memoryview:
        """Encodes ``data`` (any C-contiguous buffer) through every codec in order."""
        view = _byte_view(data)
        for i, codec in enumerate(self.codecs):
            view = self._run(i, lambda c=codec, v=view: c.encode(v))
        return view

    def decode(self, data: BufferLike, decoded_size: int) -> memoryview:
        """Decodes ``data`` through every codec in reverse order into ``decoded_size`` bytes.

        Raises:
            CodecError: a stage fails, or the result is not ``decoded_size`` bytes long.
        """
        _check_decoded_size(decoded_size)
        view = _byte_view(data)
        for i in reversed(range(len(self.codecs))):
            codec = self.codecs[i]
            view = self._run(i, lambda c=codec, v=view: c.decode(v, decoded_size=decoded_size))
        if len(view) != decoded_size:
            raise CodecError(
                f"codec chain [{self.describe()}] produced {len(view)} bytes but "
                f"{decoded_size} were expected; the chunk is truncated or the chain is wrong"
            )
        return view


def default_chain(itemsize: int, *, compression: str | None, level: int = 3) -> CodecChain:
    """Returns the chain ``save`` uses for tensors of ``itemsize``-byte elements.

    Args:
        itemsize: bytes per element (1 for int8/bool, 2 for bf16, 4 for fp32, ...).
        compression: ``None`` for the identity chain or ``"zstd"`` for byteshuffle (when
            ``itemsize > 1``) followed by zstd.
        level: zstd level, -7 to 22.

    Raises:
        CodecError: ``compression`` is not ``None`` or ``"zstd"``, or a value is out of range.
    """
    if compression is None:
        return CodecChain(())
    if compression != "zstd":
        raise CodecError(
            f"unknown compression {compression!r}; use None (no compression) or 'zstd'"
        )
    _int_field(itemsize, lo=1, hi=MAX_ELEMENTSIZE, where="default_chain itemsize")
    shuffle: tuple[Codec, ...] = (ByteShuffle(itemsize),) if itemsize > 1 else ()
    return CodecChain((*shuffle, Zstd(level=level)))
