"""The checkpoint manifest: frozen, versioned metadata with strict parsers.

``docs/format.md`` is the specification; this module implements it. Everything here is plain
data (no torch, no pickle): the coordinator and tools import it without torch, and
``parse_manifest`` is safe on untrusted bytes. It checks the size cap first, then every field
(types, ranges, names, byte ranges, that the chunks of each tensor tile it exactly once) before
the caller reads a single data object.

Keys below a checkpoint root (``ROOT``):

* ``ROOT/manifests/step-<step:012d>.<save_id>.json``: one manifest per committed save. Its
  presence is the commit.
* ``ROOT/data/step-<step:012d>.<save_id>/<object>``: the data objects of that save. Object
  names in a manifest are relative to this prefix and cannot leave it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ckpt.errors import (
    ManifestError,
    ManifestTooLargeError,
    UnsafeObjectNameError,
    UnsupportedFormatVersionError,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_MANIFEST_BYTES",
    "DTYPE_ITEMSIZE",
    "Checksum",
    "ChunkMeta",
    "TensorMeta",
    "Manifest",
    "SaveRef",
    "manifest_key",
    "data_prefix",
    "parse_manifest_key",
    "new_save_id",
    "parse_manifest",
    "validate_state_tree",
]

FORMAT_NAME = "ckpt.universal"
FORMAT_VERSION = 1
#: Manifests larger than this are refused before parsing (a 7B model's manifest is ~1 MiB).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_RANK_COUNT = 1 << 20
MAX_NDIM = 64
MAX_TREE_DEPTH = 64
MAX_STEP = 10**12 - 1
#: Hex digits of each checksum algorithm's value.
CHECKSUM_WIDTH: Mapping[str, int] = {"crc32c": 8, "xxh3_64": 16}

#: Element size in bytes of every dtype the format can store, by canonical (torch) name.
DTYPE_ITEMSIZE: Mapping[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "complex128": 16,
    "complex64": 8,
    "complex32": 4,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}

_SAVE_ID = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{8}$")
_MANIFEST_KEY = re.compile(r"^manifests/step-(\d{12})\.([0-9a-f]{16}-[0-9a-f]{8})\.json$")
_OBJECT_SEGMENT = re.compile(r"^[A-Za-z0-9._=+-]{1,255}$")
_HEX = re.compile(r"^[0-9a-f]+$")
_TAGS = ("$tensor", "$ndarray", "$shard", "$dict", "$tuple", "$float", "$bytes")


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------
def manifest_key(step: int, save_id: str) -> str:
    """Key of the manifest of save ``save_id`` of ``step`` (relative to the root)."""
    return f"manifests/step-{step:012d}.{save_id}.json"


def data_prefix(step: int, save_id: str) -> str:
    """Key prefix (ending in ``/``) of the data objects of save ``save_id`` of ``step``."""
    return f"data/step-{step:012d}.{save_id}/"


@dataclass(frozen=True, order=True)
class SaveRef:
    """A committed save found by its manifest key. Orders by (step, save_id)."""

    step: int
    save_id: str

    @property
    def manifest_key(self) -> str:
        return manifest_key(self.step, self.save_id)

    @property
    def data_prefix(self) -> str:
        return data_prefix(self.step, self.save_id)


def parse_manifest_key(key: str) -> Optional[SaveRef]:
    """Return the ``SaveRef`` a manifest key names, or ``None`` if ``key`` is not one."""
    m = _MANIFEST_KEY.match(key)
    if m is None:
        return None
    return SaveRef(int(m.group(1)), m.group(2))


def new_save_id(created_unix_ns: int, random32: int) -> str:
    """A save id that sorts by creation time: 16 hex digits of ns, ``-``, 8 random hex."""
    return f"{created_unix_ns & (2**64 - 1):016x}-{random32 & 0xFFFFFFFF:08x}"


# --------------------------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checksum:
    """A checksum of the stored (encoded) bytes of a chunk."""

    algorithm: str
    value: str

    def to_json(self) -> dict:
        return {"algorithm": self.algorithm, "value": self.value}


@dataclass(frozen=True)
class ChunkMeta:
    """One stored region of a logical tensor.

    Attributes:
        offsets: global index of the region's first element, per dimension.
        sizes: extent of the region per dimension.
        object: data object name, relative to the save's data prefix.
        byte_offset: first byte of the encoded chunk inside the object.
        byte_length: length of the encoded chunk.
        raw_length: length after decoding (``prod(sizes) * itemsize``).
        codecs: codec chain as JSON (``ckpt.codecs.CodecChain.from_json`` rebuilds it).
        checksum: checksum of the ``byte_length`` encoded bytes.
        order: storage order of the region's dimensions (a permutation, slowest first), or
            ``None`` for C order. ``(1, 0)`` stores a matrix column-major.
        block_bytes: for uncompressed chunks, the size of the blocks that carry checksums of
            their own (so a reader can fetch and verify a sub-range); 0 when there are none.
        block_checksums: the blocks' checksums, fixed-width hex, concatenated.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    object: str
    byte_offset: int
    byte_length: int
    raw_length: int
    codecs: tuple[Mapping[str, Any], ...]
    checksum: Checksum
    order: Optional[tuple[int, ...]] = None
    block_bytes: int = 0
    block_checksums: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def to_json(self) -> dict:
        out = self._core_json()
        if self.order is not None:
            out["order"] = list(self.order)
        if self.block_bytes:
            out["blocks"] = {"size": self.block_bytes, "checksums": self.block_checksums}
        return out

    def _core_json(self) -> dict:
        return {
            "offsets": list(self.offsets),
            "sizes": list(self.sizes),
            "object": self.object,
            "byte_offset": self.byte_offset,
            "byte_length": self.byte_length,
            "raw_length": self.raw_length,
            "codecs": [dict(c) for c in self.codecs],
            "checksum": self.checksum.to_json(),
        }


@dataclass(frozen=True)
class TensorMeta:
    """A logical (global) tensor and the chunks that store it."""

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkMeta, ...]

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def to_json(self) -> dict:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "chunks": [c.to_json() for c in self.chunks],
        }


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to load one committed save of one step.

    Attributes:
        step: training step.
        save_id: unique id of this save (a re-save of a step gets a new one).
        created_unix_ns: when the save started (writer's clock).
        world_size: number of ranks that wrote it.
        tensors: logical tensors by name.
        ranks: per-rank non-tensor state trees (the encoding in ``docs/format.md``), index = rank.
        writer: library/version strings of the writer.
        layout: the writer's parallel layout (JSON object) or ``None``.
        extras: user metadata (a JSON object).
        format_version: format version of this manifest.
    """

    step: int
    save_id: str
    created_unix_ns: int
    world_size: int
    tensors: Mapping[str, TensorMeta]
    ranks: tuple[Any, ...]
    writer: Mapping[str, str] = field(default_factory=dict)
    layout: Optional[Mapping[str, Any]] = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def ref(self) -> SaveRef:
        return SaveRef(self.step, self.save_id)

    @property
    def data_prefix(self) -> str:
        return data_prefix(self.step, self.save_id)

    @property
    def nbytes(self) -> int:
        """Logical (decoded) size of all tensors."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def stored_bytes(self) -> int:
        return sum(c.byte_length for t in self.tensors.values() for c in t.chunks)

    def objects(self) -> list[str]:
        """Sorted distinct data object names this manifest references."""
        return sorted({c.object for t in self.tensors.values() for c in t.chunks})

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "save_id": self.save_id,
            "created_unix_ns": self.created_unix_ns,
            "world_size": self.world_size,
            "writer": dict(self.writer),
            "layout": None if self.layout is None else dict(self.layout),
            "extras": dict(self.extras),
            "tensors": {name: self.tensors[name].to_json() for name in sorted(self.tensors)},
            "ranks": list(self.ranks),
        }

    def to_bytes(self) -> bytes:
        """Canonical serialisation: sorted keys, compact, UTF-8, no NaN literals."""
        data = json.dumps(
            self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestTooLargeError(
                f"manifest of step {self.step} would be {len(data)} bytes, over the cap of "
                f"{MAX_MANIFEST_BYTES}; store large non-tensor values as tensors instead"
            )
        return data


# --------------------------------------------------------------------------------------------
# Parsing untrusted manifests
# --------------------------------------------------------------------------------------------
class _Ctx:
    """Carries the manifest's name so every error says where it came from."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, msg: str, cls: type[ManifestError] = ManifestError) -> ManifestError:
        return cls(f"{self.source}: field {path}: {msg}")


def _obj(ctx: _Ctx, v: Any, path: str, keys: set[str], optional: set[str] = frozenset()) -> dict:  # type: ignore[assignment]
    if not isinstance(v, dict):
        raise ctx.fail(path, f"must be an object, got {type(v).__name__}")
    missing = keys - set(v) - set(optional)
    if missing:
        raise ctx.fail(path, f"missing required key(s) {sorted(missing)}")
    extra = set(v) - keys - set(optional)
    if extra:
        raise ctx.fail(path, f"unknown key(s) {sorted(extra)}")
    return v


def _int(ctx: _Ctx, v: Any, path: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if type(v) is not int:
        raise ctx.fail(path, f"must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ctx.fail(path, f"{v} is out of range [{lo}, {hi}]")
    return v


def _str(ctx: _Ctx, v: Any, path: str, max_len: int = 4096) -> str:
    if not isinstance(v, str):
        raise ctx.fail(path, f"must be a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise ctx.fail(path, f"string of {len(v)} characters exceeds {max_len}")
    return v


def _int_list(ctx: _Ctx, v: Any, path: str) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise ctx.fail(path, f"must be a list of integers, got {type(v).__name__}")
    if len(v) > MAX_NDIM:
        raise ctx.fail(path, f"has {len(v)} dimensions, more than {MAX_NDIM}")
    return tuple(_int(ctx, x, f"{path}[{i}]") for i, x in enumerate(v))


def _object_name(ctx: _Ctx, v: Any, path: str) -> str:
    name = _str(ctx, v, path, 1024)
    segs = name.split("/")
    if not name or name.startswith("/") or any(s in ("", ".", "..") or not _OBJECT_SEGMENT.match(s) for s in segs):
        raise ctx.fail(
            path,
            f"object name {name!r} is not a safe name relative to the save's data prefix "
            "(no '..', no absolute paths or URLs, letters, digits and '._=+-' only)",
            UnsafeObjectNameError,
        )
    return name


def _parse_chunk(ctx: _Ctx, v: Any, path: str, shape: tuple[int, ...], itemsize: int) -> ChunkMeta:
    from ckpt.codecs import CodecChain, parse_checksum  # local: keeps import light

    keys = {"offsets", "sizes", "object", "byte_offset", "byte_length", "raw_length", "codecs", "checksum"}
    d = _obj(ctx, v, path, keys, optional={"order", "blocks"})
    offsets = _int_list(ctx, d["offsets"], f"{path}.offsets")
    sizes = _int_list(ctx, d["sizes"], f"{path}.sizes")
    if len(offsets) != len(shape) or len(sizes) != len(shape):
        raise ctx.fail(path, f"offsets/sizes have {len(offsets)}/{len(sizes)} dims, tensor has {len(shape)}")
    for i, (o, s, n) in enumerate(zip(offsets, sizes, shape)):
        if o + s > n:
            raise ctx.fail(path, f"region [{o}, {o + s}) of dim {i} lies outside the tensor's size {n}")
    obj = _object_name(ctx, d["object"], f"{path}.object")
    byte_offset = _int(ctx, d["byte_offset"], f"{path}.byte_offset")
    byte_length = _int(ctx, d["byte_length"], f"{path}.byte_length")
    raw_length = _int(ctx, d["raw_length"], f"{path}.raw_length")
    want = math.prod(sizes) * itemsize
    if raw_length != want:
        raise ctx.fail(f"{path}.raw_length", f"is {raw_length}, but sizes {list(sizes)} x {itemsize} bytes = {want}")
    if not isinstance(d["codecs"], list):
        raise ctx.fail(f"{path}.codecs", "must be a list")
    try:
        chain = CodecChain.from_json(d["codecs"], where=f"{ctx.source}: field {path}.codecs")
        alg, value = parse_checksum(d["checksum"], where=f"{ctx.source}: field {path}.checksum")
    except ManifestError:
        raise
    except ValueError as e:  # CodecError is a ValueError
        raise ManifestError(str(e)) from e
    if not chain.codecs and byte_length != raw_length:
        raise ctx.fail(f"{path}.byte_length", f"is {byte_length} but an uncompressed chunk must be {raw_length} bytes")
    order = None
    if "order" in d:
        order = _int_list(ctx, d["order"], f"{path}.order")
        if sorted(order) != list(range(len(shape))) or order == tuple(range(len(shape))):
            raise ctx.fail(f"{path}.order", f"{list(order)} must be a non-identity permutation of the {len(shape)} dims")
    block_bytes, block_sums = 0, ""
    if "blocks" in d:
        b = _obj(ctx, d["blocks"], f"{path}.blocks", {"size", "checksums"})
        block_bytes = _int(ctx, b["size"], f"{path}.blocks.size", 1, 2**40)
        block_sums = _str(ctx, b["checksums"], f"{path}.blocks.checksums", MAX_MANIFEST_BYTES)
        width = CHECKSUM_WIDTH[alg]
        count = -(-byte_length // block_bytes)
        if chain.codecs:
            raise ctx.fail(f"{path}.blocks", "block checksums are only defined for uncompressed chunks")
        if len(block_sums) != count * width or not _HEX.match(block_sums or "0"):
            raise ctx.fail(f"{path}.blocks.checksums", f"must be {count} x {width} lowercase hex digits for {byte_length} bytes in blocks of {block_bytes}")
    return ChunkMeta(
        offsets=offsets,
        sizes=sizes,
        object=obj,
        byte_offset=byte_offset,
        byte_length=byte_length,
        raw_length=raw_length,
        codecs=tuple(chain.to_json()),
        checksum=Checksum(alg, value),
        order=order,
        block_bytes=block_bytes,
        block_checksums=block_sums,
    )


def _check_tiling(ctx: _Ctx, path: str, shape: tuple[int, ...], chunks: tuple[ChunkMeta, ...]) -> None:
    """Chunks must cover every element of the tensor exactly once."""
    numel = math.prod(shape)
    nonempty = [c for c in chunks if c.numel > 0]
    total = sum(c.numel for c in nonempty)
    if total != numel:
        raise ctx.fail(path, f"chunks hold {total} elements but the tensor has {numel}: regions missing or overlapping")
    if len(nonempty) < 2:
        return
    import numpy as np  # only needed for multi-chunk tensors

    lo = np.array([c.offsets for c in nonempty], dtype=np.int64)
    hi = lo + np.array([c.sizes for c in nonempty], dtype=np.int64)
    for i in range(len(nonempty) - 1):  # row by row keeps memory linear in the chunk count
        overlap = np.all((lo[i] < hi[i + 1 :]) & (lo[i + 1 :] < hi[i]), axis=1)
        if overlap.any():
            j = i + 1 + int(np.argmax(overlap))
            raise ctx.fail(path, f"chunks {i} and {j} overlap (offsets {list(lo[i])} and {list(lo[j])})")


def _parse_tensor(ctx: _Ctx, name: str, v: Any) -> TensorMeta:
    path = f"tensors[{name!r}]"
    d = _obj(ctx, v, path, {"dtype", "shape", "chunks"})
    dtype = _str(ctx, d["dtype"], f"{path}.dtype", 64)
    if dtype not in DTYPE_ITEMSIZE:
        raise ctx.fail(f"{path}.dtype", f"unknown dtype {dtype!r}; known: {sorted(DTYPE_ITEMSIZE)}")
    shape = _int_list(ctx, d["shape"], f"{path}.shape")
    if not isinstance(d["chunks"], list):
        raise ctx.fail(f"{path}.chunks", "must be a list")
    itemsize = DTYPE_ITEMSIZE[dtype]
    chunks = tuple(_parse_chunk(ctx, c, f"{path}.chunks[{i}]", shape, itemsize) for i, c in enumerate(d["chunks"]))
    _check_tiling(ctx, path, shape, chunks)
    return TensorMeta(dtype=dtype, shape=shape, chunks=chunks)


def validate_state_tree(tree: Any, tensor_names: Mapping[str, Any] | set[str], *, where: str = "state") -> None:
    """Check an encoded non-tensor state tree (see ``docs/format.md``, "State trees").

    Raises:
        ManifestError: on an unknown tag, a malformed tagged node, a tensor reference to a
            tensor the manifest does not have, or nesting deeper than ``MAX_TREE_DEPTH``.
    """
    stack: list[tuple[Any, str, int]] = [(tree, where, 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_TREE_DEPTH:
            raise ManifestError(f"{path}: nested deeper than {MAX_TREE_DEPTH} levels")
        if node is None or isinstance(node, (bool, str)):
            continue
        if isinstance(node, int) or isinstance(node, float):
            continue
        if isinstance(node, list):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(node))
            continue
        if not isinstance(node, dict) or len(node) != 1:
            raise ManifestError(f"{path}: a JSON object in a state tree must have exactly one tag key {_TAGS}")
        (tag, val), = node.items()
        if tag in ("$tensor", "$ndarray"):
            if not isinstance(val, str) or val not in tensor_names:
                raise ManifestError(f"{path}: {tag} refers to {val!r}, which is not a tensor of this manifest")
        elif tag == "$shard":
            if not isinstance(val, str) or not val or len(val) > 4096:
                raise ManifestError(f"{path}: $shard must name the writer's local tensor (1..4096 characters)")
        elif tag == "$dict":
            if not isinstance(val, list) or any(not isinstance(p, list) or len(p) != 2 for p in val):
                raise ManifestError(f"{path}: $dict must be a list of [key, value] pairs")
            for i, (k, x) in enumerate(val):
                if not (k is None or isinstance(k, (bool, int, str))) and not (isinstance(k, dict) and set(k) <= {"$float", "$tuple", "$bytes"}):
                    raise ManifestError(f"{path}: $dict key {i} has unsupported type {type(k).__name__}")
                stack.append((k, f"{path}.key[{i}]", depth + 1))
                stack.append((x, f"{path}[{k!r}]", depth + 1))
        elif tag == "$tuple":
            if not isinstance(val, list):
                raise ManifestError(f"{path}: $tuple must be a list")
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(val))
        elif tag == "$float":
            if val not in ("nan", "inf", "-inf"):
                raise ManifestError(f"{path}: $float must be 'nan', 'inf' or '-inf', got {val!r}")
        elif tag == "$bytes":
            if not isinstance(val, str):
                raise ManifestError(f"{path}: $bytes must be a base64 string")
        else:
            raise ManifestError(f"{path}: unknown tag {tag!r}; known tags are {_TAGS}")


def parse_manifest(data: bytes, *, source: str = "manifest", max_bytes: int = MAX_MANIFEST_BYTES) -> Manifest:
    """Parse and validate untrusted manifest bytes.

    Args:
        data: the raw manifest object.
        source: where it came from (store URL and key), used in every error.
        max_bytes: size cap checked before parsing.

    Raises:
        ManifestTooLargeError, UnsupportedFormatVersionError, UnsafeObjectNameError,
        ManifestError: with the field path and the reason.
    """
    ctx = _Ctx(source)
    if len(data) > max_bytes:
        raise ManifestTooLargeError(f"{source}: manifest is {len(data)} bytes, over the cap of {max_bytes}; refusing to parse it")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise ManifestError(f"{source}: not a valid UTF-8 JSON manifest: {e}") from e
    if not isinstance(doc, dict):
        raise ctx.fail("(root)", "must be a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise ctx.fail("format", f"is {doc.get('format')!r}, expected {FORMAT_NAME!r}: not a ckpt manifest")
    version = doc.get("format_version")
    if type(version) is not int:
        raise ctx.fail("format_version", "must be an integer")
    if version != FORMAT_VERSION:
        raise UnsupportedFormatVersionError(
            f"{source}: format_version {version} is not supported by this reader (it reads "
            f"version {FORMAT_VERSION}); upgrade ckpt to read newer checkpoints"
        )
    keys = {"format", "format_version", "step", "save_id", "created_unix_ns", "world_size", "writer", "layout", "extras", "tensors", "ranks"}
    _obj(ctx, doc, "(root)", keys)
    step = _int(ctx, doc["step"], "step", 0, MAX_STEP)
    save_id = _str(ctx, doc["save_id"], "save_id", 64)
    if not _SAVE_ID.match(save_id):
        raise ctx.fail("save_id", f"{save_id!r} is not 16 hex digits, '-', 8 hex digits")
    created = _int(ctx, doc["created_unix_ns"], "created_unix_ns")
    world_size = _int(ctx, doc["world_size"], "world_size", 1, MAX_RANK_COUNT)
    writer = doc["writer"]
    if not isinstance(writer, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in writer.items()):
        raise ctx.fail("writer", "must be an object of strings")
    layout = doc["layout"]
    if layout is not None and not isinstance(layout, dict):
        raise ctx.fail("layout", "must be an object or null")
    extras = doc["extras"]
    if not isinstance(extras, dict):
        raise ctx.fail("extras", "must be an object")
    tensors_doc = doc["tensors"]
    if not isinstance(tensors_doc, dict):
        raise ctx.fail("tensors", "must be an object keyed by tensor name")
    tensors: dict[str, TensorMeta] = {}
    for name, t in tensors_doc.items():
        if not name or len(name) > 4096:
            raise ctx.fail("tensors", f"tensor name {name[:64]!r} must be 1..4096 characters")
        tensors[name] = _parse_tensor(ctx, name, t)
    ranks = doc["ranks"]
    if not isinstance(ranks, list) or len(ranks) != world_size:
        raise ctx.fail("ranks", f"must be a list of {world_size} state trees (one per rank)")
    for r, tree in enumerate(ranks):
        validate_state_tree(tree, tensors, where=f"{source}: field ranks[{r}]")
    return Manifest(
        step=step,
        save_id=save_id,
        created_unix_ns=created,
        world_size=world_size,
        tensors=tensors,
        ranks=tuple(ranks),
        writer=dict(writer),
        layout=layout,
        extras=extras,
        format_version=version,
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed in a manifest (use the $float tag)")
