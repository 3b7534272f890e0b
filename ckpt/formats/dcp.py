"""``torch.distributed.checkpoint`` directories (``.metadata`` + ``__<rank>_<n>.distcp`` files).

**Reading never runs the pickle.** DCP's ``.metadata`` is a pickle. It is read (size-capped) by
a restricted unpickler whose ``find_class`` resolves only the names DCP's metadata uses, to
inert stand-ins defined here: the ``torch.distributed.checkpoint`` metadata dataclasses and
``_StorageInfo`` become attribute bags, ``torch.Size`` a tuple, torch dtypes their names,
``pathlib`` paths strings, ``collections.OrderedDict`` itself. Any other global (``os.system``,
``builtins.eval``...) is refused with ``UnsafeInputError`` before anything is called, and no
torch.distributed code is imported. The result is then validated field by field (dtypes known,
chunks inside their tensor and tiling it, file names that cannot leave the directory, byte
ranges of non-negative integers) into the frozen ``DcpMetadata``.

Each tensor chunk is a ``torch.save`` blob at ``(file, offset, length)``; it is read through a
ranged file view with ``torch.load(weights_only=True)`` and must have the declared dtype and
chunk shape. Sharded saves (several ranks, DTensors) are assembled from their chunks, one tensor
at a time. Non-tensor items load the same way; one that needs code execution is skipped with a
warning naming it. Items written with DCP's experimental stream transforms (zstd extension) are
refused.

**Writing** streams: each tensor is ``torch.save``d into one ``__0_0.distcp`` file as it comes
(one chunk per tensor, as a single-process DCP save writes them), plain values as byte items,
and the pickled ``.metadata`` last (locally the whole directory is renamed into place at the
end). ``torch.distributed.checkpoint.load`` reads the result, into any sharding. Memory: one
tensor at a time.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from ckpt.formats._base import DestinationExistsError, FormatError, Reader, TensorInfo, UnsafeInputError, Writer
from ckpt.formats._io import SAFE_FILE_NAME, DirSink, FileSink, Location
from ckpt.metadata import DTYPE_ITEMSIZE, MAX_NDIM

__all__ = ["DcpReader", "DcpWriter", "DcpMetadata", "parse_metadata", "METADATA_NAME"]

METADATA_NAME = ".metadata"
#: ``.metadata`` files larger than this are refused before they are read.
MAX_METADATA_BYTES = 256 * 1024 * 1024
_FIX = (
    "It was refused and nothing in it ran. Convert it where you trust its author: load it with "
    "torch.distributed.checkpoint.load (or format_utils.dcp_to_torch_save) and save the tensors "
    "with `ckpt.save` or as safetensors."
)


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------
class _Shadow:
    """An inert stand-in for a DCP metadata class: holds whatever state the pickle sets."""

    kind = ""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:  # (dict state, slots state)
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __reduce__(self) -> Any:  # never re-pickled
        raise TypeError(f"{self.kind} stand-ins are read-only")


def _shadow(name: str) -> type:
    return type(name, (_Shadow,), {"kind": name})


class _DType(str):
    """A torch dtype, by its name."""


def _size(dims: Any = ()) -> tuple[int, ...]:
    dims = tuple(dims)
    if not all(type(d) is int for d in dims):
        raise FormatError("torch.Size holds a non-integer")
    return dims


def _path(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


def _layout(name: Any) -> str:
    return str(name)


def _enum_value(value: Any) -> Any:
    return value


_META = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    (_META, n): _shadow(n)
    for n in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex", "StorageMeta")
}
_ALLOWED[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _shadow("_StorageInfo")
_ALLOWED[("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties")] = _ALLOWED[(_META, "TensorProperties")]  # torch < 2.1
_ALLOWED[(_META, "_MEM_FORMAT_ENCODING")] = _enum_value
_ALLOWED[("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING")] = _enum_value
_ALLOWED[("torch", "Size")] = _size
_ALLOWED[("torch.serialization", "_get_layout")] = _layout
_ALLOWED[("collections", "OrderedDict")] = collections.OrderedDict
for _p in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
    _ALLOWED[("pathlib", _p)] = _path
for _d in DTYPE_ITEMSIZE:
    _ALLOWED[("torch", _d)] = _DType(_d)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f: Any, where: str) -> None:
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafeInputError(
                f"{self.where}: the pickle refers to {module}.{name}, which DCP metadata never needs; "
                f"loading it would need code execution. {_FIX}"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeInputError(f"{self.where}: the pickle uses persistent ids, which DCP metadata never needs. {_FIX}")


# --------------------------------------------------------------------------------------------
# Validated metadata
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DcpItem:
    """Where one stored item is: ``length`` bytes at ``offset`` of ``file``."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class DcpChunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    item: DcpItem


@dataclass(frozen=True)
class DcpTensor:
    info: TensorInfo
    chunks: tuple[DcpChunk, ...]


@dataclass(frozen=True)
class DcpMetadata:
    """The validated content of a ``.metadata`` file."""

    tensors: Mapping[str, DcpTensor]
    bytes_items: Mapping[str, DcpItem]
    version: Optional[str]

    @property
    def files(self) -> list[str]:
        items = [c.item for t in self.tensors.values() for c in t.chunks] + list(self.bytes_items.values())
        return sorted({i.file for i in items})


def _fields(obj: Any, kind: str, where: str) -> dict[str, Any]:
    if not isinstance(obj, _Shadow) or type(obj).kind != kind:
        raise FormatError(f"{where}: expected a {kind}, found {type(obj).__name__}")
    return obj.__dict__


def _int(v: Any, where: str) -> int:
    if type(v) is not int or v < 0 or v >= 2**62:
        raise FormatError(f"{where}: {v!r} is not an integer in [0, 2**62)")
    return v


def _dims(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or len(v) > MAX_NDIM:
        raise FormatError(f"{where}: {v!r} is not a list of at most {MAX_NDIM} dimensions")
    return tuple(_int(x, where) for x in v)


def _dtype(props: Any, where: str) -> str:
    f = _fields(props, "TensorProperties", where)
    dtype = f.get("dtype", f.get("_state", (None,))[0] if isinstance(f.get("_state"), tuple) else None)
    if not isinstance(dtype, _DType):
        raise FormatError(f"{where}: dtype {dtype!r} is not a torch dtype this reader knows ({sorted(DTYPE_ITEMSIZE)})")
    return str(dtype)


def _item(v: Any, where: str) -> DcpItem:
    f = _fields(v, "_StorageInfo", where)
    if f.get("transform_descriptors"):
        raise FormatError(f"{where}: written with DCP stream transforms {f['transform_descriptors']!r} (experimental); not supported")
    path = f.get("relative_path")
    if not isinstance(path, str) or not SAFE_FILE_NAME.match(path):
        raise FormatError(f"{where}: relative_path {path!r} is not a plain file name in the checkpoint directory")
    return DcpItem(path, _int(f.get("offset"), f"{where}.offset"), _int(f.get("length"), f"{where}.length"))


def _check_tiling(name: str, shape: tuple[int, ...], chunks: Sequence[DcpChunk], where: str) -> None:
    """The chunks lie inside the tensor and cover every element exactly once."""
    import numpy as np

    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            raise FormatError(f"{where}: tensor {name!r} chunk at {list(c.offsets)} has the wrong number of dimensions")
        if any(o + s > n for o, s, n in zip(c.offsets, c.sizes, shape)):
            raise FormatError(f"{where}: tensor {name!r} chunk {list(c.offsets)}+{list(c.sizes)} lies outside its shape {list(shape)}")
    total = sum(math.prod(c.sizes) for c in chunks)
    if total != math.prod(shape):
        raise FormatError(f"{where}: tensor {name!r} chunks hold {total} elements but its shape {list(shape)} has {math.prod(shape)}")
    live = [c for c in chunks if math.prod(c.sizes)]
    if len(live) < 2 or not shape:
        return
    lo = np.array([c.offsets for c in live], dtype=np.int64)
    hi = lo + np.array([c.sizes for c in live], dtype=np.int64)
    for i in range(len(live) - 1):  # row by row: memory linear in the chunk count
        hit = np.all((lo[i] < hi[i + 1 :]) & (lo[i + 1 :] < hi[i]), axis=1)
        if hit.any():
            j = i + 1 + int(np.argmax(hit))
            raise FormatError(f"{where}: tensor {name!r} chunks at {list(live[i].offsets)} and {list(live[j].offsets)} overlap")


def parse_metadata(raw: bytes, *, where: str) -> DcpMetadata:
    """Unpickle (restricted) and validate DCP ``.metadata`` bytes.

    Raises:
        UnsafeInputError: the pickle names anything but DCP's metadata classes.
        FormatError: it is malformed; the message names the field.
    """
    try:
        root = _RestrictedUnpickler(io.BytesIO(raw), where).load()
    except FormatError:
        raise
    except Exception as e:  # any malformed pickle: never trusted further
        raise FormatError(f"{where}: not a readable DCP metadata pickle: {type(e).__name__}: {e}") from e
    meta = _fields(root, "Metadata", where)
    sdm, storage = meta.get("state_dict_metadata"), meta.get("storage_data")
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise FormatError(f"{where}: state_dict_metadata and storage_data must be dicts")
    items: dict[tuple[str, Optional[tuple[int, ...]]], DcpItem] = {}
    for key, info in storage.items():
        k = _fields(key, "MetadataIndex", f"{where}: storage_data key")
        fqn, off = k.get("fqn"), k.get("offset")
        if not isinstance(fqn, str):
            raise FormatError(f"{where}: storage_data key has fqn {fqn!r}")
        items[(fqn, None if off is None else _dims(off, f"{where}: storage_data[{fqn!r}].offset"))] = _item(info, f"{where}: storage_data[{fqn!r}]")
    tensors, blobs = {}, {}
    for fqn, md in sdm.items():
        w = f"{where}: state_dict_metadata[{fqn!r}]"
        if not isinstance(fqn, str) or not fqn:
            raise FormatError(f"{w}: the key must be a non-empty string")
        if isinstance(md, _Shadow) and type(md).kind == "BytesStorageMetadata":
            if (fqn, None) not in items:
                raise FormatError(f"{w}: no storage_data entry for this item")
            blobs[fqn] = items[(fqn, None)]
            continue
        f = _fields(md, "TensorStorageMetadata", w)
        shape = _dims(f.get("size"), f"{w}.size")
        info = TensorInfo(fqn, _dtype(f.get("properties"), f"{w}.properties"), shape)
        chunks = []
        for i, c in enumerate(f.get("chunks") or []):
            cf = _fields(c, "ChunkStorageMetadata", f"{w}.chunks[{i}]")
            offsets, sizes = _dims(cf.get("offsets"), f"{w}.chunks[{i}].offsets"), _dims(cf.get("sizes"), f"{w}.chunks[{i}].sizes")
            item = items.get((fqn, offsets))
            if item is None:
                raise FormatError(f"{w}: chunk at offsets {list(offsets)} has no storage_data entry")
            chunks.append(DcpChunk(offsets, sizes, item))
        _check_tiling(fqn, shape, chunks, where)
        tensors[fqn] = DcpTensor(info, tuple(chunks))
    version = meta.get("version")
    return DcpMetadata(tensors, blobs, version if isinstance(version, str) else None)


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------
class DcpReader(Reader):
    """A DCP checkpoint directory (any number of ranks, DTensor shards assembled)."""

    format = "dcp"

    def __init__(self, loc: Location, meta: DcpMetadata, plain: dict[str, Any], warnings: list[str]) -> None:
        super().__init__(loc.url)
        self.dir = loc
        self.meta = meta
        self._plain = plain
        self._warnings = warnings

    @classmethod
    def open(cls, loc: Location) -> "DcpReader":
        """``loc``: the checkpoint directory (or its ``.metadata`` file)."""
        if loc.name == METADATA_NAME:
            loc = loc.parent()
        mloc = loc.join(METADATA_NAME)
        if not mloc.exists():
            raise FormatError(f"{loc.url}: no {METADATA_NAME} file: not a (committed) DCP checkpoint")
        meta = parse_metadata(mloc.read_bytes(max_bytes=MAX_METADATA_BYTES), where=mloc.url)
        present = set(loc.listdir())
        missing = [f for f in meta.files if f not in present]
        if missing:
            raise FormatError(f"{loc.url}: data file(s) {missing[:5]} named by {METADATA_NAME} are missing")
        plain, warnings = _load_plain(loc, meta)
        return cls(loc, meta, plain, warnings)

    def tensors(self) -> list[TensorInfo]:
        return [t.info for t in self.meta.tensors.values()]

    def read(self, name: str) -> Any:
        import torch

        from ckpt._tensors import torch_dtype

        t = self.meta.tensors[name]
        dtype = torch_dtype(t.info.dtype)
        if len(t.chunks) == 1 and t.chunks[0].sizes == t.info.shape:
            return self._chunk(name, t.chunks[0], dtype).contiguous()
        out = torch.empty(t.info.shape, dtype=dtype)
        for c in t.chunks:
            if math.prod(c.sizes):
                part = self._chunk(name, c, dtype)
                out[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))].copy_(part)
                del part
        return out

    def _chunk(self, name: str, c: DcpChunk, dtype: Any) -> Any:
        import torch

        from ckpt.formats.torchsave import safe_torch_load

        where = f"{self.dir.url}/{c.item.file} bytes [{c.item.offset}, {c.item.offset + c.item.length}) (tensor {name!r})"
        with self.dir.join(c.item.file).open_view(c.item.offset, c.item.length) as f:
            got = safe_torch_load(f, where=where)
        if not isinstance(got, torch.Tensor) or got.dtype != dtype or tuple(got.shape) != c.sizes:
            what = f"{got.dtype} {list(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
            raise FormatError(f"{where}: holds {what}, the metadata says {dtype} {list(c.sizes)} (dtype/shape conflict)")
        return got

    def plain_state(self) -> dict[str, Any]:
        return dict(self._plain)

    def warnings(self) -> list[str]:
        return list(self._warnings)

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.meta.version,
            "files": self.meta.files,
            "chunks": sum(len(t.chunks) for t in self.meta.tensors.values()),
            "byte_items": sorted(self.meta.bytes_items),
        }


def _load_plain(loc: Location, meta: DcpMetadata) -> tuple[dict[str, Any], list[str]]:
    from ckpt.formats._plain import NotJSON, to_json_value
    from ckpt.formats.torchsave import safe_torch_load

    def one(fqn: str) -> tuple[str, Any, Optional[str]]:
        item = meta.bytes_items[fqn]
        where = f"{loc.url}/{item.file} bytes [{item.offset}, {item.offset + item.length}) (item {fqn!r})"
        try:
            with loc.join(item.file).open_view(item.offset, item.length) as f:
                value = safe_torch_load(f, where=where)
            return fqn, to_json_value(value), None
        except UnsafeInputError as e:
            return fqn, None, f"non-tensor item {fqn!r} skipped: {e}"
        except NotJSON as e:
            return fqn, None, f"non-tensor item {fqn!r} skipped: it has no JSON form ({e})"

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckpt-dcp") as pool:
        results = list(pool.map(one, sorted(meta.bytes_items)))
    return {k: v for k, v, w in results if w is None}, [w for _, _, w in results if w]


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------
class DcpWriter(Writer):
    """Writes a DCP checkpoint that ``torch.distributed.checkpoint.load`` reads (see above)."""

    format = "dcp"
    DATA_FILE = "__0_0.distcp"

    def __init__(self, loc: Location) -> None:
        super().__init__(loc.url)
        self.dir = loc
        self._sink: Optional[DirSink] = None
        self._data: Optional[FileSink] = None
        self._items: dict[str, tuple[TensorInfo, int, int]] = {}
        self._blobs: dict[str, tuple[int, int]] = {}

    def begin(self, tensors: Sequence[TensorInfo]) -> None:
        super().begin(tensors)
        if not self.dir.local and self.dir.join(METADATA_NAME).exists():
            raise DestinationExistsError(f"{self.dir.url} already holds a DCP checkpoint; conversions never overwrite")
        self._sink = DirSink(self.dir)
        self._data = self._sink.file(self.DATA_FILE)

    def plan(self) -> dict[str, Any]:
        return {"files": [self.DATA_FILE, METADATA_NAME]}

    def _save(self, obj: Any) -> tuple[int, int]:
        import torch

        if self._data is None:
            raise FormatError(f"{self.url}: write() before begin()")
        start = self._data.written
        torch.save(obj, self._data.raw())
        return start, self._data.written - start

    def write(self, name: str, tensor: Any) -> None:
        from ckpt._tensors import host_contiguous

        info = self._expect(name, tensor)
        t = host_contiguous(tensor)
        if t.untyped_storage().nbytes() != t.nbytes or t.storage_offset():
            t = t.clone()  # a view would drag its whole storage into the file
        self._items[name] = (info, *self._save(t))

    def commit(self) -> str:
        self._check_complete()
        if self._sink is None or self._data is None:
            raise FormatError(f"{self.url}: commit() before begin()")
        for key, value in self._plain.items():
            self._blobs[key] = self._save(value)
        self._data.commit()
        meta = _build_metadata(self._items, self._blobs, self.DATA_FILE, self.url)
        f = self._sink.file(METADATA_NAME)  # last: DCP reads a checkpoint through it
        pickle.dump(meta, f.raw())
        f.commit()
        self._sink.commit()
        return self.url

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.abort()


def _build_metadata(items: Mapping[str, tuple[TensorInfo, int, int]], blobs: Mapping[str, tuple[int, int]], data_file: str, url: str) -> Any:
    import torch
    import torch.distributed.checkpoint.metadata as M
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from ckpt._tensors import torch_dtype

    sdm: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for name, (info, offset, length) in items.items():
        zeros = torch.Size([0] * len(info.shape))
        size = torch.Size(info.shape)
        sdm[name] = M.TensorStorageMetadata(
            properties=M.TensorProperties(dtype=torch_dtype(info.dtype)), size=size, chunks=[M.ChunkStorageMetadata(offsets=zeros, sizes=size)]
        )
        storage[M.MetadataIndex(name, zeros, 0)] = _StorageInfo(data_file, offset, length)
    for name, (offset, length) in blobs.items():
        sdm[name] = M.BytesStorageMetadata()
        storage[M.MetadataIndex(name)] = _StorageInfo(data_file, offset, length)
    return M.Metadata(
        state_dict_metadata=sdm,
        planner_data={name: (name,) for name in sdm},
        storage_data=storage,
        storage_meta=M.StorageMeta(checkpoint_id=url, save_id=str(uuid.uuid4())),
        version="1.0.0",
    )
