"""safetensors files: a strict streaming parser and writer (no ``safetensors`` package needed).

Layout: 8 bytes little-endian header length ``N``; ``N`` bytes of UTF-8 JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the byte after
the header) plus an optional ``"__metadata__"`` object of strings; then the data.

The header is untrusted: its size is capped (100 MiB) before it is read; it must be one JSON
object without duplicate keys; every dtype must be known; ``end - begin`` must equal the
shape's element count times the element size; the tensors' byte ranges must tile the data
section exactly (no overlap, no hole) and the data must end where the file ends (a shorter file
is reported as truncated). Reads are ranged: ``read(name)`` fetches that tensor's bytes only,
straight into the new tensor's memory.

Non-tensor state is stored as JSON text under the ``ckpt.plain`` metadata key; other metadata
strings read back as plain values of their own name.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from ckpt.formats._base import CheckReport, FormatError, Reader, TensorInfo, Writer
from ckpt.formats._io import FileSink, Location
from ckpt.metadata import MAX_NDIM

__all__ = ["SafetensorsReader", "SafetensorsWriter", "Header", "Entry", "read_header", "parse_header", "header_bytes", "ST_DTYPES"]

#: safetensors dtype code -> format dtype name.
ST_DTYPES: Mapping[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}
_CODES = {v: k for k, v in ST_DTYPES.items()}
#: Headers larger than this are refused before they are read (the safetensors library's cap).
MAX_HEADER_BYTES = 100 * 1024 * 1024
PLAIN_KEY = "ckpt.plain"


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file; ``start``/``end`` are absolute file offsets."""

    info: TensorInfo
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated header: entries in file order, metadata strings, data section bounds."""

    entries: tuple[Entry, ...]
    metadata: Mapping[str, str]
    data_start: int
    file_size: int


def _no_dups(pairs: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_header(raw: bytes, *, file_size: int, where: str) -> Header:
    """Validate header JSON ``raw`` of a file of ``file_size`` bytes (see the module docstring).

    Raises:
        FormatError: naming ``where``, the tensor and what is wrong.
    """
    data_start = 8 + len(raw)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_dups)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{where}: the safetensors header is not valid UTF-8 JSON: {e}") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: the safetensors header must be a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{where}: __metadata__ must be an object of strings")
    entries = []
    for name, spec in doc.items():
        entries.append(_entry(name, spec, data_start, where))
    data_len = file_size - data_start
    pos = 0
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        begin, end = e.start - data_start, e.end - data_start
        if begin < pos:
            raise FormatError(f"{where}: tensor {e.info.name!r} bytes [{begin}, {end}) overlap the previous tensor (which ends at {pos})")
        if begin > pos:
            raise FormatError(f"{where}: bytes [{pos}, {begin}) of the data section belong to no tensor (before {e.info.name!r}); the header is inconsistent")
        pos = end
    if pos > data_len:
        raise FormatError(f"{where}: truncated: the header says the data section is {pos} bytes but the file holds only {max(0, data_len)} after the header")
    if pos < data_len:
        raise FormatError(f"{where}: {data_len - pos} bytes after the last tensor belong to no tensor; the header is inconsistent")
    return Header(tuple(sorted(entries, key=lambda e: e.start)), dict(meta), data_start, file_size)


def _entry(name: str, spec: Any, data_start: int, where: str) -> Entry:
    if not name or len(name) > 4096:
        raise FormatError(f"{where}: tensor name {name[:64]!r} must be 1..4096 characters")
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{where}: tensor {name!r} must be an object with exactly dtype, shape and data_offsets")
    code = spec["dtype"]
    if code not in ST_DTYPES:
        raise FormatError(f"{where}: tensor {name!r} has unknown dtype {code!r}; known: {sorted(ST_DTYPES)}")
    shape, offs = spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(type(s) is int and 0 <= s < 2**62 for s in shape):
        raise FormatError(f"{where}: tensor {name!r} shape {shape!r} must be a list of at most {MAX_NDIM} integers >= 0")
    if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int and 0 <= o < 2**62 for o in offs) or offs[0] > offs[1]:
        raise FormatError(f"{where}: tensor {name!r} data_offsets {offs!r} must be [begin, end] with 0 <= begin <= end")
    info = TensorInfo(name, ST_DTYPES[code], tuple(shape))
    if offs[1] - offs[0] != info.nbytes:
        raise FormatError(
            f"{where}: tensor {name!r}: dtype {code} and shape {shape} need {info.nbytes} bytes but data_offsets "
            f"{offs} span {offs[1] - offs[0]} (dtype/shape conflict)"
        )
    return Entry(info, data_start + offs[0], data_start + offs[1])


def read_header(loc: Location) -> Header:
    """Read and validate the header of the safetensors file at ``loc`` (two ranged reads)."""
    size = loc.size()
    if size < 8:
        raise FormatError(f"{loc.url}: truncated: {size} bytes, too short for a safetensors header length")
    (n,) = struct.unpack("<Q", loc.read_range(0, 8))
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{loc.url}: safetensors header length {n} is over the cap of {MAX_HEADER_BYTES}; not a safetensors file or corrupt")
    if 8 + n > size:
        raise FormatError(f"{loc.url}: truncated: the header is {n} bytes but the file has only {size - 8} after the length")
    raw = loc.read_range(8, n)
    if not raw.lstrip().startswith(b"{"):
        raise FormatError(f"{loc.url}: not a safetensors file (the header does not start with '{{')")
    return parse_header(raw, file_size=size, where=loc.url)


def plain_from_metadata(meta: Mapping[str, str], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in meta.items() if k not in (PLAIN_KEY, "format")}
    if PLAIN_KEY in meta:
        try:
            plain = json.loads(meta[PLAIN_KEY])
        except ValueError as e:
            raise FormatError(f"{where}: metadata {PLAIN_KEY!r} is not JSON: {e}") from e
        if not isinstance(plain, dict):
            raise FormatError(f"{where}: metadata {PLAIN_KEY!r} must be a JSON object")
        out.update(plain)
    return out


def metadata_from_plain(plain: Mapping[str, Any]) -> dict[str, str]:
    meta = {"format": "pt"}
    if plain:
        meta[PLAIN_KEY] = json.dumps(dict(plain), sort_keys=True)
    return meta


def _code(info: TensorInfo, where: str) -> str:
    code = _CODES.get(info.dtype)
    if code is None:
        raise FormatError(
            f"{where}: tensor {info.name!r} has dtype {info.dtype}, which safetensors cannot store "
            f"(it stores {sorted(_CODES)}); convert with --dtype or use another format"
        )
    return code


def header_bytes(infos: Sequence[TensorInfo], metadata: Mapping[str, str], where: str) -> bytes:
    """The 8-byte length plus header (space-padded to a multiple of 8) for ``infos`` in order."""
    doc: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for info in infos:
        doc[info.name] = {"dtype": _code(info, where), "shape": list(info.shape), "data_offsets": [pos, pos + info.nbytes]}
        pos += info.nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise FormatError(f"{where}: the header would be {len(raw)} bytes, over the cap of {MAX_HEADER_BYTES}")
    return struct.pack("<Q", len(raw)) + raw


def _check_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover
        raise FormatError("safetensors data is little-endian; this machine is big-endian")


def read_entry(loc: Location, entry: Entry) -> Any:
    """The tensor of ``entry``, read with one ranged read straight into its memory."""
    import torch

    from ckpt._tensors import byte_view, torch_dtype

    _check_endian()
    t = torch.empty(entry.info.shape, dtype=torch_dtype(entry.info.dtype))
    if entry.info.nbytes:
        loc.read_into(entry.start, memoryview(byte_view(t)))
    return t


class SafetensorsReader(Reader):
    """One ``.safetensors`` file."""

    format = "safetensors"

    def __init__(self, loc: Location, header: Header) -> None:
        super().__init__(loc.url)
        self.loc = loc
        self.header = header
        self._by_name = {e.info.name: e for e in header.entries}

    @classmethod
    def open(cls, loc: Location) -> "SafetensorsReader":
        return cls(loc, read_header(loc))

    def tensors(self) -> list[TensorInfo]:
        return [e.info for e in self.header.entries]

    def read(self, name: str) -> Any:
        return read_entry(self.loc, self._by_name[name])

    def plain_state(self) -> dict[str, Any]:
        return plain_from_metadata(self.header.metadata, self.url)

    def describe(self) -> dict[str, Any]:
        return {"file_bytes": self.header.file_size, "header_bytes": self.header.data_start - 8, "metadata": dict(self.header.metadata)}

    def check(self, *, threads: int = 4) -> CheckReport:
        report = super().check(threads=threads)
        return CheckReport(self.format, False, report.tensors, report.bytes_checked, report.problems)


class FileTensorSink:
    """Streams declared tensors into one safetensors file (header first, then data in order)."""

    def __init__(self, sink: FileSink, infos: Sequence[TensorInfo], metadata: Mapping[str, str], where: str) -> None:
        self.sink = sink
        self.infos = list(infos)
        sink.write(header_bytes(self.infos, metadata, where))

    def write(self, tensor: Any) -> None:
        from ckpt._tensors import byte_view, host_contiguous

        _check_endian()
        t = host_contiguous(tensor)
        if t.numel():
            self.sink.write(memoryview(byte_view(t)))


class SafetensorsWriter(Writer):
    """Writes one ``.safetensors`` file: header at ``begin``, each tensor's bytes as it comes."""

    format = "safetensors"

    def __init__(self, loc: Location) -> None:
        super().__init__(loc.url)
        self.loc = loc
        self._sink: Optional[FileSink] = None
        self._file: Optional[FileTensorSink] = None

    def begin(self, tensors: Sequence[TensorInfo]) -> None:
        super().begin(tensors)
        for info in tensors:
            _code(info, self.url)
        from ckpt.formats._base import DestinationExistsError

        if self.loc.exists():
            raise DestinationExistsError(f"{self.url} already exists; conversions never overwrite (remove it or pick another name)")
        self._sink = FileSink(self.loc)
        self._file = FileTensorSink(self._sink, tensors, metadata_from_plain(self._plain), self.url)

    def plan(self) -> dict[str, Any]:
        size = len(header_bytes(self._declared, metadata_from_plain(self._plain), self.url)) + sum(t.nbytes for t in self._declared)
        return {"files": [self.loc.name], "bytes": size}

    def write(self, name: str, tensor: Any) -> None:
        self._expect(name, tensor)
        if self._file is None:
            raise FormatError(f"{self.url}: write() before begin()")
        self._file.write(tensor)

    def commit(self) -> str:
        self._check_complete()
        if self._sink is None:
            raise FormatError(f"{self.url}: commit() before begin()")
        self._sink.commit()
        return self.url

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.abort()

