"""``torch.save`` files (``.pt``, ``.pth``, ``.bin``): read in safe mode only.

Reading uses ``torch.load(weights_only=True)`` and nothing else: torch's restricted unpickler
allows tensors, containers and plain values, and refuses any other global, so a file whose
pickle would import or call anything is refused (``UnsafeInputError``) without running it.
Local files are memory-mapped (``mmap=True``): tensors are paged in as they are read, not all at
once. (Files from object stores are read whole; the mapped pages of a local file count in the
process's resident set as they are touched, and the page cache can reclaim them.)

Writing is ``torch.save`` of a flat ``{name: tensor}`` dict plus the plain values, published
atomically. The format has no streaming form: **the writer holds the whole state in memory
until ``commit``**. Use ``safetensors``/``hf``/``dcp``/``universal`` outputs for bounded memory.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Optional, Sequence

from ckpt.formats._base import DestinationExistsError, FormatError, Reader, TensorInfo, UnsafeInputError, Writer
from ckpt.formats._io import FileSink, Location
from ckpt.formats._plain import split_state

__all__ = ["TorchReader", "TorchWriter", "safe_torch_load"]

_FIX = (
    "It was refused and nothing in it ran. To convert it safely, load it in a trusted "
    "environment and re-save only tensors and plain values, e.g. "
    "torch.save(model.state_dict(), 'weights.pt'), then convert that file."
)


def safe_torch_load(f: Any, *, where: str, mmap: bool = False) -> Any:
    """``torch.load(f, weights_only=True)``, with refusals and damage reported as format errors."""
    import torch

    try:  # an explicit weights_only=True wins over TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
        return torch.load(f, weights_only=True, mmap=mmap, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise UnsafeInputError(f"{where}: this pickle needs code execution to load ({detail.strip()}). {_FIX}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{where}: not a readable torch.save file (truncated or corrupt?): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


class TorchReader(Reader):
    """One ``torch.save`` file, opened with ``weights_only=True``."""

    format = "torch"

    def __init__(self, loc: Location, tensors: dict[str, Any], plain: dict[str, Any], warnings: list[str]) -> None:
        super().__init__(loc.url)
        self.loc = loc
        self._tensors = tensors
        self._plain = plain
        self._warnings = warnings

    @classmethod
    def open(cls, loc: Location) -> "TorchReader":
        if loc.local:
            if not os.path.isfile(loc.path):
                raise FormatError(f"{loc.url}: file does not exist")
            try:
                obj = safe_torch_load(loc.path, where=loc.url, mmap=True)
            except FormatError as e:
                if "mmap" not in str(e):
                    raise
                obj = safe_torch_load(loc.path, where=loc.url)  # legacy (non-zip) format cannot be mapped
        else:
            with loc.fs.open(loc.path, "rb") as f:
                obj = safe_torch_load(f, where=loc.url)
        return cls._from_object(loc, obj)

    @classmethod
    def _from_object(cls, loc: Location, obj: Any) -> "TorchReader":
        import torch

        from ckpt._tensors import dtype_name

        tensors: dict[str, Any] = {}
        plain: dict[str, Any] = {}
        warnings: list[str] = []

        def on_tensor(name: str, t: Any) -> None:
            if name in tensors:
                raise FormatError(f"{loc.url}: two tensors are both named {name!r} (keys that differ only in type collide)")
            if t.layout != torch.strided or t.is_quantized:
                warnings.append(f"tensor {name!r} skipped: layout {t.layout}{' (quantized)' if t.is_quantized else ''} is not supported")
                return
            dtype_name(t.dtype, where=f"{loc.url}: tensor {name!r}")
            tensors[name] = t

        if not isinstance(obj, (dict, list, tuple, torch.Tensor)):
            raise FormatError(f"{loc.url}: holds a {type(obj).__name__}, not a state dict or tensor")
        split_state(obj, on_tensor=on_tensor, plain=plain, warnings=warnings)
        return cls(loc, tensors, plain, warnings)

    def tensors(self) -> list[TensorInfo]:
        from ckpt._tensors import dtype_name

        return [TensorInfo(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in self._tensors.items()]

    def read(self, name: str) -> Any:
        return self._tensors[name]

    def plain_state(self) -> dict[str, Any]:
        return dict(self._plain)

    def warnings(self) -> list[str]:
        return list(self._warnings)

    def describe(self) -> dict[str, Any]:
        return {"file_bytes": self.loc.size(), "mmap": self.loc.local}

    def close(self) -> None:
        self._tensors = {}


class TorchWriter(Writer):
    """``torch.save`` of ``{name: tensor, **plain}`` at ``commit`` (holds the whole state)."""

    format = "torch"

    def __init__(self, loc: Location) -> None:
        super().__init__(loc.url)
        self.loc = loc
        self._state: dict[str, Any] = {}
        self._sink: Optional[FileSink] = None

    def begin(self, tensors: Sequence[TensorInfo]) -> None:
        super().begin(tensors)
        if self.loc.exists():
            raise DestinationExistsError(f"{self.url} already exists; conversions never overwrite (remove it or pick another name)")

    def plan(self) -> dict[str, Any]:
        return {"files": [self.loc.name], "holds_whole_state_bytes": sum(t.nbytes for t in self._declared)}

    def write(self, name: str, tensor: Any) -> None:
        from ckpt._tensors import host_contiguous

        self._expect(name, tensor)
        t = host_contiguous(tensor)
        if t.untyped_storage().nbytes() != t.nbytes or t.storage_offset():
            t = t.clone()  # a view would drag its whole storage into the file
        self._state[name] = t

    def commit(self) -> str:
        import torch

        self._check_complete()
        state = dict(self._state)
        state.update(self._plain)
        self._sink = FileSink(self.loc)
        torch.save(state, self._sink.raw())
        self._sink.commit()
        self._state = {}
        return self.url

    def abort(self) -> None:
        self._state = {}
        if self._sink is not None:
            self._sink.abort()
