"""The reader/writer interface every checkpoint format implements, and the errors they raise.

Call order (the conversion driver in ``ckpt.convert`` follows it; so must any other caller):

* **Reader**: built by ``open_reader`` (which reads and validates the metadata; no tensor data
  is touched). ``tensors()`` and ``plain_state()`` come from metadata only; ``read(name)``
  returns one tensor and may be called from several threads at once; its memory is bounded by
  that tensor. ``check()`` reads everything once (``ckpt verify``). ``close()`` last.
* **Writer**: built by ``open_writer`` (no I/O). ``set_plain_state`` (optional) then
  ``begin(tensors)`` with every tensor that will be written, in write order; ``write(name,
  tensor)`` once per tensor **in that order**, from one thread; ``commit()`` makes the output
  visible atomically (temporary name + rename on local disk; on object stores the object or
  manifest that marks completion is written last). ``abort()`` may be called at any point
  (also after a failed ``commit``) and removes what was written; it never raises.

Tensor names are the dotted paths of the state (``model.layers.0.weight``); dtypes are the
format names of ``ckpt.metadata.DTYPE_ITEMSIZE``. Non-tensor ("plain") state is a flat
``{dotted path: JSON value}`` mapping.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from ckpt.errors import CheckpointError
from ckpt.metadata import DTYPE_ITEMSIZE

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "FORMATS",
    "TensorInfo",
    "Origin",
    "CheckReport",
    "Reader",
    "Writer",
    "FormatError",
    "UnsafeInputError",
    "UnknownFormatError",
    "DestinationExistsError",
]

#: Every format name, as ``--from``/``--to`` take them.
FORMATS = ("universal", "dcp", "torch", "safetensors", "hf")


class FormatError(CheckpointError, ValueError):
    """An input is malformed: a header that lies, a truncated file, a missing shard, a dtype or
    shape conflict. The message names the file (and field or byte range) and what is wrong."""


class UnsafeInputError(FormatError):
    """The input is a pickle that would need code execution to load; it was refused, and
    nothing in it ran. The message says how to convert it safely."""


class UnknownFormatError(FormatError):
    """The format of a path cannot be told; pass it explicitly (``--from``/``--to``)."""


class DestinationExistsError(CheckpointError, FileExistsError):
    """The destination already holds a checkpoint; conversions never overwrite one."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the metadata describes it.

    Attributes:
        name: dotted name (``model.layers.0.weight``).
        dtype: format dtype name (``float32``, ``bfloat16``...).
        shape: global shape.
        nbytes: ``prod(shape) * itemsize`` (computed).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_ITEMSIZE:
            raise FormatError(f"tensor {self.name!r}: unknown dtype {self.dtype!r}; known: {sorted(DTYPE_ITEMSIZE)}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "nbytes", math.prod(self.shape) * DTYPE_ITEMSIZE[self.dtype])

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "bytes": self.nbytes}


@dataclass(frozen=True)
class Origin:
    """What a universal source knows beyond tensors and plain values, so a universal -> universal
    conversion keeps it (other writers ignore it).

    Attributes:
        step: the source's training step, if it has one.
        trees: the source's per-rank state trees (tagged JSON, ``docs/format.md`` section 5).
        layout: the layout/rules record of the source manifest.
        extras: the source manifest's user extras.
    """

    step: Optional[int] = None
    trees: Optional[tuple[Any, ...]] = None
    layout: Optional[Mapping[str, Any]] = None
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckReport:
    """What ``Reader.check`` found.

    Attributes:
        format: the format checked.
        checksums: whether the format carries checksums (and they were verified).
        tensors: tensors read.
        bytes_checked: tensor bytes read.
        problems: one line per problem (empty when all is good).
    """

    format: str
    checksums: bool
    tensors: int
    bytes_checked: int
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


class Reader(ABC):
    """A checkpoint opened for reading (see the module docstring for the call order)."""

    #: Format name (one of ``FORMATS``).
    format: str = ""

    def __init__(self, url: str) -> None:
        self.url = url

    @abstractmethod
    def tensors(self) -> list[TensorInfo]:
        """Every tensor, from metadata only, in the source's order."""

    @abstractmethod
    def read(self, name: str) -> "torch.Tensor":
        """One tensor, on the CPU, with its dtype and shape. Thread-safe.

        Raises:
            KeyError: no tensor has that name.
            FormatError: the bytes are missing, truncated, or disagree with the metadata.
        """

    def plain_state(self) -> dict[str, Any]:
        """Non-tensor values by dotted path (JSON values). Empty by default."""
        return {}

    def origin(self) -> Origin:
        """What a universal writer can keep from this source (see ``Origin``)."""
        return Origin()

    def describe(self) -> dict[str, Any]:
        """Format-specific facts for ``ckpt inspect`` (files, shards, metadata...)."""
        return {}

    def warnings(self) -> list[str]:
        """Things the reader skipped or refused while opening (e.g. unsafe non-tensor items)."""
        return []

    def check(self, *, threads: int = 4) -> CheckReport:
        """Read every tensor once: the structure is sound and every byte is there.

        Formats without checksums cannot tell corrupted bytes from good ones; this checks
        structure and readability only (``CheckReport.checksums`` is False).
        """
        from concurrent.futures import ThreadPoolExecutor

        infos = self.tensors()

        def one(info: TensorInfo) -> tuple[int, Optional[str]]:
            try:
                t = self.read(info.name)
            except (CheckpointError, OSError, ValueError, RuntimeError, KeyError) as e:
                return 0, f"tensor {info.name!r}: {e}"
            if tuple(t.shape) != info.shape:
                return 0, f"tensor {info.name!r}: read shape {list(t.shape)}, metadata says {list(info.shape)}"
            return info.nbytes, None

        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ckpt-check") as pool:
            results = list(pool.map(one, infos))
        problems = tuple(p for _, p in results if p)
        return CheckReport(self.format, False, len(infos), sum(n for n, _ in results), problems)

    def close(self) -> None:
        """Release files and handles."""

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Writer(ABC):
    """A checkpoint being written (see the module docstring for the call order)."""

    format: str = ""

    def __init__(self, url: str) -> None:
        self.url = url
        self._plain: dict[str, Any] = {}
        self._origin = Origin()
        self._declared: list[TensorInfo] = []
        self._next = 0

    def set_plain_state(self, plain: Mapping[str, Any], *, origin: Optional[Origin] = None) -> None:
        """Non-tensor values to store (JSON values by dotted path); call before ``begin``."""
        self._plain = dict(plain)
        if origin is not None:
            self._origin = origin

    def begin(self, tensors: Sequence[TensorInfo]) -> None:
        """Declare every tensor, in the order ``write`` will receive them."""
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[:5]
            raise FormatError(f"{self.url}: tensor name(s) {dup} declared twice")
        clash = sorted(set(names) & set(self._plain))[:5]
        if clash:
            raise FormatError(f"{self.url}: name(s) {clash} are both a tensor and a plain value")
        self._declared = list(tensors)
        self._next = 0

    def _expect(self, name: str, tensor: "torch.Tensor") -> TensorInfo:
        """Check that ``name`` is the next declared tensor and ``tensor`` matches it."""
        from ckpt._tensors import dtype_name

        if self._next >= len(self._declared):
            raise FormatError(f"{self.url}: tensor {name!r} written but all {len(self._declared)} declared tensors are done")
        info = self._declared[self._next]
        if info.name != name:
            raise FormatError(f"{self.url}: tensor {name!r} written out of order; {info.name!r} was declared next")
        got = dtype_name(tensor.dtype, where=f"tensor {name!r}")
        if got != info.dtype or tuple(tensor.shape) != info.shape:
            raise FormatError(
                f"{self.url}: tensor {name!r} is {got} {list(tensor.shape)} but was declared "
                f"{info.dtype} {list(info.shape)} (dtype/shape conflict)"
            )
        self._next += 1
        return info

    def _check_complete(self) -> None:
        if self._next != len(self._declared):
            missing = [t.name for t in self._declared[self._next :]][:5]
            raise FormatError(
                f"{self.url}: {len(self._declared) - self._next} declared tensor(s) were never written "
                f"(first: {missing}); nothing was committed"
            )

    @abstractmethod
    def write(self, name: str, tensor: "torch.Tensor") -> None:
        """Write one tensor (the next declared one)."""

    @abstractmethod
    def commit(self) -> str:
        """Make the output visible atomically; returns where it is."""

    @abstractmethod
    def abort(self) -> None:
        """Remove everything written so far; never raises."""

    def plan(self) -> dict[str, Any]:
        """What ``commit`` would produce (files, shards...), for dry runs; after ``begin``."""
        return {}
