"""The embedded default store: a directory on a local (or locally mounted) file system.

Writes are crash safe: ``put`` writes a ``.tmp-<uuid>`` file next to the target, fsyncs it,
renames it over the target with ``os.replace`` and fsyncs the directory, so after a crash a
key holds either its old bytes, its new bytes, or nothing. Temporary files are never listed.
Reads use ``pread``/``preadv`` into the caller's buffer, with one file descriptor per call,
so any number of threads may read and write at once without shared state.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from typing import Iterator, Optional, Sequence, Union
from urllib.parse import unquote, urlsplit

from ckpt.errors import InvalidKeyError, ObjectNotFoundError, StoreError
from ckpt.store._base import (
    PieceCallback,
    Buffer,
    Store,
    StoreCapabilities,
    _check_range,
    _validate_prefix,
    as_buffers,
    validate_key,
)

__all__ = ["LocalStore"]

#: Name prefix of in-flight ``put`` files; keys may not use it.
TMP_PREFIX = ".tmp-"
#: Read size when a caller checksums pieces as they arrive (fits in L2 cache).
PIECE_BYTES = 1 << 20

_IOV_MAX = 512  # conservative: Linux allows 1024 buffers per writev call
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows
_CAN_FSYNC_DIR = os.name == "posix"
_MKDIR_RETRIES = 5


def _root_from(root: Union[str, "os.PathLike[str]"]) -> str:
    """Turn a path or ``file://`` URL into an absolute directory path."""
    text = os.fspath(root)
    if not isinstance(text, str) or not text:
        raise InvalidKeyError(f"local store root {root!r} must be a non-empty path or file:// URL")
    if text.startswith("file:"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise InvalidKeyError(
                f"local store URL {text!r} names host {parts.netloc!r}; use 'file:///abs/path' "
                "(a file:// URL cannot reach another machine)"
            )
        text = unquote(parts.path)
        if not text:
            raise InvalidKeyError(f"local store URL {root!r} has no path: use 'file:///abs/path'")
    return os.path.abspath(os.path.expanduser(text))


def _fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename or new child) to disk; no-op off POSIX."""
    if not _CAN_FSYNC_DIR:
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Write every buffer back to back, resuming after partial writes, without joining them."""
    pending = [v for v in views if v.nbytes]
    writev = getattr(os, "writev", None)
    i = 0
    while i < len(pending):
        if writev is not None:
            n = writev(fd, pending[i : i + _IOV_MAX])
        else:
            n = os.write(fd, pending[i])
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        while i < len(pending) and n >= pending[i].nbytes:
            n -= pending[i].nbytes
            i += 1
        if n:
            pending[i] = pending[i][n:]


class LocalStore(Store):
    """Objects as files below a root directory.

    Args:
        root: a directory path (``str`` or ``os.PathLike``) or a ``file://`` URL. It need not
            exist yet: the first ``put`` creates it. Construction does no I/O.

    Raises:
        InvalidKeyError: ``root`` is empty or a ``file://`` URL naming another host.
    """

    capabilities = StoreCapabilities(readinto=True, durable=True, compress_by_default=False)

    def __init__(self, root: Union[str, "os.PathLike[str]"]) -> None:
        self.root = _root_from(root)
        super().__init__("file://" + self.root)

    # -- paths -------------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        """Validate ``key`` and return its file path (keys may not use the temp-file prefix)."""
        validate_key(key)
        if any(seg.startswith(TMP_PREFIX) for seg in key.split("/")):
            raise InvalidKeyError(
                f"key {key!r} uses the reserved temporary-file prefix {TMP_PREFIX!r} in "
                f"{self.url}; rename the object"
            )
        return os.path.join(self.root, *key.split("/"))

    def _not_found(self, key: str) -> ObjectNotFoundError:
        return ObjectNotFoundError(f"{self.url}: object {key!r} does not exist")

    def _failed(self, what: str, key: str, exc: OSError) -> StoreError:
        return StoreError(f"{self.url}: {what} object {key!r} failed: {exc}")

    def _open_read(self, key: str) -> int:
        """Open ``key`` for reading; missing files and directories are ``ObjectNotFoundError``."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_BINARY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise self._not_found(key) from exc
        except OSError as exc:
            raise self._failed("opening", key, exc) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._not_found(key)
        return fd

    # -- reads -------------------------------------------------------------------------------
    def get(self, key: str) -> bytes:
        """Return the whole object. Raises ``ObjectNotFoundError`` if it does not exist."""
        fd = self._open_read(key)
        try:
            with os.fdopen(fd, "rb", closefd=True) as f:
                return f.read()
        except OSError as exc:
            raise self._failed("reading", key, exc) from exc

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return ``length`` bytes from ``start``; raise ``StoreError`` if the file is short."""
        self._path(key)
        _check_range(self.url, key, start, length)
        if length == 0:
            self._check_covers(key, start, 0)
            return b""
        fd = self._open_read(key)
        try:
            parts = []
            got = 0
            while got < length:
                chunk = os.pread(fd, length - got, start + got)
                if not chunk:
                    raise self._short_read(key, start, length, got)
                parts.append(chunk)
                got += len(chunk)
        except StoreError:
            raise
        except OSError as exc:
            raise self._failed("reading", key, exc) from exc
        finally:
            os.close(fd)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def get_range_into(self, key: str, start: int, out: memoryview, *, on_piece: Optional[PieceCallback] = None) -> None:
        """Read ``out.nbytes`` bytes from ``start`` straight into ``out`` with ``preadv``.

        With ``on_piece``, reads ``PIECE_BYTES`` at a time and hands each piece over while it
        is still in the CPU cache.
        """
        self._path(key)
        view = memoryview(out)
        if view.readonly:
            raise TypeError(f"{self.url}: get_range_into({key!r}) needs a writable buffer")
        view = view.cast("B")
        _check_range(self.url, key, start, view.nbytes)
        if view.nbytes == 0:
            self._check_covers(key, start, 0)
            return
        self._read_into(key, start, view, on_piece)

    def _check_covers(self, key: str, start: int, length: int) -> None:
        size = self.size(key)
        if start + length > size:
            raise self._short_read(key, start, length, max(0, size - start))

    def _read_into(self, key: str, start: int, view: memoryview, on_piece: Optional[PieceCallback] = None) -> None:
        fd = self._open_read(key)
        try:
            total = view.nbytes
            step = total if on_piece is None else PIECE_BYTES
            got = 0
            while got < total:
                end = min(got + step, total)
                piece_start = got
                while got < end:
                    if hasattr(os, "preadv"):
                        n = os.preadv(fd, [view[got:end]], start + got)
                    else:
                        chunk = os.pread(fd, end - got, start + got)
                        n = len(chunk)
                        view[got : got + n] = chunk
                    if n == 0:
                        raise self._short_read(key, start, total, got)
                    got += n
                if on_piece is not None:
                    on_piece(view[piece_start:end])
        except StoreError:
            raise
        except OSError as exc:
            raise self._failed("reading", key, exc) from exc
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        """Whether a committed object ``key`` exists (a directory is not an object)."""
        path = self._path(key)
        try:
            return stat.S_ISREG(os.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise self._failed("checking", key, exc) from exc

    def size(self, key: str) -> int:
        """The object's size in bytes. Raises ``ObjectNotFoundError`` if it does not exist."""
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise self._not_found(key) from exc
        except OSError as exc:
            raise self._failed("checking", key, exc) from exc
        if not stat.S_ISREG(st.st_mode):
            raise self._not_found(key)
        return st.st_size

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix``; in-flight ``.tmp-*`` files are never listed."""
        _validate_prefix(prefix)
        head = prefix.rpartition("/")[0]
        start = os.path.join(self.root, *head.split("/")) if head else self.root
        keys = [k for k in self._walk(start, head) if k.startswith(prefix)]
        return sorted(keys)

    def _walk(self, directory: str, rel: str) -> Iterator[str]:
        """Yield the keys of every regular file below ``directory`` (``rel`` is its key)."""
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing there yet, or removed by a concurrent delete
        except OSError as exc:
            raise StoreError(f"{self.url}: listing {directory!r} failed: {exc}") from exc
        for entry in entries:
            if entry.name.startswith(TMP_PREFIX):
                continue
            key = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    yield from self._walk(entry.path, key)
                elif entry.is_file():
                    yield key
            except FileNotFoundError:
                continue

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: str, data: Union[Buffer, Sequence[Buffer]]) -> None:
        """Atomically and durably write ``data`` (one buffer or several, back to back).

        Raises:
            InvalidKeyError: ``key`` is not a safe key.
            StoreError: the file system refused (disk full, permissions, a file where a
                directory is needed); no object and no temporary file is left behind.
        """
        path = self._path(key)
        views = as_buffers(data)
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            fd = self._create_tmp(directory, tmp)
            try:
                try:
                    _write_all(fd, views)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            _fsync_dir(directory)
        except OSError as exc:
            raise self._failed("writing", key, exc) from exc

    def _create_tmp(self, directory: str, tmp: str) -> int:
        """Create the directory chain and the temp file; retry if a delete prunes the dir."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_BINARY
        attempt = 1
        while True:
            try:
                self._makedirs(directory)
                return os.open(tmp, flags, 0o644)
            except FileNotFoundError:  # a concurrent delete pruned a directory we made
                if attempt >= _MKDIR_RETRIES:
                    raise
                attempt += 1

    def _makedirs(self, directory: str) -> None:
        """Create ``directory`` and its missing parents, fsyncing each new entry's parent."""
        missing = []
        d = directory
        while not os.path.isdir(d):
            missing.append(d)
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise
            _fsync_dir(os.path.dirname(d))

    def delete(self, key: str) -> None:
        """Delete ``key`` (missing is fine), then prune emptied parent directories."""
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return  # a directory is not an object: nothing to delete
        except OSError as exc:
            if exc.errno == errno.EPERM and os.path.isdir(path):
                return  # macOS reports unlink(dir) as EPERM
            raise self._failed("deleting", key, exc) from exc
        self._prune(os.path.dirname(path))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` and any ``.tmp-*`` file of a killed put there."""
        count = len(self.list(prefix))
        if prefix.endswith("/"):
            directory = self._path(prefix.rstrip("/"))
            _remove_tree(directory)
            self._prune(os.path.dirname(directory))
        else:
            self.delete_many(self.list(prefix))
        return count

    def sweep_interrupted(self, prefix: str, *, older_than_s: float, now_s: float) -> int:
        """Remove ``.tmp-*`` files (puts killed mid-write) below ``prefix``'s directory whose
        last write is older than ``older_than_s`` seconds before ``now_s``."""
        _validate_prefix(prefix)
        head = prefix.rpartition("/")[0]
        start = os.path.join(self.root, *head.split("/")) if head else self.root
        removed = 0
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if not name.startswith(TMP_PREFIX):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.stat(path).st_mtime < now_s - older_than_s:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    continue
            if removed:
                self._prune(dirpath)
        return removed

    def _prune(self, directory: str) -> None:
        """Remove empty directories from ``directory`` up to (not including) the root."""
        while directory != self.root and directory.startswith(self.root + os.sep):
            try:
                os.rmdir(directory)
            except OSError:
                return  # not empty, already gone, or busy: best effort
            directory = os.path.dirname(directory)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _remove_tree(directory: str) -> None:
    """Remove a directory tree bottom-up; files vanishing concurrently are fine."""
    for dirpath, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            _unlink_quietly(os.path.join(dirpath, name))
        try:
            os.rmdir(dirpath)
        except OSError:
            pass  # not empty (a concurrent put) or already gone: best effort
