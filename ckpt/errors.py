"""The exceptions ``ckpt`` raises.

Every error names what went wrong, where (tensor, rank, step, object, byte range) and, where
there is one, the fix. Each inherits the builtin a caller would naturally catch, so
``except FileNotFoundError`` or ``except ValueError`` keep working.

This module imports nothing heavy: the coordinator and tools import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "CheckpointError",
    "InvalidKeyError",
    "StoreError",
    "ObjectNotFoundError",
    "ManifestError",
    "UnsupportedFormatVersionError",
    "ManifestTooLargeError",
    "UnsafeObjectNameError",
    "CodecError",
    "ChunkFailure",
    "CorruptChunkError",
    "CheckpointNotFoundError",
    "StateMismatchError",
    "UnsupportedStateError",
    "SaveFailedError",
]


class CheckpointError(Exception):
    """Base class of every error raised by ``ckpt``."""


class InvalidKeyError(CheckpointError, ValueError):
    """A store key is not a safe relative path (``..``, absolute, empty segment, odd bytes)."""


class StoreError(CheckpointError, OSError):
    """A storage backend failed; the message names the store URL and the key."""


class ObjectNotFoundError(StoreError, FileNotFoundError):
    """The object (or byte range) asked for does not exist in the store."""


class ManifestError(CheckpointError, ValueError):
    """A manifest is malformed; the message names the field path and the manifest key."""


class UnsupportedFormatVersionError(ManifestError):
    """The manifest was written by a format version this reader does not know."""


class ManifestTooLargeError(ManifestError):
    """The manifest exceeds the size cap and is refused before it is parsed."""


class UnsafeObjectNameError(ManifestError):
    """The manifest names an object outside its own prefix (``..``, absolute, other bucket)."""


class CodecError(CheckpointError, ValueError):
    """A codec is unknown, misconfigured, or its input does not decode."""


@dataclass(frozen=True)
class ChunkFailure:
    """One stored chunk that failed verification.

    Attributes:
        tensor: logical tensor name.
        object: object key relative to the checkpoint root.
        byte_offset: first byte of the chunk inside the object.
        byte_length: length of the stored chunk in bytes.
        reason: what was wrong (checksum mismatch, truncated, does not decode).
    """

    tensor: str
    object: str
    byte_offset: int
    byte_length: int
    reason: str

    def describe(self) -> str:
        end = self.byte_offset + self.byte_length
        return (
            f"tensor {self.tensor!r}: object {self.object!r} bytes "
            f"[{self.byte_offset}, {end}): {self.reason}"
        )


class CorruptChunkError(CheckpointError):
    """One or more stored chunks are corrupt or truncated. Nothing was reported as loaded."""

    def __init__(self, failures: Sequence[ChunkFailure], *, where: str = "") -> None:
        self.failures = tuple(failures)
        lines = "\n  ".join(f.describe() for f in self.failures)
        head = f"{len(self.failures)} corrupt chunk(s)"
        if where:
            head += f" in {where}"
        super().__init__(
            f"{head}:\n  {lines}\nThe checkpoint step cannot be trusted; load an earlier step "
            f"(see `ckpt ls`) or restore the objects from a replica."
        )


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed step (or not the requested one) exists under the URL."""


class StateMismatchError(CheckpointError, ValueError):
    """The state passed to ``load`` does not match the checkpoint; every problem is listed."""

    def __init__(self, problems: Sequence[str], *, where: str = "") -> None:
        self.problems = tuple(problems)
        lines = "\n  ".join(self.problems)
        head = f"the state does not match the checkpoint{(' ' + where) if where else ''}"
        super().__init__(
            f"{head} ({len(self.problems)} problem(s)):\n  {lines}\n"
            "Build the model and optimizer with the configuration that wrote the checkpoint, "
            "or pass strict=False to skip entries missing from it."
        )


class UnsupportedStateError(CheckpointError, TypeError):
    """A value in the state cannot be stored without pickle; the message names its path."""


class SaveFailedError(CheckpointError, RuntimeError):
    """A save failed on at least one rank; nothing was committed.

    Attributes:
        failures: ``{rank: message}`` for every rank that failed.
    """

    def __init__(self, failures: dict[int, str], *, step: int) -> None:
        self.failures = dict(sorted(failures.items()))
        self.step = step
        lines = "\n  ".join(f"rank {r}: {m}" for r, m in self.failures.items())
        super().__init__(
            f"save of step {step} failed on rank(s) {sorted(self.failures)}; nothing was "
            f"committed and the previous step is still the latest:\n  {lines}"
        )
