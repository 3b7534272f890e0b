"""The contract every ``Store`` backend must pass (see ``ckpt/store/_base.py``).

Subclass ``StoreContract`` in a ``Test*`` class and override the ``store`` fixture to return
an empty store; every test below then runs against that backend::

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self, tmp_path):
            return MyStore(tmp_path)
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import pytest

from ckpt.errors import InvalidKeyError, ObjectNotFoundError, StoreError
from ckpt.store import Store, StoreCapabilities

#: Keys every method must refuse before touching storage.
INVALID_KEYS = [
    "",
    "../x",
    "a/../../x",
    "/abs",
    "a//b",
    "a/./b",
    ".",
    "..",
    "a/",
    "a\\b",
    "a\x00b",
    "a\nb",
    "a\n",
    "a b",
    "x" * 1025,
]

#: Prefixes ``list`` must refuse.
INVALID_PREFIXES = ["/abs", "../", "a/../", "a//", "a\\b", "a\x00", "./x"]

PAYLOAD = bytes(range(256)) * 4  # 1 KiB, every byte value


def _buffers() -> dict[str, tuple[Any, bytes]]:
    """``put`` inputs and the bytes each one must store."""
    floats = np.arange(24, dtype=np.float32).reshape(4, 6)
    wide = np.arange(64, dtype=np.uint8).reshape(8, 8)
    return {
        "bytes": (PAYLOAD, PAYLOAD),
        "bytearray": (bytearray(PAYLOAD), PAYLOAD),
        "memoryview": (memoryview(PAYLOAD), PAYLOAD),
        "memoryview-slice": (memoryview(PAYLOAD)[10:20], PAYLOAD[10:20]),
        "numpy-uint8": (np.frombuffer(PAYLOAD, dtype=np.uint8), PAYLOAD),
        "numpy-float32-2d": (floats, floats.tobytes()),
        "numpy-noncontiguous": (wide[:, ::2], wide[:, ::2].tobytes()),
        "list": (
            [b"head", bytearray(b"-"), memoryview(PAYLOAD), floats],
            b"head-" + PAYLOAD + floats.tobytes(),
        ),
        "tuple": ((b"a", b"", b"bc"), b"abc"),
        "empty-bytes": (b"", b""),
        "empty-list": ([], b""),
    }


_BUFFER_CASES = sorted(_buffers())


def _calls(key: str) -> dict[str, Callable[[Store], Any]]:
    """Every keyed method, called with ``key``."""
    return {
        "get": lambda s: s.get(key),
        "get_range": lambda s: s.get_range(key, 0, 1),
        "get_range_into": lambda s: s.get_range_into(key, 0, memoryview(bytearray(1))),
        "exists": lambda s: s.exists(key),
        "size": lambda s: s.size(key),
        "put": lambda s: s.put(key, b"x"),
        "delete": lambda s: s.delete(key),
        "delete_many": lambda s: s.delete_many([key]),
    }


class StoreContract:
    """Behaviour shared by every backend. Subclasses provide ``store`` (an empty store)."""

    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError("subclasses return an empty store from this fixture")

    # -- interface ---------------------------------------------------------------------------
    def test_capabilities(self, store: Store) -> None:
        assert isinstance(store.capabilities, StoreCapabilities)
        assert store.capabilities.atomic_put
        assert isinstance(store.url, str) and store.url
        assert store.url in repr(store)

    # -- put / get ---------------------------------------------------------------------------
    @pytest.mark.parametrize("case", _BUFFER_CASES)
    def test_round_trip(self, store: Store, case: str) -> None:
        data, expected = _buffers()[case]
        store.put("obj", data)
        assert store.get("obj") == expected
        assert store.size("obj") == len(expected)
        assert store.exists("obj")

    def test_put_copies_the_caller_buffer(self, store: Store) -> None:
        buf = bytearray(b"before")
        store.put("k", buf)
        buf[:] = b"after!"
        assert store.get("k") == b"before"

    def test_overwrite_replaces_whole_object(self, store: Store) -> None:
        store.put("k", b"a long first version")
        store.put("k", b"short")
        assert store.get("k") == b"short"
        assert store.size("k") == 5
        assert store.list() == ["k"]

    def test_large_object(self, store: Store) -> None:
        rng = np.random.default_rng(0)
        blob = rng.integers(0, 256, size=4 * 2**20 + 17, dtype=np.uint8)
        store.put("big/blob", [blob[:100], blob[100 : 2**20], blob[2**20 :]])
        assert store.size("big/blob") == blob.nbytes
        assert store.get("big/blob") == blob.tobytes()
        mid = 3 * 2**20 + 5
        assert store.get_range("big/blob", mid, 4096) == blob[mid : mid + 4096].tobytes()

    def test_missing_object(self, store: Store) -> None:
        for call in (
            lambda: store.get("nope"),
            lambda: store.get_range("nope", 0, 1),
            lambda: store.get_range_into("nope", 0, memoryview(bytearray(1))),
            lambda: store.size("nope"),
        ):
            with pytest.raises(ObjectNotFoundError, match="nope") as info:
                call()
            assert isinstance(info.value, FileNotFoundError)
        assert not store.exists("nope")

    def test_prefix_of_a_key_is_not_an_object(self, store: Store) -> None:
        store.put("dir/leaf", b"x")
        assert not store.exists("dir")
        with pytest.raises(ObjectNotFoundError):
            store.size("dir")
        with pytest.raises(ObjectNotFoundError):
            store.get("dir")
        store.delete("dir")
        store.delete_many(["dir"])
        assert store.get("dir/leaf") == b"x"

    # -- ranged reads ------------------------------------------------------------------------
    @pytest.mark.parametrize(
        "start,length",
        [(0, 10), (500, 24), (len(PAYLOAD) - 7, 7), (0, len(PAYLOAD)), (3, 0), (len(PAYLOAD), 0)],
    )
    def test_get_range(self, store: Store, start: int, length: int) -> None:
        store.put("k", PAYLOAD)
        assert store.get_range("k", start, length) == PAYLOAD[start : start + length]

    @pytest.mark.parametrize(
        "start,length",
        [(len(PAYLOAD) - 3, 4), (len(PAYLOAD), 1), (len(PAYLOAD) + 5, 1), (0, len(PAYLOAD) + 1)],
    )
    def test_get_range_past_end_raises(self, store: Store, start: int, length: int) -> None:
        store.put("k", PAYLOAD)
        with pytest.raises(StoreError, match="shorter than expected"):
            store.get_range("k", start, length)
        with pytest.raises(StoreError, match="shorter than expected"):
            store.get_range_into("k", start, memoryview(bytearray(length)))

    def test_get_range_zero_length_past_end_raises(self, store: Store) -> None:
        store.put("k", b"abc")
        with pytest.raises(StoreError):
            store.get_range("k", 4, 0)

    @pytest.mark.parametrize("start,length", [(-1, 1), (0, -1)])
    def test_get_range_rejects_negative(self, store: Store, start: int, length: int) -> None:
        store.put("k", b"abc")
        with pytest.raises(ValueError):
            store.get_range("k", start, length)

    def test_get_range_into_memoryview(self, store: Store) -> None:
        store.put("k", PAYLOAD)
        out = bytearray(100)
        store.get_range_into("k", 200, memoryview(out))
        assert bytes(out) == PAYLOAD[200:300]

    def test_get_range_into_slice_of_numpy_buffer(self, store: Store) -> None:
        store.put("k", PAYLOAD)
        big = np.full(4096, 0xEE, dtype=np.uint8)
        store.get_range_into("k", 64, memoryview(big)[1000:1512])
        assert big[1000:1512].tobytes() == PAYLOAD[64:576]
        assert (big[:1000] == 0xEE).all() and (big[1512:] == 0xEE).all()

    def test_get_range_into_typed_array(self, store: Store) -> None:
        floats = np.linspace(0, 1, 33, dtype=np.float64)
        store.put("f", [b"hdr!", floats])
        out = np.empty_like(floats)
        store.get_range_into("f", 4, memoryview(out))
        np.testing.assert_array_equal(out, floats)

    def test_get_range_into_hands_over_consecutive_pieces(self, store: Store) -> None:
        big = np.random.default_rng(3).integers(0, 256, 3 * (1 << 20) + 123, dtype=np.uint8)
        store.put("big", [b"xy", big])
        out = np.empty_like(big)
        pieces: list[bytes] = []
        store.get_range_into("big", 2, memoryview(out), on_piece=lambda p: pieces.append(bytes(p)))
        assert b"".join(pieces) == big.tobytes() == out.tobytes()

    def test_delete_prefix_removes_everything_below(self, store: Store) -> None:
        for key in ("d/s1/a", "d/s1/b/c", "d/s2/a", "e"):
            store.put(key, b"x")
        assert store.delete_prefix("d/s1/") == 2
        assert store.list() == ["d/s2/a", "e"]
        assert store.delete_prefix("d/none/") == 0

    # -- list --------------------------------------------------------------------------------
    def test_list_empty(self, store: Store) -> None:
        assert store.list() == []
        assert store.list("anything") == []
        assert store.list("a/b/") == []

    def test_list_sorted_nested_and_prefix(self, store: Store) -> None:
        keys = ["b", "a/2", "a/1", "a/10/x", "ab", "c/d/e/f", "step_1/m", "step_10/m", "step_2/m"]
        for key in keys:
            store.put(key, key.encode())
        assert store.list() == sorted(keys)
        assert store.list("a") == ["a/1", "a/10/x", "a/2", "ab"]
        assert store.list("a/") == ["a/1", "a/10/x", "a/2"]
        assert store.list("a/1") == ["a/1", "a/10/x"]
        assert store.list("a/10/") == ["a/10/x"]
        assert store.list("step_1") == ["step_1/m", "step_10/m"]
        assert store.list("step_1/") == ["step_1/m"]
        assert store.list("c/d/e/f") == ["c/d/e/f"]
        assert store.list("zzz") == []
        assert store.list("b/") == []

    def test_list_reflects_put_and_delete(self, store: Store) -> None:
        store.list()  # warm any listing cache
        store.put("x/1", b"1")
        assert store.list("x/") == ["x/1"]
        assert store.exists("x/1")
        store.delete("x/1")
        assert store.list("x/") == []
        assert not store.exists("x/1")

    def test_list_shows_no_temporary_objects(self, store: Store) -> None:
        for i in range(5):
            store.put(f"d/k{i}", [b"a" * 100, b"b" * 100])
        assert store.list() == [f"d/k{i}" for i in range(5)]

    # -- delete ------------------------------------------------------------------------------
    def test_delete_is_idempotent(self, store: Store) -> None:
        store.put("a/b/c", b"1")
        store.put("a/b/d", b"2")
        store.delete("a/b/c")
        store.delete("a/b/c")
        store.delete("never/was")
        assert not store.exists("a/b/c")
        with pytest.raises(ObjectNotFoundError):
            store.get("a/b/c")
        assert store.list() == ["a/b/d"]
        store.delete("a/b/d")
        assert store.list() == []
        store.put("a/b/c", b"3")  # the emptied "directories" can be reused
        assert store.get("a/b/c") == b"3"

    def test_delete_many(self, store: Store) -> None:
        for i in range(5):
            store.put(f"m/{i}", b"x")
        store.delete_many(["m/0", "m/2", "m/missing", "m/4"])
        assert store.list() == ["m/1", "m/3"]
        store.delete_many([])

    # -- keys --------------------------------------------------------------------------------
    @pytest.mark.parametrize("method", sorted(_calls("k")))
    def test_invalid_keys_rejected_before_io(self, store: Store, method: str) -> None:
        store.put("keep", b"1")
        for key in INVALID_KEYS:
            with pytest.raises(InvalidKeyError):
                _calls(key)[method](store)
        assert store.list() == ["keep"]

    def test_invalid_list_prefixes_rejected(self, store: Store) -> None:
        for prefix in INVALID_PREFIXES:
            with pytest.raises(InvalidKeyError):
                store.list(prefix)

    def test_odd_but_valid_keys(self, store: Store) -> None:
        keys = ["a=b", "x+y", "dot.in.name", "-lead", "_u", "..x", "v1.0/shard-00001.bin"]
        for key in keys:
            store.put(key, key.encode())
        assert store.list() == sorted(keys)
        for key in keys:
            assert store.get(key) == key.encode()

    # -- concurrency -------------------------------------------------------------------------
    def test_concurrent_puts_of_different_keys(self, store: Store) -> None:
        def work(t: int) -> None:
            for i in range(4):
                store.put(f"shard/{t}/{i}", [bytes([t]) * 1000, bytes([i]) * (t + 1)])

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(work, range(8)))
        assert store.list() == sorted(f"shard/{t}/{i}" for t in range(8) for i in range(4))
        for t in range(8):
            for i in range(4):
                assert store.get(f"shard/{t}/{i}") == bytes([t]) * 1000 + bytes([i]) * (t + 1)

    def test_concurrent_ranged_reads(self, store: Store) -> None:
        blob = os.urandom(64 * 1024)
        store.put("blob", blob)
        out = bytearray(len(blob))
        view = memoryview(out)
        barrier = threading.Barrier(8)

        def work(t: int) -> None:
            barrier.wait()
            step = len(blob) // 8
            store.get_range_into("blob", t * step, view[t * step : (t + 1) * step])

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(work, range(8)))
        assert bytes(out) == blob
