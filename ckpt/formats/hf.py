"""Hugging Face sharded safetensors: ``*.safetensors`` shards plus ``model.safetensors.index.json``.

The index is ``{"metadata": {...}, "weight_map": {tensor name: shard file name}}``. Reading
checks it strictly: shard names are plain file names in the same directory, every shard the
index names exists, every tensor is in the shard the index says and in no other, and no shard
holds a tensor the index does not list. A directory with a single ``model.safetensors`` and no
index is read as one shard.

Writing cuts the declared tensors, in order, into shards of at most ``max_shard_size`` bytes
(a larger tensor gets a shard of its own), named ``model-00001-of-00003.safetensors``, each
streamed like a single safetensors file. The index is written last: locally the whole directory
appears at once (temporary sibling renamed into place); on object stores a directory without
its index is incomplete by definition.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from ckpt.formats._base import DestinationExistsError, FormatError, Reader, TensorInfo, Writer
from ckpt.formats._io import SAFE_FILE_NAME, DirSink, Location
from ckpt.formats.safetensors import (
    Entry,
    FileTensorSink,
    Header,
    plain_from_metadata,
    read_entry,
    read_header,
)

__all__ = ["HfReader", "HfWriter", "INDEX_NAME", "find_index", "parse_size"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_INDEX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SHARD = 5 * 10**9
PLAIN_KEY = "ckpt.plain"


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000000"`` -> bytes."""
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            s, factor = s[: -len(unit)], mult
            break
    else:
        factor = 1
    try:
        value = int(float(s) * factor)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number with an optional unit (e.g. 5GB, 500MiB)") from None
    if value < 1:
        raise ValueError(f"size {text!r} must be positive")
    return value


def find_index(dir_loc: Location) -> Optional[str]:
    """The index file name in a directory: ``model.safetensors.index.json`` or the one
    ``*.safetensors.index.json``; None if there is none."""
    names = [n for n in dir_loc.listdir() if n.endswith(".index.json")]
    if INDEX_NAME in names:
        return INDEX_NAME
    if len(names) == 1:
        return names[0]
    if len(names) > 1:
        raise FormatError(f"{dir_loc.url}: several index files {names}; name the one to read")
    return None


class HfReader(Reader):
    """A directory of safetensors shards with (or, for one shard, without) an index."""

    format = "hf"

    def __init__(self, dir_loc: Location, index_name: Optional[str], shards: dict[str, Header], owner: dict[str, str], metadata: dict[str, Any]) -> None:
        super().__init__(dir_loc.url)
        self.dir = dir_loc
        self.index_name = index_name
        self.shards = shards
        self._owner = owner
        self._entries: dict[str, Entry] = {e.info.name: e for h in shards.values() for e in h.entries}
        self._order = [e.info.name for name in shards for e in shards[name].entries]
        self.metadata = metadata

    @classmethod
    def open(cls, loc: Location) -> "HfReader":
        """``loc``: the directory, or its index file."""
        if loc.name.endswith(".index.json"):
            dir_loc, index_name = loc.parent(), loc.name
        else:
            dir_loc, index_name = loc, find_index(loc)
        if index_name is None:
            if SINGLE_NAME in dir_loc.listdir():
                header = read_header(dir_loc.join(SINGLE_NAME))
                owner = {e.info.name: SINGLE_NAME for e in header.entries}
                return cls(dir_loc, None, {SINGLE_NAME: header}, owner, {})
            raise FormatError(f"{dir_loc.url}: no {INDEX_NAME} (nor a single {SINGLE_NAME}) in this directory")
        where = f"{dir_loc.url}/{index_name}"
        weight_map, metadata = _parse_index(dir_loc.join(index_name).read_bytes(max_bytes=MAX_INDEX_BYTES), where)
        files = sorted(set(weight_map.values()))
        present = set(dir_loc.listdir())
        missing = [f for f in files if f not in present]
        if missing:
            f = missing[0]
            held = sorted(n for n, s in weight_map.items() if s == f)
            raise FormatError(
                f"{where}: shard {f!r} is missing from {dir_loc.url} (the index puts {len(held)} tensor(s) in it, "
                f"e.g. {held[:3]}); {len(missing)} of {len(files)} shard(s) missing: {missing[:5]}"
            )
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(files))), thread_name_prefix="ckpt-hf") as pool:
            headers = dict(zip(files, pool.map(lambda f: read_header(dir_loc.join(f)), files)))
        _check_owners(weight_map, headers, where)
        return cls(dir_loc, index_name, headers, dict(weight_map), metadata)

    def tensors(self) -> list[TensorInfo]:
        return [self._entries[n].info for n in self._order]

    def read(self, name: str) -> Any:
        return read_entry(self.dir.join(self._owner[name]), self._entries[name])

    def plain_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for header in self.shards.values():
            out.update(plain_from_metadata(header.metadata, self.url))
        plain = self.metadata.get(PLAIN_KEY)
        if isinstance(plain, dict):
            out.update(plain)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index_name,
            "shards": {name: {"tensors": len(h.entries), "file_bytes": h.file_size} for name, h in self.shards.items()},
            "index_metadata": {k: v for k, v in self.metadata.items() if k != PLAIN_KEY},
        }


def _parse_index(raw: bytes, where: str) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{where}: not a valid UTF-8 JSON index: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise FormatError(f"{where}: an index must be a JSON object with a 'weight_map' object")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{where}: 'metadata' must be an object")
    weight_map = doc["weight_map"]
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not SAFE_FILE_NAME.match(shard) or not shard.endswith(".safetensors"):
            raise FormatError(f"{where}: weight_map[{name!r}] = {shard!r} is not a plain '*.safetensors' file name in the same directory")
    return dict(weight_map), dict(metadata)


def _check_owners(weight_map: dict[str, str], headers: dict[str, Header], where: str) -> None:
    seen: dict[str, str] = {}
    for shard, header in headers.items():
        for e in header.entries:
            name = e.info.name
            if name in seen:
                raise FormatError(f"{where}: tensor {name!r} is in both {seen[name]!r} and {shard!r}")
            seen[name] = shard
            if weight_map.get(name) != shard:
                what = "does not list it" if name not in weight_map else f"puts it in {weight_map[name]!r}"
                raise FormatError(f"{where}: shard {shard!r} holds tensor {name!r} but the index {what}")
    lost = sorted(set(weight_map) - set(seen))
    if lost:
        raise FormatError(f"{where}: {len(lost)} tensor(s) in the index are in no shard, e.g. {lost[:3]} (expected in {weight_map[lost[0]]!r})")


def plan_shards(infos: Sequence[TensorInfo], max_shard_size: int) -> list[list[TensorInfo]]:
    """Greedy, order-keeping: a new shard when the next tensor would overflow the current one."""
    shards: list[list[TensorInfo]] = []
    size = 0
    for info in infos:
        if not shards or (size + info.nbytes > max_shard_size and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards or [[]]


class HfWriter(Writer):
    """Writes a sharded HF directory (see the module docstring)."""

    format = "hf"

    def __init__(self, loc: Location, *, max_shard_size: int = DEFAULT_MAX_SHARD) -> None:
        super().__init__(loc.url)
        self.dir = loc.parent() if loc.name.endswith(".index.json") else loc
        self.max_shard_size = max_shard_size
        self._sink: Optional[DirSink] = None
        self._shards: list[list[TensorInfo]] = []
        self._names: list[str] = []
        self._cur: Optional[FileTensorSink] = None
        self._cur_index = -1
        self._left = 0

    def begin(self, tensors: Sequence[TensorInfo]) -> None:
        super().begin(tensors)
        self._shards = plan_shards(tensors, self.max_shard_size)
        n = len(self._shards)
        self._names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        if not self.dir.local and self.dir.join(INDEX_NAME).exists():
            raise DestinationExistsError(f"{self.dir.url} already holds {INDEX_NAME}; conversions never overwrite")
        self._sink = DirSink(self.dir)
        self._open_next()

    def _open_next(self) -> None:
        if self._cur is not None:
            self._cur.sink.commit()
        self._cur_index += 1
        if self._cur_index >= len(self._shards):
            self._cur = None
            return
        infos = self._shards[self._cur_index]
        name = self._names[self._cur_index]
        if self._sink is None:
            raise FormatError(f"{self.url}: write() before begin()")
        self._cur = FileTensorSink(self._sink.file(name), infos, {"format": "pt"}, f"{self.dir.url}/{name}")
        self._left = len(infos)
        if not infos:
            self._open_next()

    def plan(self) -> dict[str, Any]:
        shards = plan_shards(self._declared, self.max_shard_size)
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        return {"files": names + [INDEX_NAME], "shard_bytes": [sum(i.nbytes for i in s) for s in shards]}

    def write(self, name: str, tensor: Any) -> None:
        self._expect(name, tensor)
        if self._cur is None:
            raise FormatError(f"{self.url}: write() before begin()")
        self._cur.write(tensor)
        self._left -= 1
        if self._left == 0:
            self._open_next()

    def commit(self) -> str:
        self._check_complete()
        if self._sink is None:
            raise FormatError(f"{self.url}: commit() before begin()")
        weight_map = {i.name: self._names[k] for k, shard in enumerate(self._shards) for i in shard}
        metadata: dict[str, Any] = {"total_size": sum(i.nbytes for i in self._declared)}
        if self._plain:
            metadata[PLAIN_KEY] = dict(self._plain)
        index = json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, sort_keys=True).encode("utf-8")
        f = self._sink.file(INDEX_NAME)  # last: its presence marks the directory complete
        f.write(index)
        f.commit()
        self._sink.commit()
        return f"{self.dir.url}/{INDEX_NAME}"

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.abort()

