"""The only serializer: units and results on the wire, and the signature of job code.

A value is JSON for its plain parts (numbers, strings, bools, None, lists, dicts with str keys)
and raw bytes for numpy arrays and scalars, which travel as bytes + dtype + shape: nothing read
from Redis is ever unpickled. Job code is executed only when its HMAC under the cluster's key
verifies.

Wire format of one value::

    b"J" + json                                        no arrays
    b"N" + len(header) (4 bytes, little endian) + header json + array bytes...

where each array in the header is ``{"\\u0000nd": [offset, dtype descr, shape, is_scalar]}``.
Tuples arrive as lists, and non-str dict keys as str (JSON's rules); object arrays, sets and
other objects are refused with a ``CodecError``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
import warnings
import zlib
from typing import Any

import numpy as np
from numpy.lib import format as npformat

from .errors import CodecError

_ND = "\x00nd"
_JSON = b"J"
_NUMPY = b"N"


def encode(value: Any) -> bytes:
    """Encode a unit or a result. Raises ``CodecError`` naming what cannot be encoded."""
    arrays: list[np.ndarray] = []
    size = 0

    def default(obj: Any) -> dict[str, list[Any]]:
        nonlocal size
        array, scalar = _as_array(obj)
        placeholder = {_ND: [size, npformat.dtype_to_descr(array.dtype), list(array.shape), scalar]}
        arrays.append(array)
        size += array.nbytes
        return placeholder

    try:
        _check_keys(value, "")
        header = json.dumps(value, default=default, separators=(",", ":")).encode()
    except KeyError as exc:
        raise CodecError(str(exc.args[0])) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise CodecError(f"cannot encode {_describe(value)}: {exc}") from None
    if not arrays:
        return _JSON + header
    parts: list[Any] = [_NUMPY, len(header).to_bytes(4, "little"), header]
    parts.extend(a.data.cast("B") if a.nbytes else b"" for a in arrays)
    return b"".join(parts)


def decode(blob: bytes | bytearray | memoryview, owned: bool = False) -> Any:
    """Decode what ``encode`` produced. Arrays come back writable, in their own memory; with
    ``owned`` (a writable buffer that nothing else uses: a result just received), arrays are
    views of ``blob`` instead of copies. Total: whatever the input (read from Redis, so maybe
    corrupt or hostile), the only exception is ``CodecError``, and no array is allocated
    beyond what the input holds."""
    try:
        view = memoryview(blob)
        if owned and not view.readonly:
            return _decode(view.cast("B"), copy=False)
        return _decode(bytes(blob))
    except CodecError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError,
            MemoryError, AttributeError) as exc:  # json, numpy and our checks below
        raise CodecError(f"a malformed encoded value: {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from None


def _decode(blob: bytes | memoryview, copy: bool = True) -> Any:
    tag = bytes(blob[:1])
    if tag == _JSON:
        return json.loads(bytes(blob[1:]))
    if tag != _NUMPY:
        raise CodecError(f"not an encoded value (starts with {bytes(blob[:8])!r})")
    if len(blob) < 5:
        raise CodecError("a truncated encoded value")
    length = int.from_bytes(bytes(blob[1:5]), "little")
    base = 5 + length
    if base > len(blob):
        raise CodecError(f"a truncated encoded value ({len(blob)} bytes, header of {length})")

    def hook(obj: dict[str, Any]) -> Any:
        if len(obj) != 1 or _ND not in obj:
            return obj
        return _array(blob, base, obj[_ND], copy)

    return json.loads(bytes(blob[5:base]), object_hook=hook)


def _array(blob: bytes | memoryview, base: int, spec: Any, copy: bool = True) -> Any:
    """One array of an encoded value, from its header entry ``[offset, dtype, shape,
    scalar]``, checked before anything is read or allocated."""
    if not isinstance(spec, list) or len(spec) != 4:
        raise CodecError(f"a malformed array header: {str(spec)[:80]}")
    offset, descr, shape, scalar = spec
    if not isinstance(offset, int) or offset < 0 or not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise CodecError(f"a malformed array header: {str(spec)[:80]}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated dtype alias is refused, not warned of
        try:
            dtype = npformat.descr_to_dtype(descr)
        except Warning as exc:
            raise CodecError(f"an encoded array of dtype {str(descr)[:40]}: {exc}") from None
    if dtype.hasobject:
        raise CodecError(f"an encoded array of dtype {dtype}, which holds Python objects")
    count = math.prod(shape)
    if count * dtype.itemsize > len(blob) - base - offset:
        raise CodecError(f"an encoded array of shape {tuple(shape)}, dtype {dtype} larger "
                         "than its bytes")
    if count == 0 or dtype.itemsize == 0:
        array = np.zeros(shape, dtype)
    else:
        flat = np.frombuffer(blob, dtype=dtype, count=count, offset=base + offset)
        array = flat.reshape(shape).copy() if copy else flat.reshape(shape)
    return array[()] if scalar is True else array


def _check_keys(value: Any, where: str) -> None:
    """JSON would turn a key 1 into "1" without a word: refuse any key that is not a str
    (``KeyError`` with the message), naming where it is."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise KeyError(f"has a dict key {key!r} ({type(key).__name__}) at "
                               f"{where or 'the top'}: keys must be str, or they would come "
                               "back changed")
            _check_keys(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_keys(item, f"{where}[{i}]")


def _as_array(obj: Any) -> tuple[np.ndarray, bool]:
    if isinstance(obj, np.ndarray):
        array, scalar = obj, False
    elif isinstance(obj, (np.generic, complex)):
        array, scalar = np.asarray(obj), True
    else:
        raise TypeError(f"a value of type {type(obj).__name__} is not numbers, str, "
                        "lists, dicts or numpy arrays")
    if array.dtype.hasobject:
        raise TypeError(f"numpy arrays of dtype {array.dtype} hold Python objects; "
                        "use a numeric dtype")
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    return array, scalar


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a dict"
    return f"a {type(value).__name__}"


def sign(key: bytes, data: bytes) -> str:
    """HMAC-SHA256 of ``data`` under the cluster's key, hex."""
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def verify(key: bytes, data: bytes, signature: str | bytes) -> bool:
    if isinstance(signature, bytes):
        signature = signature.decode("ascii", "replace")
    return hmac.compare_digest(sign(key, data), signature)


def fingerprint(key: bytes) -> str:
    """A short public name for a key: agents and coordinators compare these, never keys."""
    return sign(key, b"cluster key fingerprint")[:16]


BLOCK_WORDS = 512  # a large payload's digest sums it in blocks of 4 KB
LARGE_DIGEST = 64 * 1024


def digest(payload: bytes | memoryview) -> bytes:
    """8 bytes that tell two encoded results apart: a CRC-32 and the length. Not a security
    hash; it only has to notice that nondeterministic compute gave a unit two different
    results, and cost little next to moving the result. A large payload's CRC is taken over
    the sums of its 4 KB blocks (64-bit words, wrapping), which any change of one value
    changes: about 0.5 ms for 8 MB here, where zlib's CRC over it all takes 3.5 ms."""
    size = len(payload)
    if size < LARGE_DIGEST:
        crc = zlib.crc32(payload)
    else:
        words = size // 8
        whole = words // BLOCK_WORDS * BLOCK_WORDS
        view = np.frombuffer(payload, dtype="<u8", count=words)
        sums = view[:whole].reshape(-1, BLOCK_WORDS).sum(axis=1, dtype=np.uint64)
        crc = zlib.crc32(sums.tobytes())
        crc = zlib.crc32(memoryview(payload)[whole * 8:], crc)
    return struct.pack("<II", crc, size & 0xFFFFFFFF)
