"""Tasks of ``cluster.Executor``: calls of a function, carried as the units of a job whose code
is ``SOURCE`` (this module's ``compute`` runs them on the workers).

A unit is ``{"f": [pickle, signature], "n": first task number, "c": [call, ...]}``:

- ``f``, the function, pickled by cloudpickle (a function importable on the workers travels by
  reference, module and qualified name; a lambda, a closure or a function of ``__main__`` by
  value) and signed with the cluster's code key (Ed25519, ``signing.Keyring.sign_code``).
  Workers hold only the public half: they verify the signature, for this job, before the pickle
  is loaded, once per worker and function.
- each call, ``{"a": args, "k": kwargs}`` in the wire format (``pack``: numbers, strings, raw
  numpy buffers; tuples, sets, bytes and dicts with other keys tagged so that they come back as
  they went), or, for arguments the wire format cannot carry, ``{"p": [pickle, signature]}``,
  signed like the function.

The result of a unit is one outcome per call: ``{"v": value}`` (packed), ``{"p": pickle}`` for
a value the wire format cannot carry, or ``{"x": {"type", "message", "traceback", "p"}}`` when
the call raised. A pickled value or exception comes from a worker: it is inside the unit's
result, whose tag under the workers' key the coordinator checks before it decodes anything
(``gathering``), and is loaded only then.
"""

from __future__ import annotations

import hashlib
import traceback
from collections import OrderedDict
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from .context import current_job, running_unit, unit_seed
from .errors import ClusterError

SOURCE = '''"""The tasks of a cluster.Executor (cluster/tasks.py runs them)."""
from cluster.tasks import compute, gather, scatter
'''
PATH = "cluster-executor.py"

TUPLE, DICT, SET, FROZENSET, BYTES = "\x00t", "\x00d", "\x00s", "\x00f", "\x00b"
TAGS = (TUPLE, DICT, SET, FROZENSET, BYTES)
FUNCTIONS_KEPT = 256  # functions a worker keeps loaded (verified once each)


class TaskFailed(ClusterError):
    """A call the cluster gave up on: it killed its worker each time (``max_attempts``)."""


class RemoteTraceback(Exception):
    """The traceback of a call's exception on its worker (the exception's ``__cause__``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class Unpackable(Exception):
    """A value the wire format cannot carry as it is: it is pickled instead."""


class Refused(ClusterError):
    """A pickle in a unit whose signature does not verify under the cluster's code key: it is
    not loaded."""


def pack(value: Any) -> Any:
    """``value`` as the codec carries it, tagged so that ``unpack`` gives back the same types
    (the codec alone turns tuples into lists and refuses sets); ``Unpackable`` otherwise."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [pack(v) for v in value]
    if kind is tuple:
        return {TUPLE: [pack(v) for v in value]}
    if kind is dict:
        if all(type(k) is str and not k.startswith("\x00") for k in value):
            return {k: pack(v) for k, v in value.items()}
        return {DICT: [[pack(k), pack(v)] for k, v in value.items()]}
    if kind in (set, frozenset):
        return {SET if kind is set else FROZENSET: [pack(v) for v in value]}
    if kind is bytes:
        return {BYTES: np.frombuffer(value, dtype=np.uint8)}
    if (kind is np.ndarray or isinstance(value, np.generic)) and not value.dtype.hasobject:
        return value
    raise Unpackable(kind.__name__)


def unpack(value: Any) -> Any:
    """The inverse of ``pack``."""
    if isinstance(value, list):
        return [unpack(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == TUPLE:
            return tuple(unpack(v) for v in inner)
        if tag == DICT:
            return {unpack(k): unpack(v) for k, v in inner}
        if tag == SET:
            return {unpack(v) for v in inner}
        if tag == FROZENSET:
            return frozenset(unpack(v) for v in inner)
        if tag == BYTES:
            return np.asarray(inner, dtype=np.uint8).tobytes()
    return {k: unpack(v) for k, v in value.items()}


def as_bytes(value: Any) -> bytes:
    """Bytes that travel as a uint8 array (a pickle, a signature), back as bytes."""
    return np.asarray(value, dtype=np.uint8).tobytes()


def as_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _cloudpickle() -> ModuleType:
    """cloudpickle, imported the first time it is needed (a worker of a job file never is)."""
    import cloudpickle

    module: ModuleType = cloudpickle
    return module


# -- in the caller's process -----------------------------------------------------------------


def pickled(value: Any, what: str) -> bytes:
    """``value`` pickled to go to the workers; ``TypeError`` naming ``what`` when it cannot."""
    try:
        data: bytes = _cloudpickle().dumps(value)
    except Exception as exc:  # noqa: BLE001 - whatever pickling raises
        raise TypeError(f"{what} cannot be sent to the workers: {type(exc).__name__}: {exc}"
                        ) from None
    return data


def value_of(item: Any) -> Any:
    """A call's outcome as its caller sees it: the value, or its exception raised."""
    if "v" in item:
        return unpack(item["v"])
    if "p" in item:
        return _cloudpickle().loads(as_bytes(item["p"]))
    error = item["x"]
    exc: BaseException | None = None
    if "p" in error:
        try:
            exc = _cloudpickle().loads(as_bytes(error["p"]))
        except Exception:  # noqa: BLE001 - its class may not exist here
            exc = None
    if not isinstance(exc, BaseException):
        exc = TaskFailed(f"{error.get('type', 'Exception')}: {error.get('message', '')}")
    exc.__cause__ = RemoteTraceback(str(error.get("traceback", "")))
    raise exc


# -- on the workers ---------------------------------------------------------------------------

_functions: OrderedDict[tuple[str, bytes], Callable[..., Any]] = OrderedDict()


def load_signed(signed: Any) -> Any:
    """Unpickle ``[pickle, signature]`` once the signature verifies for the running job."""
    blob, signature = as_bytes(signed[0]), as_bytes(signed[1])
    jid, verify = current_job()
    if not verify(jid, blob, signature):
        raise Refused(f"a pickle in a unit of job {jid} is not signed with this cluster's key: "
                      "not loaded")
    return _cloudpickle().loads(blob)


def function(signed: Any) -> Callable[..., Any]:
    """The unit's function, verified and loaded once per worker (by the pickle's digest)."""
    jid, _ = current_job()
    key = (jid, hashlib.blake2b(as_bytes(signed[0]), digest_size=16).digest())
    found = _functions.get(key)
    if found is None:
        found = load_signed(signed)
        if not callable(found):
            raise Refused(f"the function of a unit of job {jid} is a {type(found).__name__}")
        _functions[key] = found
        while len(_functions) > FUNCTIONS_KEPT:
            _functions.popitem(last=False)
    else:
        _functions.move_to_end(key)
    return found


def outcome(value: Any) -> dict[str, Any]:
    try:
        return {"v": pack(value)}
    except (Unpackable, RecursionError):
        return {"p": as_array(_cloudpickle().dumps(value))}


def raised(exc: BaseException) -> dict[str, Any]:
    """A call's exception: its type, message and traceback as text, and the exception itself
    pickled where it can be."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next
                                            if exc.__traceback__ else None))
    error: dict[str, Any] = {"type": type(exc).__qualname__, "message": str(exc)[:10_000],
                             "traceback": tb[-50_000:]}
    try:
        error["p"] = as_array(_cloudpickle().dumps(exc))
    except Exception:  # noqa: BLE001 - an exception that does not pickle: its text will do
        pass
    return {"x": error}


def scatter(params: dict[str, Any]) -> list[Any]:
    return []  # the Executor's coordinator feeds it units as they are submitted


def compute(unit: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the unit's calls, in order; a call that raises gives its exception, not the unit's
    failure (it is not retried: as with any Executor, it is the call's result)."""
    fn = function(unit["f"])
    first = int(unit["n"])
    seed = unit_seed()
    outcomes = []
    for offset, call in enumerate(unit["c"]):
        try:
            if "p" in call:
                args, kwargs = load_signed(call["p"])
            else:
                args, kwargs = unpack(call["a"]), unpack(call["k"])
            with running_unit(seed, first + offset):
                value = fn(*args, **kwargs)
        except Refused:
            raise
        except Exception as exc:  # noqa: BLE001 - the call's own exception
            outcomes.append(raised(exc))
            continue
        outcomes.append(outcome(value))
    return outcomes


def gather(results: Any, params: dict[str, Any]) -> None:
    return None  # each result went to its Future as it arrived
