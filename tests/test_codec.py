"""The wire format: numpy travels as bytes + dtype + shape, nothing is pickled."""

import numpy as np
import pytest

from cluster import codec
from cluster.errors import CodecError


@pytest.mark.parametrize("value", [
    0, -7, 2**70, 1.5, float("inf"), "text", None, True, [1, [2, "x"]], {"a": {"b": [1.25]}},
])
def test_plain_values_round_trip(value):
    assert codec.decode(codec.encode(value)) == value
    assert codec.encode(value)[:1] == b"J"


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.int16).reshape(3, 4),
    np.linspace(0, 1, 7, dtype=np.float32),
    np.zeros((0, 3)),
    np.array([1 + 2j, 3j]),
    np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")]),
    np.arange(20.0).reshape(4, 5)[:, ::2],  # not contiguous
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    np.array([True, False]),
])
def test_arrays_round_trip_with_dtype_and_shape(array):
    back = codec.decode(codec.encode({"x": array, "n": 1}))["x"]
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    back[...] = back  # writable


def test_numpy_scalars_keep_their_type():
    for scalar in (np.float32(1.5), np.int64(-3), np.bool_(True), np.complex64(1j)):
        back = codec.decode(codec.encode(scalar))
        assert type(back) is type(scalar) and back == scalar


def test_array_bytes_are_raw_not_pickled():
    array = np.arange(1000, dtype=np.float64)
    blob = codec.encode(array)
    assert array.tobytes() in blob
    assert b"pickle" not in blob and b"\x80\x04" not in blob[:20]


@pytest.mark.parametrize("bad, words", [
    (np.array([1, "a"], dtype=object), "dtype object"),
    ({1, 2}, "set"),
    ({"f": object()}, "object"),
])
def test_unencodable_values_are_refused_clearly(bad, words):
    with pytest.raises(CodecError, match=words):
        codec.encode(bad)


def test_garbage_is_refused():
    with pytest.raises(CodecError):
        codec.decode(b"\x80\x04pickled")


def test_signatures():
    key = b"k" * 32
    sig = codec.sign(key, b"code")
    assert codec.verify(key, b"code", sig)
    assert not codec.verify(key, b"code!", sig)
    assert not codec.verify(b"x" * 32, b"code", sig)
    assert codec.fingerprint(key) != codec.fingerprint(b"x" * 32)


@pytest.mark.parametrize("bad, words", [
    ({1: 2.0}, r"dict key 1 \(int\) at the top"),
    ({"a": [{"ok": 1}, {2.5: 3}]}, r"dict key 2.5 \(float\) at \['a'\]\[1\]"),
    ([{None: 1}], r"dict key None \(NoneType\) at \[0\]"),
    ({(1, 2): "t"}, r"dict key \(1, 2\) \(tuple\)"),
])
def test_dict_keys_that_are_not_strings_are_refused_not_changed(bad, words):
    with pytest.raises(CodecError, match=words):
        codec.encode(bad)


def test_a_value_that_contains_itself_is_refused():
    loop: list = []
    loop.append(loop)
    with pytest.raises(CodecError, match="cannot encode"):
        codec.encode(loop)


def _mutations(rng: np.random.Generator, valid: list[bytes]) -> list[bytes]:
    """Random bytes, and valid encodings with bytes flipped, cut short, grown, or a header
    rewritten: what a corrupt or hostile Redis entry could hold."""
    out = [rng.bytes(int(rng.integers(0, 64))) for _ in range(500)]
    out += [b"N" + rng.bytes(int(rng.integers(0, 64))) for _ in range(500)]
    for _ in range(3000):
        blob = bytearray(valid[int(rng.integers(len(valid)))])
        kind = int(rng.integers(4))
        if kind == 0 and blob:
            for _ in range(int(rng.integers(1, 4))):
                blob[int(rng.integers(len(blob)))] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            blob = blob[:int(rng.integers(len(blob) + 1))]
        elif kind == 2:
            blob += rng.bytes(int(rng.integers(1, 32)))
        else:
            blob = bytearray(blob.replace(b"[[", b"[[-", 1).replace(b"<f8", b"|O", 1))
        out.append(bytes(blob))
    return out


HOSTILE = [
    b"N\x05\x00\x00\x00" + b'{"n":',  # header longer than the value
    b"N\xff\xff\xff\x7f{}",
    b'N\x1c\x00\x00\x00{"__nd__":[0,"<f8",[-1],false]}',
    b'N"\x00\x00\x00{"__nd__":[0,"<f8",[1000000000000],false]}',
    b'N\x1c\x00\x00\x00{"__nd__":[0,"|O",[1],false]}xxxxxxxx',
    b'N\x17\x00\x00\x00{"__nd__":[0,"<f8",[1]]}',
    b"J" + b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the parser goes
]


def test_decoding_is_total_for_corrupt_and_hostile_input():
    rng = np.random.default_rng(7)
    valid = [codec.encode(v) for v in (
        {"a": np.arange(6.0).reshape(2, 3), "b": [1, "x", np.int32(4)]}, np.zeros((0, 4)),
        np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")]), 1.5, [np.float32(2)])]
    decoded = 0
    for blob in HOSTILE + _mutations(rng, valid):
        try:
            codec.decode(blob)
            decoded += 1
        except CodecError:
            pass  # the only exception decode may raise
    assert decoded > 0  # some mutations (flipped data bytes) still decode, to other values


def test_an_owned_buffer_is_decoded_without_copying_its_arrays():
    value = {"a": np.arange(1000, dtype=np.float64), "b": [np.int32(7), "x"]}
    blob = bytearray(codec.encode(value))
    out = codec.decode(memoryview(blob), owned=True)
    assert np.array_equal(out["a"], value["a"]) and out["b"] == [7, "x"]
    assert np.shares_memory(out["a"], np.frombuffer(blob, dtype=np.uint8))
    out["a"][0] = 5.0  # writable: the caller owns it
    copied = codec.decode(bytes(blob))
    assert not np.shares_memory(copied["a"], np.frombuffer(blob, dtype=np.uint8))
    with pytest.raises(codec.CodecError):
        codec.decode(bytearray(blob[:40]), owned=True)


@pytest.mark.parametrize("size", [100, 64 * 1024, 8_000_003])
def test_a_digest_changes_with_any_byte_of_the_payload(size: int):
    payload = bytearray(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    first = codec.digest(bytes(payload))
    assert codec.digest(memoryview(payload)) == first  # however it is held
    for at in (0, size // 2, size - 1):
        changed = bytearray(payload)
        changed[at] ^= 0x01
        assert codec.digest(bytes(changed)) != first, at
    assert codec.digest(bytes(payload[:-1])) != first
