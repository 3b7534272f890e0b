"""Files on local disk or any fsspec URL: ranged reads, file views, atomic outputs.

``Location`` is a file or directory: a local path (``/x``, ``file:///x``) or an fsspec URL
(``s3://bucket/key``). Reads are ranged (``pread`` locally, ranged GETs on object stores), so a
reader fetches only the bytes it needs.

Outputs never look complete after a failure:

* ``FileSink`` (one file): locally a temporary ``NAME.tmp-<hex>`` next to the target, fsynced
  and renamed into place at ``commit`` (the target must not exist); on object stores a
  streamed upload that becomes visible only when it completes, and is discarded on ``abort``.
* ``DirSink`` (a directory of files): locally a temporary sibling directory renamed into place
  at ``commit``; on object stores the files go straight to their keys and the caller writes
  the one file that marks completion (an index, ``.metadata``) last. ``abort`` deletes what
  was written.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import secrets
import shutil
from typing import Any, Iterator, Optional
from urllib.parse import unquote, urlsplit

from ckpt.errors import StoreError
from ckpt.formats._base import DestinationExistsError, FormatError

__all__ = ["Location", "FileSink", "DirSink", "SAFE_FILE_NAME"]

log = logging.getLogger(__name__)

#: File names a format's metadata may refer to (no directories, no ``..``).
SAFE_FILE_NAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9._][A-Za-z0-9._=+-]{0,254}$")
#: Object-store reads go in pieces of this size (bounds the transient buffer).
PIECE_BYTES = 32 * 1024 * 1024
_UPLOAD_BLOCK = 16 * 1024 * 1024


def _is_local(url: str) -> bool:
    return "://" not in url or url.lower().startswith("file://")


def _local_path(url: str) -> str:
    if url.lower().startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise FormatError(f"{url}: a file:// URL cannot name host {parts.netloc!r}; use file:///abs/path")
        url = unquote(parts.path)
    return os.path.abspath(os.path.expanduser(url))


class Location:
    """A file or directory on local disk or behind an fsspec URL.

    Build one with ``Location.of(url, storage_options)``; construction does no I/O.
    """

    def __init__(self, url: str, path: str, fs: Any = None) -> None:
        self.url = url
        self.path = path
        self.fs = fs

    @classmethod
    def of(cls, url: str, storage_options: Optional[dict[str, Any]] = None) -> "Location":
        url = os.fspath(url)
        if _is_local(url):
            if storage_options:
                raise ValueError(f"storage options only apply to fsspec URLs (s3://...), not {url!r}")
            path = _local_path(url)
            return cls(path, path)
        try:
            from fsspec.core import url_to_fs

            fs, path = url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise StoreError(f"cannot open {url!r}: {e} (is the fsspec implementation installed, e.g. `pip install s3fs`?)") from e
        return cls(url.rstrip("/"), path.rstrip("/"), fs)

    @property
    def local(self) -> bool:
        return self.fs is None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def join(self, name: str) -> "Location":
        """The child ``name`` (one or more safe ``/``-separated segments)."""
        segs = name.split("/")
        if any(s in ("", ".", "..") or not SAFE_FILE_NAME.match(s) for s in segs):
            raise FormatError(f"{self.url}: {name!r} is not a safe relative file name")
        if self.local:
            return Location(os.path.join(self.path, *segs), os.path.join(self.path, *segs))
        return Location(f"{self.url}/{name}", f"{self.path}/{name}", self.fs)

    def parent(self) -> "Location":
        if self.local:
            p = os.path.dirname(self.path)
            return Location(p, p)
        head = self.path.rsplit("/", 1)[0]
        return Location(self.url.rsplit("/", 1)[0], head, self.fs)

    # -- metadata ---------------------------------------------------------------------------
    def _info(self) -> Optional[dict[str, Any]]:
        if self.local:
            return None
        with self._errors("checking"):
            self.fs.invalidate_cache(self.path)
            try:
                return self.fs.info(self.path)
            except FileNotFoundError:
                return None

    def exists(self) -> bool:
        if self.local:
            return os.path.exists(self.path)
        return self._info() is not None

    def isdir(self) -> bool:
        if self.local:
            return os.path.isdir(self.path)
        info = self._info()
        return info is not None and info.get("type") == "directory"

    def isfile(self) -> bool:
        if self.local:
            return os.path.isfile(self.path)
        info = self._info()
        return info is not None and info.get("type") == "file"

    def size(self) -> int:
        if self.local:
            try:
                return os.path.getsize(self.path)
            except FileNotFoundError:
                raise FormatError(f"{self.url}: file does not exist") from None
        info = self._info()
        if info is None or info.get("type") != "file":
            raise FormatError(f"{self.url}: file does not exist")
        return int(info["size"])

    def listdir(self) -> list[str]:
        """Names directly below this directory (files and directories), sorted."""
        if self.local:
            try:
                return sorted(os.listdir(self.path))
            except (FileNotFoundError, NotADirectoryError):
                return []
        with self._errors("listing"):
            self.fs.invalidate_cache(self.path)
            try:
                entries = self.fs.ls(self.path, detail=False)
            except FileNotFoundError:
                return []
        base = self.path.rstrip("/") + "/"
        return sorted({e[len(base):].split("/", 1)[0] for e in entries if e.startswith(base) and len(e) > len(base)})

    # -- reads ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (FormatError, StoreError):
            raise
        except FileNotFoundError as e:
            raise FormatError(f"{self.url}: file does not exist") from e
        except OSError as e:
            raise StoreError(f"{self.url}: {what} failed: {e}") from e

    def read_bytes(self, *, max_bytes: int) -> bytes:
        """The whole file, refused (before reading) when larger than ``max_bytes``."""
        size = self.size()
        if size > max_bytes:
            raise FormatError(f"{self.url}: file is {size} bytes, over the cap of {max_bytes} for this kind of file; refusing to read it")
        return self.read_range(0, size)

    def read_range(self, start: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(start, memoryview(buf))
        return bytes(buf)

    def read_into(self, start: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes from ``start``; a short file is a ``FormatError``."""
        out = memoryview(out).cast("B")
        n = out.nbytes
        if n == 0:
            return
        if self.local:
            with self._errors("reading"):
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    done = 0
                    while done < n:
                        got = os.preadv(fd, [out[done:]], start + done)
                        if got <= 0:
                            raise FormatError(f"{self.url}: truncated: bytes [{start}, {start + n}) were expected but the file ends at {start + done}")
                        done += got
                finally:
                    os.close(fd)
            return
        done = 0
        with self._errors("reading"):
            while done < n:
                want = min(PIECE_BYTES, n - done)
                try:
                    data = self.fs.cat_file(self.path, start=start + done, end=start + done + want)
                except OSError:
                    if start + n > self.size():
                        raise FormatError(f"{self.url}: truncated: bytes [{start}, {start + n}) were expected but the file has {self.size()}") from None
                    raise
                if len(data) != want:
                    raise FormatError(f"{self.url}: truncated: bytes [{start}, {start + n}) were expected but the file ends at {start + done + len(data)}")
                out[done : done + want] = data
                done += want

    def open_view(self, start: int, length: int) -> io.BufferedReader:
        """A seekable read-only file over bytes ``[start, start + length)`` (for ``torch.load``)."""
        return io.BufferedReader(_RangeFile(self, start, length), buffer_size=1 << 20)

    # -- writes -----------------------------------------------------------------------------
    def delete(self) -> None:
        """Delete this file or directory tree (best effort, never raises)."""
        try:
            if self.local:
                if os.path.isdir(self.path):
                    shutil.rmtree(self.path, ignore_errors=True)
                elif os.path.exists(self.path):
                    os.unlink(self.path)
            elif self.exists():
                self.fs.rm(self.path, recursive=True)
        except Exception as e:  # cleanup must never hide the real error
            log.warning("could not delete %s: %s", self.url, e)


class _RangeFile(io.RawIOBase):
    """Raw, seekable view of a byte range of a ``Location``."""

    def __init__(self, loc: Location, start: int, length: int) -> None:
        super().__init__()
        self._loc, self._start, self._len, self._pos = loc, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = max(0, min(view.nbytes, self._len - self._pos))
        if n:
            self._loc.read_into(self._start + self._pos, view[:n])
            self._pos += n
        return n


def _fsync_dir(path: str) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSink:
    """One output file written front to back, published atomically by ``commit``."""

    def __init__(self, loc: Location, *, final: bool = True) -> None:
        """``final=False``: a file inside a local ``DirSink`` temp dir (written in place)."""
        self.loc = loc
        self.written = 0
        self._final = final
        self._done = False
        if loc.local:
            os.makedirs(os.path.dirname(loc.path) or ".", exist_ok=True)
            self._tmp = f"{loc.path}.tmp-{secrets.token_hex(6)}" if final else loc.path
            self._fd: Optional[int] = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            self._f: Any = None
        else:
            self._fd = None
            with loc._errors("opening for writing"):
                self._f = loc.fs.open(loc.path, "wb", block_size=_UPLOAD_BLOCK)

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if self._fd is not None:
            done = 0
            while done < view.nbytes:
                done += os.write(self._fd, view[done:])
        else:
            with self.loc._errors("writing"):
                self._f.write(view)
        self.written += view.nbytes

    def raw(self) -> Any:
        """A writable file object over the sink (for ``torch.save``/``pickle.dump``)."""
        return _SinkFile(self)

    def commit(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            if self._final:
                if os.path.exists(self.loc.path):
                    raise DestinationExistsError(f"{self.loc.url} appeared while it was being written; the new file is kept at {self._tmp}")
                os.rename(self._tmp, self.loc.path)
                _fsync_dir(os.path.dirname(self.loc.path))
        elif self._f is not None:
            with self.loc._errors("finishing the upload of"):
                self._f.close()
            self._f = None
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
        elif self._f is not None:
            try:
                self._f.discard()  # aborts an S3 multipart upload: nothing is published
            except Exception:
                log.warning("discarding the partial upload of %s failed", self.loc.url, exc_info=True)
            with contextlib.suppress(AttributeError):
                self._f.closed = True
            self._f = None


class _SinkFile(io.RawIOBase):
    def __init__(self, sink: FileSink) -> None:
        super().__init__()
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        self._sink.write(b)
        return n

    def tell(self) -> int:
        return self._sink.written

    def flush(self) -> None:
        pass


class DirSink:
    """An output directory of files; see the module docstring for how it commits."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self._files: list[FileSink] = []
        self._done = False
        if loc.local:
            if os.path.exists(loc.path) and (not os.path.isdir(loc.path) or os.listdir(loc.path)):
                raise DestinationExistsError(f"{loc.url} already exists and is not an empty directory; conversions never overwrite")
            parent = os.path.dirname(loc.path)
            os.makedirs(parent, exist_ok=True)
            self._tmp = os.path.join(parent, f".{os.path.basename(loc.path)}.tmp-{secrets.token_hex(6)}")
            os.mkdir(self._tmp)
        else:
            self._tmp = ""

    def file(self, name: str) -> FileSink:
        """A new file ``name`` in the directory (written in place in the temp dir locally)."""
        if self.loc.local:
            sink = FileSink(Location(os.path.join(self._tmp, name), os.path.join(self._tmp, name)), final=False)
        else:
            sink = FileSink(self.loc.join(name))
        self._files.append(sink)
        return sink

    def commit(self) -> None:
        for f in self._files:
            if not f._done:
                f.commit()
        if self.loc.local:
            _fsync_dir(self._tmp)
            if os.path.isdir(self.loc.path):
                os.rmdir(self.loc.path)  # empty, checked at construction
            os.rename(self._tmp, self.loc.path)
            _fsync_dir(os.path.dirname(self.loc.path))
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        for f in self._files:
            f.abort()
        if self.loc.local:
            shutil.rmtree(self._tmp, ignore_errors=True)
        else:
            for f in self._files:
                with contextlib.suppress(Exception):
                    if f.loc.exists():
                        f.loc.fs.rm_file(f.loc.path)
