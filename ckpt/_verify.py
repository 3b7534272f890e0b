"""Reading one stored chunk with its checks, and verifying a whole save. No torch needed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ckpt.codecs import CodecChain, Hasher, checksum
from ckpt.errors import ChunkFailure, CodecError, ObjectNotFoundError, StoreError
from ckpt.metadata import ChunkMeta, Manifest
from ckpt.store import Store

__all__ = ["read_chunk", "verify", "VerifyReport"]


def read_chunk(store: Store, prefix: str, name: str, chunk: ChunkMeta, dst: np.ndarray, verify: bool) -> tuple[int, Optional[ChunkFailure]]:
    """Read one chunk into ``dst``; returns (bytes read, failure or None)."""

    def fail(reason: str) -> tuple[int, ChunkFailure]:
        return 0, ChunkFailure(name, prefix + chunk.object, chunk.byte_offset, chunk.byte_length, reason)

    key = prefix + chunk.object
    try:
        got = None
        if not chunk.codecs and store.capabilities.readinto:
            # Straight into the destination; the checksum runs piece by piece while each
            # piece is still in cache (a second pass over 64 MiB would run at RAM speed).
            hasher = Hasher(chunk.checksum.algorithm) if verify else None
            if chunk.byte_length:
                store.get_range_into(key, chunk.byte_offset, memoryview(dst), on_piece=None if hasher is None else hasher.update)
            got = None if hasher is None else hasher.hexdigest()
            data: Any = dst
        else:
            data = store.get_range(key, chunk.byte_offset, chunk.byte_length) if chunk.byte_length else b""
            if verify:
                got = checksum(chunk.checksum.algorithm, data)
        if verify:
            if got != chunk.checksum.value:
                return fail(f"{chunk.checksum.algorithm} checksum mismatch (stored {chunk.checksum.value}, computed {got})")
        if data is not dst:
            decoded = CodecChain.from_json(list(chunk.codecs)).decode(memoryview(data), decoded_size=chunk.raw_length)
            dst[:] = np.frombuffer(decoded, dtype=np.uint8)
    except ObjectNotFoundError as e:
        return fail(f"object missing: {e}")
    except StoreError as e:
        return fail(f"truncated or unreadable: {e}")
    except CodecError as e:
        return fail(f"does not decode: {e}")
    return chunk.byte_length, None


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyReport:
    """The outcome of checking every chunk of one save."""

    step: int
    save_id: str
    chunks: int
    bytes_checked: int
    failures: tuple[ChunkFailure, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


def verify(store: Store, manifest: Manifest, *, threads: int = 4, decode: bool = True) -> VerifyReport:
    """Read every chunk of ``manifest``, check its checksum and (``decode``) that it decodes."""
    prefix = manifest.data_prefix
    tasks = [(name, c) for name, t in manifest.tensors.items() for c in t.chunks]

    def run(task: tuple[str, ChunkMeta]) -> tuple[int, Optional[ChunkFailure]]:
        name, chunk = task
        dst = np.empty(chunk.raw_length, dtype=np.uint8) if (decode or not chunk.codecs) else None
        if dst is None:  # checksum only
            try:
                data = store.get_range(prefix + chunk.object, chunk.byte_offset, chunk.byte_length)
            except StoreError as e:
                return 0, ChunkFailure(name, prefix + chunk.object, chunk.byte_offset, chunk.byte_length, f"unreadable: {e}")
            ok = checksum(chunk.checksum.algorithm, data) == chunk.checksum.value
            return chunk.byte_length, None if ok else ChunkFailure(name, prefix + chunk.object, chunk.byte_offset, chunk.byte_length, "checksum mismatch")
        return read_chunk(store, prefix, name, chunk, dst, True)

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ckpt-verify") as pool:
        results = list(pool.map(run, tasks))
    failures = tuple(f for _, f in results if f is not None)
    return VerifyReport(manifest.step, manifest.save_id, len(tasks), sum(n for n, _ in results), failures)
