"""Checkpoint formats behind one small reader/writer interface (``ckpt convert``, ``diff``...).

Formats (``FORMATS``):

==============  =============================================================================
``universal``   ckpt's own checkpoint root (``manifests/`` + ``data/``; ``docs/format.md``)
``dcp``         a ``torch.distributed.checkpoint`` directory (``.metadata`` + ``*.distcp``),
                sharded saves included; its pickled metadata is read without running it
``torch``       one ``torch.save`` file, read with ``weights_only=True`` only
``safetensors`` one ``.safetensors`` file (own strict parser; no extra package)
``hf``          Hugging Face sharded safetensors with ``model.safetensors.index.json``
==============  =============================================================================

``open_reader(url)`` detects the format (``detect_format``) unless told; ``open_writer(url,
format=...)`` returns a writer (no I/O until ``begin``). Paths may be local or any fsspec URL.
The interface and its call order are in ``ckpt.formats._base``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ckpt.formats._base import (
    FORMATS,
    CheckReport,
    DestinationExistsError,
    FormatError,
    Origin,
    Reader,
    TensorInfo,
    UnknownFormatError,
    UnsafeInputError,
    Writer,
)
from ckpt.formats._io import Location

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
    "detect_format",
    "guess_output_format",
    "open_reader",
    "open_writer",
]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
_ZIP_MAGIC = b"PK\x03\x04"


def _check_name(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UnknownFormatError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    return fmt


def detect_format(url: str, *, storage_options: Optional[dict[str, Any]] = None) -> str:
    """The format of an existing checkpoint at ``url`` (see the module docstring).

    Directories: ``manifests/`` (or ``data/``) -> universal, ``.metadata`` -> dcp, an
    ``*.index.json`` or a lone ``model.safetensors`` -> hf. Files: by suffix (``.safetensors``,
    ``.index.json``, ``.pt/.pth/.bin/.ckpt``, ``.metadata``), else by their first bytes.

    Raises:
        UnknownFormatError: nothing there, or nothing recognisable (pass the format explicitly).
    """
    loc = Location.of(url, storage_options)
    name = loc.name
    if name.endswith(".index.json"):
        return "hf"
    if name == ".metadata":
        return "dcp"
    if loc.isdir():
        entries = set(loc.listdir())
        if "manifests" in entries or "data" in entries:
            return "universal"
        if ".metadata" in entries:
            return "dcp"
        if any(e.endswith(".index.json") for e in entries) or "model.safetensors" in entries:
            return "hf"
        raise UnknownFormatError(
            f"{loc.url}: cannot tell the checkpoint format of this directory (no manifests/, .metadata, "
            f"*.index.json or model.safetensors; {len(entries)} entries); pass --from"
        )
    if not loc.isfile():
        raise UnknownFormatError(f"{loc.url}: does not exist")
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.lower().endswith(_TORCH_SUFFIXES):
        return "torch"
    head = loc.read_range(0, min(16, loc.size()))
    if head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise UnknownFormatError(f"{loc.url}: cannot tell the format of this file from its name or first bytes; pass --from")


def guess_output_format(url: str, *, storage_options: Optional[dict[str, Any]] = None) -> str:
    """The format a destination's name implies: ``.safetensors`` -> safetensors,
    ``.index.json`` -> hf, ``.pt/.pth/.bin`` -> torch, an existing ckpt root -> universal.

    Raises:
        UnknownFormatError: the name says nothing (pass ``--to``).
    """
    name = os.path.basename(str(url).rstrip("/"))
    if name.endswith(".index.json"):
        return "hf"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.lower().endswith(_TORCH_SUFFIXES):
        return "torch"
    loc = Location.of(url, storage_options)
    if loc.isdir() and {"manifests", "data"} & set(loc.listdir()):
        return "universal"
    raise UnknownFormatError(
        f"{url}: cannot tell the destination format from its name; pass --to ({', '.join(FORMATS)})"
    )


def open_reader(url: Any, *, format: Optional[str] = None, storage_options: Optional[dict[str, Any]] = None, step: Optional[int] = None) -> Reader:
    """Open a checkpoint for reading; reads and validates its metadata (no tensor data).

    Args:
        url: path or fsspec URL (a directory or file, depending on the format).
        format: one of ``FORMATS``; detected when None.
        storage_options: fsspec options (S3 endpoint, credentials).
        step: universal only: the step to read (default the latest committed).

    Raises:
        UnknownFormatError, FormatError, UnsafeInputError, CheckpointNotFoundError.
    """
    url = os.fspath(url)
    fmt = _check_name(format) if format else detect_format(url, storage_options=storage_options)
    if step is not None and fmt != "universal":
        raise ValueError(f"step= only applies to universal checkpoints, not {fmt}")
    if fmt == "universal":
        from ckpt.formats.universal import UniversalReader

        return UniversalReader.open(url, storage_options=storage_options, step=step)
    loc = Location.of(url, storage_options)
    if fmt == "safetensors":
        from ckpt.formats.safetensors import SafetensorsReader

        return SafetensorsReader.open(loc)
    if fmt == "hf":
        from ckpt.formats.hf import HfReader

        return HfReader.open(loc)
    if fmt == "dcp":
        from ckpt.formats.dcp import DcpReader

        return DcpReader.open(loc)
    from ckpt.formats.torchsave import TorchReader

    return TorchReader.open(loc)


def open_writer(url: Any, *, format: str, storage_options: Optional[dict[str, Any]] = None, **options: Any) -> Writer:
    """A writer for ``format`` at ``url`` (no I/O until ``begin``).

    Options: ``hf``: ``max_shard_size`` (bytes, default 5 GB); ``universal``: ``step``,
    ``compression``, ``regions``, ``layout_record``, ``world_size``, ``io_threads``.
    """
    url = os.fspath(url)
    fmt = _check_name(format)
    if fmt == "universal":
        from ckpt.formats.universal import UniversalWriter

        return UniversalWriter(url, storage_options=storage_options, **options)
    loc = Location.of(url, storage_options)
    extra = {k: v for k, v in options.items() if v is not None}
    if fmt == "hf":
        from ckpt.formats.hf import HfWriter

        return HfWriter(loc, **extra)
    if extra:
        raise ValueError(f"options {sorted(extra)} do not apply to {fmt} output")
    if fmt == "safetensors":
        from ckpt.formats.safetensors import SafetensorsWriter

        return SafetensorsWriter(loc)
    if fmt == "dcp":
        from ckpt.formats.dcp import DcpWriter

        return DcpWriter(loc)
    from ckpt.formats.torchsave import TorchWriter

    return TorchWriter(loc)
