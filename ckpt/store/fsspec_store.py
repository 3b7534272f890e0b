"""A store on any fsspec URL: ``s3://bucket/prefix``, ``gs://...``, ``abfs://...`` and others.

Atomicity comes from the object store itself: an S3/GCS/Azure object becomes visible only when
its upload completes. ``put`` therefore uploads straight to the final key, and a failed
streamed upload is discarded (its multipart upload aborted) instead of being closed, because
closing an fsspec file publishes whatever was written so far. File systems that do not
publish on close (fsspec's ``file://``) are not atomic here; ``open_store`` routes local paths
to ``LocalStore`` instead.

fsspec file systems cache directory listings. This store invalidates the cache after every
write and before every ``list``/``exists``/``size``, so a key written by another process or
instance is seen.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.registry import known_implementations

from ckpt.errors import InvalidKeyError, ObjectNotFoundError, StoreError
from ckpt.store._base import (
    Buffer,
    Store,
    StoreCapabilities,
    _check_range,
    _validate_prefix,
    as_buffers,
    validate_key,
)

__all__ = ["FsspecStore"]

logger = logging.getLogger(__name__)

#: Multi-buffer puts up to this many bytes are joined and sent as one request; larger ones
#: are streamed through a buffered file (bounded memory, multipart upload on S3).
_JOIN_LIMIT = 16 * 2**20

#: The package that implements each common protocol, for the install hint.
_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "adl": "adlfs",
    "oci": "ocifs",
    "hf": "huggingface_hub",
    "http": "aiohttp",
    "https": "aiohttp",
    "sftp": "paramiko",
    "ssh": "paramiko",
    "webdav": "webdav4",
}

#: Modules whose exceptions are backend failures (s3fs lets a few through untranslated).
_BACKEND_MODULES = ("botocore", "aiobotocore", "aiohttp", "google", "azure")


def _check_protocol(url: str) -> None:
    """Raise ``StoreError`` (with the ``pip install`` to run) unless fsspec can open ``url``.

    Only imports the implementation; does no I/O. Chained URLs (``simplecache::s3://...``)
    are checked link by link.
    """
    for link in url.split("::"):
        protocol = split_protocol(link)[0] or "file"
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as exc:
            package = _PACKAGES.get(protocol)
            if package is None:
                known = known_implementations.get(protocol, {})
                hint = known.get("err") or (
                    f"fsspec has no implementation of {protocol!r}; install the package that "
                    "provides it"
                )
            else:
                hint = f"run `pip install {package}`"
                if protocol in ("s3", "s3a"):
                    hint += " (or `pip install ckpt-recovery[s3]`)"
            raise StoreError(
                f"cannot open {url!r}: protocol {protocol!r} is not available: {hint}"
            ) from exc


def _is_backend_error(exc: BaseException) -> bool:
    return any(
        (cls.__module__ or "").split(".")[0] in _BACKEND_MODULES for cls in type(exc).__mro__
    )


def _whole_bytes(view: memoryview) -> Optional[Union[bytes, bytearray]]:
    """The ``bytes``/``bytearray`` behind ``view`` if it covers all of it, else ``None``.

    botocore accepts ``bytes``, ``bytearray`` or a file, never a ``memoryview``.
    """
    obj = view.obj
    if isinstance(obj, (bytes, bytearray)) and len(obj) == view.nbytes:
        return obj
    return None


def _abandon(f: Any) -> None:
    """Throw away a half-written fsspec file without publishing it (aborts S3 multipart)."""
    try:
        f.discard()
    except Exception:  # the original error matters more; log this one
        logger.warning("discarding the partial upload of %s failed", f, exc_info=True)
    with contextlib.suppress(AttributeError):
        f.closed = True  # or ``__del__`` would close it, which publishes the partial object


class FsspecStore(Store):
    """Objects below an fsspec URL.

    Args:
        url: an fsspec URL with a root, e.g. ``s3://bucket/prefix``.
        storage_options: passed to the fsspec file system (credentials, ``client_kwargs``
            with an ``endpoint_url``, ``skip_instance_cache``...).

    Raises:
        StoreError: fsspec has no implementation for the URL's protocol (the message says
            which package to install).

    Construction only imports the implementation; the file system is created on first use.
    """

    capabilities = StoreCapabilities(
        readinto=False, durable=True, compress_by_default=True, remote=True
    )

    def __init__(self, url: str, storage_options: Optional[dict[str, Any]] = None) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise InvalidKeyError(f"fsspec store URL {url!r} must look like 'protocol://root'")
        _check_protocol(url)
        super().__init__(url.rstrip("/"))
        self.storage_options = dict(storage_options or {})
        self._fs: Optional[fsspec.AbstractFileSystem] = None
        self._root = ""
        self._lock = threading.Lock()

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec file system (created on first use)."""
        return self._open()[0]

    def _open(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """Create the file system once; return it and the root path inside it."""
        with self._lock:
            if self._fs is None:
                fs, root = url_to_fs(self.url, **self.storage_options)
                root = root.rstrip("/")
                if not root:
                    raise StoreError(
                        f"{self.url}: the URL has no root (bucket); use e.g. "
                        "'s3://bucket/prefix'"
                    )
                self._fs, self._root = fs, root
            return self._fs, self._root

    def _path(self, key: str) -> str:
        validate_key(key)
        return f"{self._open()[1]}/{key}"

    @contextlib.contextmanager
    def _errors(self, what: str, key: str, *, missing: bool = True) -> Iterator[None]:
        """Map fsspec/botocore errors to ``ObjectNotFoundError``/``StoreError`` naming the key.

        Args:
            what: the operation, for the message ("reading", "writing"...).
            key: the key (or prefix) involved.
            missing: map ``FileNotFoundError`` to ``ObjectNotFoundError`` (reads); otherwise
                it becomes a plain ``StoreError`` (a missing bucket on write).
        """
        try:
            yield
        except StoreError:
            raise
        except FileNotFoundError as exc:
            if missing:
                raise ObjectNotFoundError(f"{self.url}: object {key!r} does not exist") from exc
            raise StoreError(
                f"{self.url}: {what} object {key!r} failed: {exc} (does the bucket exist?)"
            ) from exc
        except OSError as exc:
            raise StoreError(f"{self.url}: {what} object {key!r} failed: {exc}") from exc
        except Exception as exc:
            if _is_backend_error(exc):
                raise StoreError(
                    f"{self.url}: {what} object {key!r} failed: {type(exc).__name__}: {exc}"
                ) from exc
            raise

    def _info(self, key: str) -> Optional[dict[str, Any]]:
        """Fresh ``info`` of ``key`` if it is a file, else ``None``."""
        path = self._path(key)
        self.fs.invalidate_cache(path)
        with self._errors("checking", key):
            try:
                info = self.fs.info(path)
            except FileNotFoundError:
                return None
        return info if info.get("type") == "file" else None

    # -- reads -------------------------------------------------------------------------------
    def get(self, key: str) -> bytes:
        """Return the whole object. Raises ``ObjectNotFoundError`` if it does not exist."""
        path = self._path(key)
        with self._errors("reading", key):
            return bytes(self.fs.cat_file(path))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return ``length`` bytes from ``start`` with one ranged request.

        Raises:
            ObjectNotFoundError: the object does not exist.
            StoreError: the object is shorter than ``start + length`` or the backend failed.
        """
        path = self._path(key)
        _check_range(self.url, key, start, length)
        if length == 0:  # fsspec turns an empty range into a whole-object read
            size = self.size(key)
            if start > size:
                raise self._short_read(key, start, 0, 0)
            return b""
        with self._errors("reading", key):
            try:
                # keywords: s3fs's third positional parameter is ``version_id``
                data = self.fs.cat_file(path, start=start, end=start + length)
            except FileNotFoundError:
                raise
            except OSError as exc:  # S3 answers a range past the end with 416 (EINVAL)
                size = self.size(key)
                if start + length > size:
                    raise self._short_read(key, start, length, max(0, size - start)) from exc
                raise
        if len(data) != length:
            raise self._short_read(key, start, length, len(data))
        return bytes(data)

    def exists(self, key: str) -> bool:
        """Whether object ``key`` exists (a "directory" prefix is not an object)."""
        return self._info(key) is not None

    def size(self, key: str) -> int:
        """The object's size in bytes. Raises ``ObjectNotFoundError`` if it does not exist."""
        info = self._info(key)
        if info is None:
            raise ObjectNotFoundError(f"{self.url}: object {key!r} does not exist")
        return int(info["size"])

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (a plain string prefix, not a glob)."""
        _validate_prefix(prefix)
        fs, root = self._open()
        head = prefix.rpartition("/")[0]
        base = f"{root}/{head}" if head else root
        fs.invalidate_cache()
        with self._errors("listing", prefix):
            try:
                paths = fs.find(base)
            except FileNotFoundError:
                return []
        cut = len(root) + 1
        keys = (p[cut:] for p in paths if p.startswith(root + "/") and not p.endswith("/"))
        return sorted(k for k in keys if k.startswith(prefix))

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: str, data: Union[Buffer, Sequence[Buffer]]) -> None:
        """Upload ``data`` to ``key``; the object appears whole when the upload completes.

        Raises:
            InvalidKeyError: ``key`` is not a safe key.
            StoreError: the upload failed (nothing is published).
        """
        path = self._path(key)
        views = as_buffers(data)
        whole = _whole_bytes(views[0]) if len(views) == 1 else None
        try:
            with self._errors("writing", key, missing=False):
                if whole is not None:
                    self.fs.pipe_file(path, whole)
                elif sum(v.nbytes for v in views) <= _JOIN_LIMIT:
                    self.fs.pipe_file(path, b"".join(views))
                else:
                    self._stream(path, views)
        finally:
            self.fs.invalidate_cache(path)

    def _stream(self, path: str, views: list[memoryview]) -> None:
        f = self.fs.open(path, "wb")
        try:
            for view in views:
                f.write(view)
            f.close()
        except BaseException:
            _abandon(f)
            raise

    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""
        path = self._path(key)
        try:
            with self._errors("deleting", key):
                self.fs.rm_file(path)
        except ObjectNotFoundError:
            pass
        finally:
            self.fs.invalidate_cache(path)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete every key with the backend's bulk delete (S3: 1000 keys a request)."""
        keys = list(keys)
        paths = [self._path(k) for k in keys]
        if not paths:
            return
        try:
            with self._errors("deleting", ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")):
                self.fs.rm(paths)
        except ObjectNotFoundError:
            for key in keys:  # some backends stop at the first missing path
                self.delete(key)
        finally:
            self.fs.invalidate_cache()

    def close(self) -> None:
        """Drop the file system reference (fsspec may share the instance; it stays open)."""
        with self._lock:
            self._fs = None
