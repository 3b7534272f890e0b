"""Manifest parsing: hostile inputs are refused field by field before any data is read."""

from __future__ import annotations

import copy
import json
from typing import Any, Callable

import pytest

from ckpt import metadata as md
from ckpt.errors import (
    ManifestError,
    ManifestTooLargeError,
    UnsafeObjectNameError,
    UnsupportedFormatVersionError,
)

SAVE_ID = "0000018c2f3a4b5c-0badcafe"


def _chunk(offsets, sizes, obj="r00000-0000.bin", byte_offset=0, itemsize=4) -> dict:
    n = itemsize
    for s in sizes:
        n *= s
    return {
        "offsets": list(offsets), "sizes": list(sizes), "object": obj, "byte_offset": byte_offset,
        "byte_length": n, "raw_length": n, "codecs": [], "checksum": {"algorithm": "crc32c", "value": "00000000"},
    }


def valid() -> dict:
    return {
        "format": md.FORMAT_NAME,
        "format_version": md.FORMAT_VERSION,
        "step": 12,
        "save_id": SAVE_ID,
        "created_unix_ns": 1_700_000_000_000_000_000,
        "world_size": 2,
        "writer": {"library": "ckpt", "version": "0.1.0"},
        "layout": None,
        "extras": {"note": "hi"},
        "tensors": {
            "w": {"dtype": "float32", "shape": [4, 3], "chunks": [_chunk((0, 0), (2, 3)), _chunk((2, 0), (2, 3), byte_offset=24)]},
            "s": {"dtype": "int64", "shape": [], "chunks": [_chunk((), (), "r00001-0000.bin", itemsize=8)]},
            "e": {"dtype": "bfloat16", "shape": [0, 5], "chunks": [_chunk((0, 0), (0, 5), itemsize=2)]},
        },
        "ranks": [
            {"$dict": [["w", {"$tensor": "w"}], ["s", {"$tensor": "s"}], ["lr", 0.1], ["nan", {"$float": "nan"}]]},
            {"$dict": [["e", {"$tensor": "e"}], [3, {"$tuple": [1, None, True]}], ["b", {"$bytes": "AAE="}]]},
        ],
    }


def _bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_valid_manifest_parses_and_reserialises_canonically() -> None:
    m = md.parse_manifest(_bytes(valid()), source="test")
    assert m.step == 12 and m.world_size == 2 and m.tensors["w"].nbytes == 48
    assert m.objects() == ["r00000-0000.bin", "r00001-0000.bin"]
    again = md.parse_manifest(m.to_bytes())
    assert again == m and again.to_bytes() == m.to_bytes()


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        *head, last = path.split("/")
        node: Any = doc
        for p in head:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


def _delete(path: str) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        *head, last = path.split("/")
        node: Any = doc
        for p in head:
            node = node[int(p)] if isinstance(node, list) else node[p]
        del node[last]
    return mutate


W0 = "tensors/w/chunks/0"
ATTACKS: dict[str, tuple[Callable[[dict], None], type, str]] = {
    # object names that try to leave the save's prefix
    "dotdot": (_set(f"{W0}/object", "../../etc/passwd"), UnsafeObjectNameError, "not a safe name"),
    "dotdot_middle": (_set(f"{W0}/object", "a/../../b"), UnsafeObjectNameError, "not a safe name"),
    "absolute": (_set(f"{W0}/object", "/etc/passwd"), UnsafeObjectNameError, "not a safe name"),
    "other_bucket": (_set(f"{W0}/object", "s3://other-bucket/x"), UnsafeObjectNameError, "not a safe name"),
    "backslash": (_set(f"{W0}/object", "..\\..\\x"), UnsafeObjectNameError, "not a safe name"),
    "empty_object": (_set(f"{W0}/object", ""), UnsafeObjectNameError, "not a safe name"),
    "nul": (_set(f"{W0}/object", "a\x00b"), UnsafeObjectNameError, "not a safe name"),
    # version and identity
    "future_version": (_set("format_version", 99), UnsupportedFormatVersionError, "upgrade ckpt"),
    "string_version": (_set("format_version", "1"), ManifestError, "format_version"),
    "not_ours": (_set("format", "torch.dcp"), ManifestError, "not a ckpt manifest"),
    "bad_save_id": (_set("save_id", "../x"), ManifestError, "save_id"),
    "negative_step": (_set("step", -1), ManifestError, "out of range"),
    "float_step": (_set("step", 1.5), ManifestError, "must be an integer"),
    "bool_step": (_set("step", True), ManifestError, "must be an integer"),
    "extra_key": (_set("pickle", "cos\nsystem\n"), ManifestError, "unknown key"),
    "missing_tensors": (_delete("tensors"), ManifestError, "missing required key"),
    "world_size_zero": (_set("world_size", 0), ManifestError, "out of range"),
    "ranks_short": (_set("ranks", []), ManifestError, "one per rank"),
    # tensors and chunks
    "unknown_dtype": (_set("tensors/w/dtype", "object"), ManifestError, "unknown dtype"),
    "huge_ndim": (_set("tensors/w/shape", [1] * 100), ManifestError, "dimensions"),
    "negative_dim": (_set("tensors/w/shape", [-4, 3]), ManifestError, "out of range"),
    "region_outside": (_set(f"{W0}/offsets", [3, 0]), ManifestError, "outside the tensor"),
    "overlap": (_set("tensors/w/chunks/1/offsets", [1, 0]), ManifestError, "overlap"),
    "gap": (_set("tensors/w/chunks", [_chunk((0, 0), (2, 3))]), ManifestError, "regions missing"),
    "raw_length_lie": (_set(f"{W0}/raw_length", 10**12), ManifestError, "raw_length"),
    "byte_length_lie": (_set(f"{W0}/byte_length", 10**12), ManifestError, "uncompressed chunk"),
    "negative_offset": (_set(f"{W0}/byte_offset", -5), ManifestError, "out of range"),
    "unknown_codec": (_set(f"{W0}/codecs", [{"name": "pickle", "configuration": {}}]), ManifestError, "pickle"),
    "codec_not_list": (_set(f"{W0}/codecs", "zstd"), ManifestError, "must be a list"),
    "bad_checksum_alg": (_set(f"{W0}/checksum", {"algorithm": "md5", "value": "00"}), ManifestError, "md5"),
    "bad_checksum_value": (_set(f"{W0}/checksum", {"algorithm": "crc32c", "value": "zz"}), ManifestError, "checksum"),
    "chunk_extra_key": (_set(f"{W0}/exec", "rm -rf /"), ManifestError, "unknown key"),
    "dims_mismatch": (_set(f"{W0}/sizes", [2]), ManifestError, "dims"),
    # state trees
    "unknown_tag": (_set("ranks/0", {"$pickle": "gASV"}), ManifestError, "unknown tag"),
    "dangling_tensor_ref": (_set("ranks/0", {"$tensor": "nope"}), ManifestError, "not a tensor of this manifest"),
    "two_key_object": (_set("ranks/0", {"$tensor": "w", "x": 1}), ManifestError, "exactly one tag"),
    "bad_float_tag": (_set("ranks/0", {"$float": "1e999"}), ManifestError, "$float"),
    "bad_dict_pairs": (_set("ranks/0", {"$dict": [["a"]]}), ManifestError, "pairs"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_hostile_manifest_is_rejected(name: str) -> None:
    mutate, exc, fragment = ATTACKS[name]
    doc = copy.deepcopy(valid())
    mutate(doc)
    with pytest.raises(exc) as err:
        md.parse_manifest(_bytes(doc), source="store://x/manifests/m.json")
    assert fragment in str(err.value)
    assert "store://x/manifests/m.json" in str(err.value)


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"\xff\xfe", "not a valid UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"format": NaN}', "not a valid"),
        (b"{" * 100000, "not a valid"),
        (b"", "not a valid"),
    ],
)
def test_garbage_bytes_are_rejected(raw: bytes, fragment: str) -> None:
    with pytest.raises(ManifestError, match=fragment):
        md.parse_manifest(raw)


def test_deeply_nested_state_tree_is_rejected() -> None:
    doc = valid()
    node: Any = 1
    for _ in range(md.MAX_TREE_DEPTH + 5):
        node = [node]
    doc["ranks"][0] = node
    with pytest.raises(ManifestError, match="nested deeper"):
        md.parse_manifest(_bytes(doc))


def test_oversized_manifest_is_refused_before_parsing() -> None:
    with pytest.raises(ManifestTooLargeError, match="over the cap"):
        md.parse_manifest(b"{" + b" " * 2000 + b"}", max_bytes=1000)


def test_too_large_manifest_is_refused_by_the_reader_before_fetching(tmp_path) -> None:
    from ckpt import _commit
    from ckpt.store import LocalStore

    store = LocalStore(str(tmp_path))
    ref = md.SaveRef(1, SAVE_ID)
    store.put(ref.manifest_key, b" " * 5000)
    with pytest.raises(ManifestTooLargeError):
        _commit.read_manifest(store, ref, max_bytes=1000)


def test_manifest_key_must_match_its_content(tmp_path) -> None:
    from ckpt import _commit
    from ckpt.store import LocalStore

    store = LocalStore(str(tmp_path))
    store.put(md.manifest_key(99, SAVE_ID), _bytes(valid()))  # content says step 12
    with pytest.raises(ManifestError, match="tampered"):
        _commit.read_manifest(store, md.SaveRef(99, SAVE_ID))


def test_keys_and_save_ids() -> None:
    ref = md.parse_manifest_key(md.manifest_key(5, SAVE_ID))
    assert ref == md.SaveRef(5, SAVE_ID)
    assert ref.data_prefix == f"data/step-000000000005.{SAVE_ID}/"
    for bad in ("manifests/step-5.x.json", "manifests/../step-000000000005.0000018c2f3a4b5c-0badcafe.json", "data/x"):
        assert md.parse_manifest_key(bad) is None
    a, b = md.new_save_id(1, 2), md.new_save_id(2, 1)
    assert a < b and len(a) == 25
