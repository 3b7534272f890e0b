"""Unit and property tests for ``ckpt.codecs``: round trips, checksums, hostile specs/frames."""

from __future__ import annotations

import json
from dataclasses import dataclass
import threading
from typing import Any, ClassVar

import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt import codecs
from ckpt.codecs import (
    CHECKSUM_ALGORITHMS,
    DEFAULT_CHECKSUM,
    ByteShuffle,
    Codec,
    CodecChain,
    Hasher,
    Zstd,
    checksum,
    codec_from_json,
    default_chain,
    parse_checksum,
    register_codec,
)
from ckpt.errors import CodecError

SIZES = [0, 1, 2, 3, 5, 7, 15, 16, 17, 31, 255, 4096, 4097, 65_537, 3 * (1 << 20) + 5]
ITEMSIZES = [1, 2, 4, 8, 16]


def _random_bytes(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _smooth_floats(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * np.float32(0.02)


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("itemsize", ITEMSIZES)
def test_byteshuffle_round_trip_matches_numpy_reference(size: int, itemsize: int) -> None:
    data = _random_bytes(size, seed=size)
    codec = ByteShuffle(itemsize)
    encoded = bytes(codec.encode(memoryview(data)))
    n = size // itemsize
    body = n * itemsize
    raw = np.frombuffer(data, dtype=np.uint8)
    expected = raw[:body].reshape(n, itemsize).T.tobytes() + data[body:]
    assert encoded == expected
    assert bytes(codec.decode(memoryview(encoded), decoded_size=size)) == data


def test_byteshuffle_known_vector_keeps_tail_unshuffled() -> None:
    encoded = ByteShuffle(2).encode(memoryview(b"\x01\x02\x03\x04\x05\x06\x07"))
    assert bytes(encoded) == b"\x01\x03\x05\x02\x04\x06\x07"


def test_byteshuffle_decode_rejects_wrong_size() -> None:
    with pytest.raises(CodecError, match="byteshuffle"):
        ByteShuffle(4).decode(memoryview(b"\x00" * 8), decoded_size=12)


@pytest.mark.parametrize(
    "size,level,check",
    [(size, lvl, chk) for size in SIZES for lvl, chk in [(-7, False), (1, True), (3, False)]]
    + [(size, 19, False) for size in SIZES if size < 100_000],
)
def test_zstd_round_trip(size: int, level: int, check: bool) -> None:
    data = _random_bytes(size, seed=size) if size % 2 else bytes(size)
    codec = Zstd(level=level, checksum=check)
    encoded = codec.encode(memoryview(data))
    assert zstandard.get_frame_parameters(encoded).content_size == size
    assert bytes(codec.decode(memoryview(encoded), decoded_size=size)) == data


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("itemsize", ITEMSIZES)
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_default_chain_round_trip(size: int, itemsize: int, compression: str | None) -> None:
    data = _random_bytes(size, seed=size + itemsize)
    chain = default_chain(itemsize, compression=compression, level=1)
    encoded = chain.encode(data)
    assert isinstance(encoded, memoryview)
    decoded = chain.decode(bytes(encoded), size)
    assert bytes(decoded) == data
    rebuilt = CodecChain.from_json(json.loads(json.dumps(chain.to_json())))
    assert rebuilt == chain
    assert bytes(rebuilt.decode(encoded, decoded_size=size)) == data


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "complex128", "bool"])
def test_chain_accepts_numpy_arrays_of_any_dtype(dtype: str) -> None:
    array = (np.arange(1000) % 7).astype(dtype).reshape(10, 100)
    chain = default_chain(array.itemsize, compression="zstd")
    decoded = chain.decode(chain.encode(array), array.nbytes)
    assert np.array_equal(np.frombuffer(decoded, dtype=dtype).reshape(10, 100), array)


def test_default_chain_layout() -> None:
    assert default_chain(4, compression=None).codecs == ()
    assert default_chain(1, compression="zstd").codecs == (Zstd(level=3),)
    assert default_chain(2, compression="zstd", level=1).codecs == (ByteShuffle(2), Zstd(level=1))
    with pytest.raises(CodecError, match="'lz4'"):
        default_chain(4, compression="lz4")
    with pytest.raises(CodecError, match="level"):
        default_chain(4, compression="zstd", level=99)


def test_identity_chain_does_not_copy() -> None:
    data = bytearray(b"abcdef")
    view = memoryview(data)
    chain = CodecChain(())
    assert chain.encode(view) is view
    assert chain.decode(view, 6) is view
    array = np.arange(8, dtype=np.float32)
    out = chain.encode(array)
    assert np.shares_memory(np.frombuffer(out, dtype=np.uint8), array)
    with pytest.raises(CodecError, match="6 bytes but 5"):
        chain.decode(view, 5)


def test_non_contiguous_buffer_is_refused() -> None:
    with pytest.raises(CodecError, match="C-contiguous"):
        default_chain(4, compression="zstd").encode(np.zeros((4, 4), dtype=np.float32)[:, 1])
    with pytest.raises(CodecError, match="C-contiguous"):
        checksum("crc32c", memoryview(b"abcdef")[::2])
    with pytest.raises(CodecError, match="bytes-like"):
        checksum("crc32c", "not bytes")  # type: ignore[arg-type]


def test_zstd_contexts_are_per_thread() -> None:
    chain = default_chain(4, compression="zstd", level=1)
    payloads = [_smooth_floats(50_000, seed=i).tobytes() for i in range(8)]
    results: list[bool] = [False] * len(payloads)

    def work(i: int) -> None:
        for _ in range(5):
            out = chain.decode(chain.encode(payloads[i]), len(payloads[i]))
            results[i] = bytes(out) == payloads[i]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results)


def test_byteshuffle_improves_zstd_ratio_on_smooth_floats() -> None:
    weights = _smooth_floats(1 << 20)
    plain = len(Zstd(level=3).encode(memoryview(weights)))
    shuffled = len(default_chain(4, compression="zstd").encode(weights))
    assert weights.nbytes / shuffled > weights.nbytes / plain * 1.05


# -------------------------------------------------------------------------- property tests


@given(
    data=st.binary(max_size=5000),
    itemsize=st.sampled_from(ITEMSIZES + [3, 5, 12]),
    level=st.integers(-7, 5),
    check=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_property_chain_round_trip(data: bytes, itemsize: int, level: int, check: bool) -> None:
    chain = CodecChain((ByteShuffle(itemsize), Zstd(level=level, checksum=check)))
    rebuilt = CodecChain.from_json(json.loads(json.dumps(chain.to_json())))
    assert rebuilt == chain
    assert bytes(rebuilt.decode(chain.encode(data), len(data))) == data


@given(data=st.binary(max_size=2000), itemsize=st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_property_byteshuffle_is_a_permutation(data: bytes, itemsize: int) -> None:
    codec = ByteShuffle(itemsize)
    encoded = bytes(codec.encode(memoryview(data)))
    assert sorted(encoded) == sorted(data)
    assert bytes(codec.decode(memoryview(encoded), decoded_size=len(data))) == data


@given(
    parts=st.lists(st.binary(max_size=300), max_size=8),
    alg=st.sampled_from(CHECKSUM_ALGORITHMS),
)
@settings(max_examples=200, deadline=None)
def test_property_checksum_of_parts_equals_concatenation(parts: list[bytes], alg: str) -> None:
    whole = checksum(alg, b"".join(parts))
    assert checksum(alg, parts) == whole
    assert checksum(alg, tuple(memoryview(p) for p in parts)) == whole
    hasher = Hasher(alg)
    for part in parts:
        hasher.update(part)
    assert hasher.hexdigest() == whole
    assert parse_checksum({"algorithm": alg, "value": whole}, where="c") == (alg, whole)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


_CODEC_SHAPED = st.fixed_dictionaries(
    {"name": st.sampled_from(["zstd", "byteshuffle"]), "configuration": _JSON}
)


@given(obj=_JSON | _CODEC_SHAPED)
@settings(max_examples=300, deadline=None)
def test_property_hostile_codec_json_raises_only_codec_error(obj: Any) -> None:
    try:
        codec = codec_from_json(obj)
    except CodecError:
        return
    assert codec_from_json(codec.to_json()) == codec


@given(obj=_JSON)
@settings(max_examples=200, deadline=None)
def test_property_hostile_checksum_and_chain_json_raise_only_codec_error(obj: Any) -> None:
    for parse in (lambda o: parse_checksum(o, where="c"), CodecChain.from_json):
        try:
            parse(obj)
        except CodecError:
            pass


# --------------------------------------------------------------------------------- checksums


def test_checksum_known_vectors() -> None:
    assert DEFAULT_CHECKSUM == "crc32c"
    assert checksum("crc32c", b"123456789") == "e3069283"
    assert checksum("crc32c", b"") == "00000000"
    assert checksum("xxh3_64", b"") == format(xxhash.xxh3_64_intdigest(b""), "016x")
    assert checksum("xxh3_64", b"") == "2d06800538d394c2"
    data = _random_bytes(10_000)
    assert checksum("xxh3_64", data) == xxhash.xxh3_64_hexdigest(data)


@pytest.mark.parametrize("alg,width", [("crc32c", 8), ("xxh3_64", 16)])
def test_hasher_incremental_equals_one_shot_and_is_fixed_width(alg: str, width: int) -> None:
    data = _random_bytes((1 << 20) + 3)
    hasher = Hasher(alg)
    for start in range(0, len(data), 4099):
        hasher.update(memoryview(data)[start : start + 4099])
    assert hasher.hexdigest() == checksum(alg, data)
    assert hasher.hexdigest() == checksum(alg, np.frombuffer(data, dtype=np.uint8))
    for size in range(40):
        digest = checksum(alg, data[:size])
        assert len(digest) == width and digest == digest.lower()


def test_checksum_of_numpy_array_equals_its_bytes() -> None:
    array = _smooth_floats(1001).reshape(7, 143)
    assert checksum("crc32c", array) == checksum("crc32c", array.tobytes())


def test_unknown_checksum_algorithm_names_the_known_ones() -> None:
    with pytest.raises(CodecError, match="crc32c, xxh3_64"):
        Hasher("md5")
    with pytest.raises(CodecError, match="'sha1'"):
        checksum("sha1", b"")


@pytest.mark.parametrize(
    "obj,field",
    [
        (None, "entry.checksum: expected an object"),
        (["crc32c", "e3069283"], "expected an object"),
        ({"algorithm": "crc32c"}, "missing 'value'"),
        ({"algorithm": "crc32c", "value": "e3069283", "x": 1}, "unexpected 'x'"),
        ({"algorithm": "md5", "value": "e3069283"}, "entry.checksum.algorithm"),
        ({"algorithm": 7, "value": "e3069283"}, "entry.checksum.algorithm"),
        ({"algorithm": "crc32c", "value": "E3069283"}, "entry.checksum.value"),
        ({"algorithm": "crc32c", "value": "e306928"}, "entry.checksum.value"),
        ({"algorithm": "crc32c", "value": "e30692830"}, "entry.checksum.value"),
        ({"algorithm": "crc32c", "value": "e306928g"}, "entry.checksum.value"),
        ({"algorithm": "crc32c", "value": 0xE3069283}, "entry.checksum.value"),
        ({"algorithm": "xxh3_64", "value": "e3069283"}, "16 lowercase hex"),
    ],
)
def test_parse_checksum_rejects_hostile_records(obj: object, field: str) -> None:
    with pytest.raises(CodecError, match=field.replace(".", r"\.").replace("[", r"\[")):
        parse_checksum(obj, where="entry.checksum")


# ------------------------------------------------------------------------ hostile codec specs


def _zstd_spec(**config: object) -> dict[str, object]:
    return {"name": "zstd", "configuration": {"level": 3, "checksum": False, **config}}


def _shuffle_spec(value: object) -> dict[str, object]:
    return {"name": "byteshuffle", "configuration": {"elementsize": value}}


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("zstd", "expected a codec object"),
        (["zstd"], "expected a codec object"),
        (None, "expected a codec object"),
        ({"name": "zstd"}, "missing 'configuration'"),
        ({"configuration": {}}, "missing 'name'"),
        ({"name": "lz4", "configuration": {}}, "unknown codec 'lz4'"),
        ({"name": "x" * 10_000, "configuration": {}}, "unknown codec 'xxxx"),
        ({"name": 5, "configuration": {}}, "t.name: expected a string"),
        ({"name": "zstd", "configuration": [], "extra": 1}, "unexpected 'extra'"),
        ({"name": "zstd", "configuration": []}, "t.configuration: expected an object"),
        ({"name": "zstd", "configuration": {"level": 3}}, "missing 'checksum'"),
        (_zstd_spec(x=1), "unexpected 'x'"),
        (_zstd_spec(level=23), "t.configuration.level: 23 is out of range"),
        (_zstd_spec(level=-8), "t.configuration.level"),
        (_zstd_spec(level="3"), "t.configuration.level"),
        (_zstd_spec(level=3.0), "t.configuration.level"),
        (_zstd_spec(level=True), "t.configuration.level"),
        (_zstd_spec(level=None), "t.configuration.level"),
        (_zstd_spec(checksum=0), "t.configuration.checksum"),
        (_zstd_spec(checksum="false"), "t.configuration.checksum"),
        ({"name": "byteshuffle", "configuration": {}}, "missing 'elementsize'"),
        (_shuffle_spec(0), "elementsize: 0 is out of range"),
        (_shuffle_spec(257), "elementsize: 257 is out of range"),
        (_shuffle_spec(10**30), "elementsize"),
        (_shuffle_spec(None), "elementsize"),
        (_shuffle_spec(4.0), "elementsize"),
    ],
)
def test_codec_from_json_rejects_hostile_specs(spec: object, needle: str) -> None:
    with pytest.raises(CodecError, match=needle.replace(".", r"\.")):
        codec_from_json(spec, where="t")


def test_codec_json_round_trip_and_shape() -> None:
    zstd = Zstd(level=-3, checksum=True)
    assert zstd.to_json() == {"name": "zstd", "configuration": {"level": -3, "checksum": True}}
    assert codec_from_json(zstd.to_json()) == zstd
    assert ByteShuffle(8).to_json() == {"name": "byteshuffle", "configuration": {"elementsize": 8}}


@pytest.mark.parametrize(
    "obj,needle",
    [
        ({"name": "zstd"}, "expected a list"),
        ([{"name": "zstd", "configuration": {"level": 3, "checksum": False}}] * 17, "limit of 16"),
        ([{"name": "bad"}], r"chunk\.codecs\[0\]"),
        (
            [
                {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
                {"name": "byteshuffle", "configuration": {"elementsize": 4}},
            ],
            "must be the last codec",
        ),
    ],
)
def test_chain_from_json_rejects_hostile_lists(obj: object, needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        CodecChain.from_json(obj, where="chunk.codecs")


def test_codec_constructors_validate() -> None:
    with pytest.raises(CodecError, match="Zstd.level"):
        Zstd(level=40)
    with pytest.raises(CodecError, match="Zstd.checksum"):
        Zstd(checksum="yes")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="ByteShuffle.elementsize"):
        ByteShuffle(0)
    with pytest.raises(CodecError, match="must be the last codec"):
        CodecChain((Zstd(), Zstd()))
    with pytest.raises(TypeError, match="not a Codec"):
        CodecChain(("zstd",))  # type: ignore[arg-type]


# ------------------------------------------------------------------------- hostile zstd input


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"not a zstd frame at all", _random_bytes(4096)])
def test_zstd_rejects_garbage(garbage: bytes) -> None:
    with pytest.raises(CodecError, match="zstd"):
        Zstd().decode(memoryview(garbage), decoded_size=100)
    with pytest.raises(CodecError, match="codec 1 of"):
        default_chain(4, compression="zstd").decode(garbage, 100)


def test_zstd_rejects_zip_bomb_with_declared_size() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    assert len(bomb) < 64 << 10
    with pytest.raises(CodecError, match="declares 67108864"):
        Zstd().decode(memoryview(bomb), decoded_size=1024)


@pytest.mark.parametrize("decoded_size", [0, 1024, (64 << 20) - 1])
def test_zstd_rejects_zip_bomb_without_declared_size(decoded_size: int) -> None:
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(bytes(64 << 20))
    assert zstandard.get_frame_parameters(bomb).content_size == zstandard.CONTENTSIZE_UNKNOWN
    with pytest.raises(CodecError, match="do not decompress"):
        Zstd().decode(memoryview(bomb), decoded_size=decoded_size)


def test_zstd_accepts_frame_without_declared_size_when_it_fits() -> None:
    data = _random_bytes(10_000)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert bytes(Zstd().decode(memoryview(frame), decoded_size=len(data))) == data
    with pytest.raises(CodecError, match="10000 bytes but 10001"):
        Zstd().decode(memoryview(frame), decoded_size=10_001)


@pytest.mark.parametrize("check", [False, True])
def test_zstd_rejects_truncated_and_extended_frames(check: bool) -> None:
    data = _random_bytes(100_000)
    frame = Zstd(level=3, checksum=check).encode(memoryview(data))
    for cut in (1, 3, len(frame) // 2, len(frame) - 6):
        with pytest.raises(CodecError, match="zstd"):
            Zstd().decode(memoryview(frame[:cut]), decoded_size=len(data))
    with pytest.raises(CodecError, match="zstd"):
        Zstd().decode(memoryview(frame + b"\x00\x01"), decoded_size=len(data))
    with pytest.raises(CodecError, match="zstd"):
        Zstd().decode(memoryview(frame + frame), decoded_size=len(data))


def test_zstd_checksum_detects_corruption() -> None:
    data = bytes(range(256)) * 100
    frame = bytearray(Zstd(checksum=True).encode(memoryview(data)))
    frame[-1] ^= 0xFF
    with pytest.raises(CodecError, match="zstd"):
        Zstd().decode(memoryview(frame), decoded_size=len(data))


def test_decoded_size_must_be_a_non_negative_int() -> None:
    with pytest.raises(CodecError, match=">= 0"):
        Zstd().decode(memoryview(b""), decoded_size=-1)
    with pytest.raises(TypeError, match="decoded_size"):
        CodecChain(()).decode(b"", decoded_size=1.0)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- registry


def test_register_codec_adds_a_plugin_codec() -> None:

    @register_codec
    @dataclass(frozen=True)
    class Xor(Codec):
        name: ClassVar[str] = "test-xor"
        size_preserving: ClassVar[bool] = True
        key: int = 0x5A

        def configuration(self) -> dict[str, Any]:
            return {"key": self.key}

        @classmethod
        def from_configuration(cls, config: dict[str, Any], *, where: str) -> Codec:
            return cls(key=config["key"])

        def encode(self, data: memoryview) -> bytes:
            return (np.frombuffer(data, dtype=np.uint8) ^ self.key).tobytes()

        def decode(self, data: memoryview, *, decoded_size: int) -> bytes:
            return self.encode(data)

    try:
        chain = CodecChain.from_json([Xor().to_json(), Zstd().to_json()])
        assert chain.codecs == (Xor(), Zstd())
        assert bytes(chain.decode(chain.encode(b"hello"), 5)) == b"hello"
        with pytest.raises(CodecError, match="already registered"):

            @register_codec
            class Other(Xor):
                name: ClassVar[str] = "test-xor"

    finally:
        codecs._REGISTRY.pop("test-xor", None)


def test_register_codec_rejects_bad_classes() -> None:
    with pytest.raises(TypeError, match="Codec subclass"):
        register_codec(dict)
    with pytest.raises(CodecError, match="lowercase identifier"):

        @register_codec
        class Bad(Zstd):
            name: ClassVar[str] = "Bad Name"  # type: ignore[misc]

    assert register_codec(Zstd) is Zstd
