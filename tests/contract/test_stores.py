"""Runs ``StoreContract`` against every shipped backend, plus backend-specific checks."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from store_contract import StoreContract

from ckpt.errors import InvalidKeyError, StoreError
from ckpt.store import FsspecStore, LocalStore, MemoryStore, Store, open_store
from ckpt.store import fsspec_store as fsspec_store_module

# -- memory --------------------------------------------------------------------------------


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self) -> Iterator[Store]:
        store = MemoryStore(f"memory://contract-{uuid.uuid4().hex}")
        yield store
        store.delete_many(store.list())


def test_memory_instances_share_objects() -> None:
    name = f"memory://shared-{uuid.uuid4().hex}"
    a, b = MemoryStore(name), MemoryStore(name + "/")
    a.put("k", b"v")
    assert b.get("k") == b"v"
    scoped = MemoryStore(name + "/sub/dir")
    scoped.put("k", b"w")
    assert a.list() == ["k", "sub/dir/k"]
    assert scoped.list() == ["k"]
    a.delete_many(a.list())
    assert b.list() == []


@pytest.mark.parametrize(
    "url", ["memory://", "memory:///", "memory://a/../b", "memory://a\\b", "s3://x"]
)
def test_memory_rejects_bad_urls(url: str) -> None:
    with pytest.raises(InvalidKeyError):
        MemoryStore(url)


# -- local ---------------------------------------------------------------------------------


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        return LocalStore(tmp_path / "root")


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def test_local_accepts_file_urls(tmp_path: Path) -> None:
    store = LocalStore(f"file://{tmp_path}")
    store.put("a/b", b"x")
    assert (tmp_path / "a" / "b").read_bytes() == b"x"
    assert store.url == f"file://{tmp_path}"
    with pytest.raises(InvalidKeyError, match="host"):
        LocalStore("file://otherhost/data")


def test_local_construction_and_bad_keys_do_no_io(tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet"
    store = LocalStore(root)
    with pytest.raises(InvalidKeyError):
        store.put("../escape", b"x")
    with pytest.raises(InvalidKeyError):
        store.put(".tmp-reserved", b"x")
    assert store.list() == []
    assert list(tmp_path.iterdir()) == []


def test_local_put_leaves_only_the_final_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("d/k", [b"a", b"b"])
    assert _files_under(tmp_path) == [os.path.join("d", "k")]


def test_local_delete_prunes_empty_directories(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.put("a/b/c/d", b"1")
    store.put("a/x", b"2")
    store.delete("a/b/c/d")
    assert sorted(p.name for p in (tmp_path / "root" / "a").iterdir()) == ["x"]
    store.delete("a/x")
    assert list((tmp_path / "root").iterdir()) == []  # the root itself stays


def test_local_interrupted_put_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)
    store.put("keep", b"old")
    real_write = os.write
    calls = []

    def failing_write(fd: int, data: Any) -> int:
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(28, "No space left on device (injected)")
        return real_write(fd, memoryview(data)[:1])  # a partial write first

    def failing_writev(fd: int, buffers: Any) -> int:
        return failing_write(fd, buffers[0])

    monkeypatch.setattr(os, "write", failing_write)
    monkeypatch.setattr(os, "writev", failing_writev, raising=False)
    with pytest.raises(StoreError, match="new.*No space left"):
        store.put("new", [b"abc" * 100, b"def"])
    with pytest.raises(StoreError, match="keep.*No space left"):
        store.put("keep", b"replacement")
    monkeypatch.undo()
    assert len(calls) >= 2
    assert not store.exists("new")
    assert store.get("keep") == b"old"
    assert store.list() == ["keep"]
    assert _files_under(tmp_path) == ["keep"]  # no temp file left on disk either


def test_local_resumes_partial_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    real_write = os.write

    def trickle(fd: int, data: Any) -> int:
        return real_write(fd, memoryview(data)[:3])

    monkeypatch.setattr(os, "write", trickle)
    monkeypatch.setattr(os, "writev", lambda fd, bufs: trickle(fd, bufs[0]), raising=False)
    parts = [b"0123456789", b"", b"ab", bytearray(b"cdefgh"), memoryview(b"xyz")[1:]]
    store.put("k", parts)
    monkeypatch.undo()
    assert store.get("k") == b"0123456789abcdefghyz"


def test_local_truncated_file_is_a_short_read(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("k", b"0123456789")
    (tmp_path / "k").write_bytes(b"01234")  # truncated behind the store's back
    with pytest.raises(StoreError, match=r"\[2, 10\).* 3 byte"):
        store.get_range("k", 2, 8)
    with pytest.raises(StoreError, match="shorter"):
        store.get_range_into("k", 2, memoryview(bytearray(8)))


def test_local_stray_temp_files_are_not_listed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("d/k", b"x")
    (tmp_path / "d" / ".tmp-deadbeef").write_bytes(b"partial")
    (tmp_path / ".tmp-0").write_bytes(b"partial")
    assert store.list() == ["d/k"]


def test_local_file_where_directory_is_needed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a", b"x")
    with pytest.raises(StoreError, match="'a/b'"):
        store.put("a/b", b"y")
    assert store.list() == ["a"]


# -- S3 through fsspec (moto on loopback) ----------------------------------------------------


@pytest.mark.s3
class TestFsspecStoreS3(StoreContract):
    @pytest.fixture
    def store(self, s3_url: tuple[str, dict[str, Any]]) -> Store:
        url, options = s3_url
        return FsspecStore(url, storage_options=options)


@pytest.mark.s3
def test_s3_streamed_multipart_put(
    s3_url: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, options = s3_url
    monkeypatch.setattr(fsspec_store_module, "_JOIN_LIMIT", 0)  # force the streamed path
    store = FsspecStore(url, storage_options={**options, "default_block_size": 5 * 2**20})
    parts = [os.urandom(3 * 2**20), os.urandom(4 * 2**20), b"tail"]
    store.put("big", parts)
    assert store.size("big") == sum(len(p) for p in parts)
    assert store.get_range("big", 3 * 2**20 - 2, 4) == parts[0][-2:] + parts[1][:2]
    assert store.get("big") == b"".join(parts)


@pytest.mark.s3
def test_s3_failed_streamed_put_publishes_nothing(
    s3_url: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, options = s3_url
    monkeypatch.setattr(fsspec_store_module, "_JOIN_LIMIT", 0)
    store = FsspecStore(url, storage_options={**options, "default_block_size": 5 * 2**20})
    real_open = store.fs.open

    def open_failing_on_second_write(path: str, mode: str = "rb", **kw: Any) -> Any:
        f = real_open(path, mode, **kw)
        real_write, writes = f.write, []

        def write(data: Any) -> int:
            writes.append(1)
            if len(writes) > 1:
                raise OSError(5, "connection reset (injected)")
            return real_write(data)

        f.write = write
        return f

    monkeypatch.setattr(store.fs, "open", open_failing_on_second_write)
    for first in (b"small", os.urandom(6 * 2**20)):  # buffered only / one part already sent
        with pytest.raises(StoreError, match="injected"):
            store.put("partial", [first, b"more"])
        assert not store.exists("partial")
        assert store.list() == []
    assert not store.fs.list_multipart_uploads(url[len("s3://") :].split("/")[0])  # aborted
    monkeypatch.undo()
    store.put("partial", [b"whole", b"!"])
    assert store.get("partial") == b"whole!"


@pytest.mark.s3
def test_s3_sees_objects_written_by_another_instance(s3_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_url
    separate = {**options, "skip_instance_cache": True}  # two clients, two listing caches
    reader, writer = FsspecStore(url, separate), FsspecStore(url, separate)
    assert reader.fs is not writer.fs
    assert reader.list() == [] and not reader.exists("k")
    writer.put("k", b"v")
    assert reader.exists("k")
    assert reader.list() == ["k"]
    writer.delete("k")
    assert not reader.exists("k")
    assert reader.list() == []


@pytest.mark.s3
def test_s3_missing_bucket_is_a_store_error(s3_url: tuple[str, dict[str, Any]]) -> None:
    _, options = s3_url
    store = FsspecStore(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/root", options)
    with pytest.raises(StoreError, match="'k'"):
        store.put("k", b"x")
    assert store.list() == []


# -- open_store ------------------------------------------------------------------------------


def test_open_store_dispatch(tmp_path: Path) -> None:
    mem = MemoryStore("memory://dispatch")
    assert open_store(mem) is mem
    assert isinstance(open_store("memory://dispatch"), MemoryStore)
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(tmp_path), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s3 = open_store("s3://bucket/prefix", storage_options={"anon": True})
    assert isinstance(s3, FsspecStore) and s3.url == "s3://bucket/prefix"


def test_open_store_unknown_protocol_says_what_to_install() -> None:
    with pytest.raises(StoreError, match="no-such-proto"):
        open_store("no-such-proto://x/y")


def test_open_store_missing_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    def missing(protocol: str) -> Any:
        raise ImportError(f"Install the package for {protocol}")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(StoreError, match="pip install gcsfs"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="pip install s3fs"):
        open_store("s3://bucket/x")


def test_open_store_rejects_options_for_local(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage_options"):
        open_store(tmp_path, storage_options={"key": "x"})
    with pytest.raises(TypeError):
        open_store(42)  # type: ignore[arg-type]
