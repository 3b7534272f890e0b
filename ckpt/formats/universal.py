"""ckpt's own format (``docs/format.md``) as a conversion source and destination.

Reading: the manifest is validated as for ``ckpt.load``; ``read(name)`` fills one new tensor
through the same planner and reader (``ckpt._read.read_into``), verifying every chunk's
checksum, so memory is that tensor plus per-chunk read buffers.

Writing streams: each tensor is cut into chunks of at most ``CHUNK_BYTES`` (split dimension
outermost when a layout cuts it), encoded and checksummed exactly as ``ckpt.save`` does
(``ckpt._save.encode_chunk``: crc32c per chunk and per 256 KiB block; byteshuffle + zstd on
object stores by default), and put under a fresh save prefix as it arrives: chunks of
``PACK_MIN`` bytes or more become objects of their own (written in parallel, from the tensor's
memory), smaller ones are copied into a pack object flushed at ``PACK_BYTES``. ``commit``
writes the manifest last, in one atomic put. A step already committed at the destination is
never superseded silently: ``begin`` refuses it.
"""

from __future__ import annotations

import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional, Sequence

from ckpt.formats._base import CheckReport, DestinationExistsError, FormatError, Origin, Reader, TensorInfo, Writer
from ckpt.formats._plain import flat_tree, plain_from_tree
from ckpt.metadata import ChunkMeta, Manifest, SaveRef, TensorMeta, new_save_id, parse_manifest
from ckpt.regions import Box, split_box
from ckpt.store import Store, open_store

__all__ = ["UniversalReader", "UniversalWriter", "CHUNK_BYTES", "RegionPlanner"]

CHUNK_BYTES = 32 * 1024 * 1024
PACK_MIN = 4 * 1024 * 1024
PACK_BYTES = 16 * 1024 * 1024
#: zstd level of compressed chunks (as ``ckpt.save``'s default).
ZSTD_LEVEL = 3

#: ``(name, shape) -> [(region, storage order or None), ...]`` tiling the tensor.
RegionPlanner = Callable[[str, tuple[int, ...]], Sequence[tuple[Box, Optional[tuple[int, ...]]]]]


class UniversalReader(Reader):
    """One committed save (the latest step by default) of a ckpt checkpoint root."""

    format = "universal"

    def __init__(self, store: Store, manifest: Manifest, *, threads: int = 2) -> None:
        super().__init__(store.url)
        self.store = store
        self.manifest = manifest
        self.threads = threads

    @classmethod
    def open(cls, url: Any, *, storage_options: Optional[dict[str, Any]] = None, step: Optional[int] = None) -> "UniversalReader":
        from ckpt._api import open_manifest

        store, manifest = open_manifest(url, step=step, storage_options=storage_options)
        return cls(store, manifest)

    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in self.manifest.tensors.items()]

    def read(self, name: str) -> Any:
        import torch

        from ckpt._read import read_into
        from ckpt._tensors import torch_dtype
        from ckpt.mapping import TensorMapping

        meta = self.manifest.tensors[name]
        t = torch.empty(tuple(meta.shape), dtype=torch_dtype(meta.dtype))
        read_into(self.store, self.manifest, {name: (t, TensorMapping.identity(name, tuple(meta.shape)))}, verify=True, threads=self.threads)
        return t

    def plain_state(self) -> dict[str, Any]:
        return plain_from_tree(self.manifest.ranks[0]) if self.manifest.ranks else {}

    def origin(self) -> Origin:
        m = self.manifest
        return Origin(step=m.step, trees=tuple(m.ranks), layout=m.layout, extras=dict(m.extras))

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {"step": m.step, "save_id": m.save_id, "world_size": m.world_size, "stored_bytes": m.stored_bytes, "layout": m.layout}

    def check(self, *, threads: int = 4) -> CheckReport:
        from ckpt._verify import verify

        report = verify(self.store, self.manifest, threads=threads)
        problems = tuple(f.describe() for f in report.failures)
        return CheckReport(self.format, True, len(self.manifest.tensors), report.bytes_checked, problems)


class UniversalWriter(Writer):
    """Writes one save under a checkpoint root (see the module docstring).

    Args:
        url: the checkpoint root (path or fsspec URL) or a ``Store``.
        storage_options: fsspec options.
        step: the step to write (default: the source's step, else 0).
        compression: ``"auto"`` (zstd on object stores), ``"zstd"`` or None.
        regions: where to cut each tensor (``RegionPlanner``); default one region per tensor.
        layout_record: the manifest's ``layout`` field (default: the source's).
        world_size: ranks the manifest declares (state trees are repeated to match).
        io_threads: parallel puts.
    """

    format = "universal"

    def __init__(
        self,
        url: Any,
        *,
        storage_options: Optional[dict[str, Any]] = None,
        step: Optional[int] = None,
        compression: Any = "auto",
        regions: Optional[RegionPlanner] = None,
        layout_record: Optional[Mapping[str, Any]] = None,
        world_size: Optional[int] = None,
        io_threads: int = 4,
    ) -> None:
        self.store = open_store(url, storage_options=storage_options)
        super().__init__(self.store.url)
        self.step = step
        self.compression = compression
        self.regions = regions
        self.layout_record = layout_record
        self.world_size = world_size
        self.io_threads = io_threads
        self._ref: Optional[SaveRef] = None
        self._chunks: dict[str, list[ChunkMeta]] = {}
        self._pack = bytearray()
        self._pack_records: list[tuple[str, dict]] = []
        self._objects = 0
        self._pool: Optional[ThreadPoolExecutor] = None
        self._created = 0

    # -- setup ------------------------------------------------------------------------------
    def begin(self, tensors: Sequence[TensorInfo]) -> None:
        from ckpt import _commit
        from ckpt._save import resolve_compression

        super().begin(tensors)
        step = self.step if self.step is not None else (self._origin.step or 0)
        if step in _commit.latest_saves(_commit.list_saves(self.store)):
            raise DestinationExistsError(
                f"{self.store.url}: step {step} is already committed there; conversions never supersede a "
                "committed step (pass another step, e.g. --step)"
            )
        self._codec = resolve_compression(self.store, self.compression)
        self._created = time.time_ns()
        self._ref = SaveRef(step, new_save_id(self._created, secrets.randbits(32)))
        self._chunks = {t.name: [] for t in tensors}
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.io_threads), thread_name_prefix="ckpt-convert-put")

    def plan(self) -> dict[str, Any]:
        step = self.step if self.step is not None else (self._origin.step or 0)
        chunks = 0
        for t in self._declared:
            regions = self.regions(t.name, t.shape) if self.regions else [(Box.whole(t.shape), None)]
            chunks += sum(len(split_box(r, max_numel=max(1, CHUNK_BYTES // _itemsize(t)), order=o)) for r, o in regions)
        return {"step": step, "chunks": chunks, "compression": self.compression}

    # -- data -------------------------------------------------------------------------------
    def write(self, name: str, tensor: Any) -> None:
        from ckpt._tensors import byte_view, host_contiguous

        info = self._expect(name, tensor)
        if self._ref is None or self._pool is None:
            raise FormatError(f"{self.url}: write() before begin()")
        t = host_contiguous(tensor)
        itemsize = _itemsize(info)
        regions = self.regions(name, info.shape) if self.regions else [(Box.whole(info.shape), None)]
        for region, order in regions:
            futures: list[Future] = []
            src = t[tuple(slice(o, o + s) for o, s in zip(region.offsets, region.sizes))] if region.ndim else t
            if order is not None:
                src = src.permute(order)
            data = host_contiguous(src)
            flat = byte_view(data)
            outer = order[0] if order else 0
            per_slice = (region.numel // region.sizes[outer]) * itemsize if region.ndim and region.sizes[outer] else 0
            for box in split_box(region, max_numel=max(1, CHUNK_BYTES // itemsize), order=order):
                if box.ndim == 0 or per_slice == 0:
                    view = flat
                else:
                    first = (box.offsets[outer] - region.offsets[outer]) * per_slice
                    view = flat[first : first + box.sizes[outer] * per_slice]
                fut = self._chunk(name, box, order, itemsize, view)
                if fut is not None:
                    futures.append(fut)
            for fut in futures:  # the views point into this region's data: done before the next
                self._record(*fut.result())

    def _chunk(self, name: str, box: Box, order: Optional[tuple[int, ...]], itemsize: int, view: Any) -> Optional[Future]:
        from ckpt._save import encode_chunk

        level = ZSTD_LEVEL
        if view.nbytes >= PACK_MIN:
            obj = self._new_object()

            def put() -> tuple[str, dict]:
                encoded, fields = encode_chunk(view, itemsize, self._codec, level, "crc32c")
                self.store.put(self._ref.data_prefix + obj, [encoded])  # type: ignore[union-attr]
                return name, _record(box, order, obj, 0, memoryview(encoded).nbytes, fields)

            return self._pool.submit(put)  # type: ignore[union-attr]
        encoded, fields = encode_chunk(view, itemsize, self._codec, level, "crc32c")
        length = memoryview(encoded).nbytes
        self._pack_records.append((name, _record(box, order, "", len(self._pack), length, fields)))
        self._pack += memoryview(encoded).cast("B")
        if len(self._pack) >= PACK_BYTES:
            self._flush_pack()
        return None

    def _new_object(self) -> str:
        self._objects += 1
        return f"c-{self._objects:06d}.bin"

    def _flush_pack(self) -> None:
        if not self._pack_records:
            return
        obj = self._new_object()
        self.store.put(self._ref.data_prefix + obj, [self._pack])  # type: ignore[union-attr]
        for name, rec in self._pack_records:
            rec["object"] = obj
            self._record(name, rec)
        self._pack = bytearray()
        self._pack_records = []

    def _record(self, name: str, rec: dict) -> None:
        from ckpt._save import _chunk_from_json

        self._chunks[name].append(_chunk_from_json(rec))

    # -- commit -----------------------------------------------------------------------------
    def commit(self) -> str:
        import torch

        from ckpt import __version__

        self._check_complete()
        if self._ref is None:
            raise FormatError(f"{self.url}: commit() before begin()")
        self._flush_pack()
        self._shutdown()
        names = [t.name for t in self._declared]
        trees = self._trees(names)
        manifest = Manifest(
            step=self._ref.step,
            save_id=self._ref.save_id,
            created_unix_ns=self._created,
            world_size=len(trees),
            tensors={t.name: TensorMeta(dtype=t.dtype, shape=t.shape, chunks=tuple(self._chunks[t.name])) for t in self._declared},
            ranks=tuple(trees),
            writer={"library": "ckpt", "version": __version__, "torch": torch.__version__, "tool": "ckpt convert"},
            layout=self.layout_record if self.layout_record is not None else self._origin.layout,
            extras=dict(self._origin.extras),
        )
        data = manifest.to_bytes()
        parse_manifest(data, source=f"{self.url}/{self._ref.manifest_key} (about to be written)")
        self.store.put(self._ref.manifest_key, data)  # the commit
        return f"{self.url} step {self._ref.step} (save {self._ref.save_id})"

    def _trees(self, names: list[str]) -> list[Any]:
        trees = list(self._origin.trees or [])
        if not trees or not _refs_ok(trees, set(names)):
            trees = [flat_tree(names, self._plain)]
        if self.world_size is not None and len(trees) != self.world_size:
            trees = [trees[0]] * self.world_size
        return trees

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def abort(self) -> None:
        from ckpt import _commit

        self._shutdown()
        if self._ref is not None:
            _commit.delete_save_data(self.store, self._ref)


def _itemsize(info: TensorInfo) -> int:
    from ckpt.metadata import DTYPE_ITEMSIZE

    return DTYPE_ITEMSIZE[info.dtype]


def _record(box: Box, order: Optional[tuple[int, ...]], obj: str, offset: int, length: int, fields: dict) -> dict:
    rec = {"offsets": list(box.offsets), "sizes": list(box.sizes), "object": obj, "byte_offset": offset, "byte_length": length, **fields}
    if order is not None:
        rec["order"] = list(order)
    return rec


def _refs_ok(trees: list[Any], names: set[str]) -> bool:
    from ckpt.metadata import validate_state_tree

    try:
        for tree in trees:
            validate_state_tree(tree, names)
    except ValueError:  # ManifestError
        return False
    return True
