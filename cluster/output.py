"""Showing and saving what ``gather`` returned.

stdout carries the result alone (``--print``): as text on a terminal, as one JSON document
otherwise. Its JSON form is the one ``--output FILE.json`` writes: numpy arrays as nested
lists, numpy scalars as numbers, tuples as lists, and NaN and +-infinity as ``null`` (JSON has
no form for them; Python's ``NaN``/``Infinity`` are not JSON). Values JSON cannot hold at all
(complex numbers, sets, non-str dict keys, other objects) have no JSON form.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout, suppress
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

from . import settings
from .errors import UsageError

FORMATS = (".npy", ".npz", ".json", ".png")
PRINT_MODES = settings.PRINT_MODES

MAX_PRINT_ELEMENTS = 1_000_000
"""The most elements (array elements, numbers and strings, in total) printed as JSON on stdout.
A larger result is written to a file instead: a pipe is no place for hundreds of megabytes."""

_JSON_KINDS = "biuf"  # numpy dtype kinds with a JSON form: bool, int, uint, float


class _NoJsonForm(ValueError):
    """A part of the value that JSON cannot hold; the message names it."""


def render(value: Any, full: bool = False) -> str:
    """A readable text form of a result, for the terminal; ``full`` shows every array element
    (for a file) instead of the corners of a large array."""
    if isinstance(value, np.ndarray):
        text = np.array2string(value, threshold=sys.maxsize if full else 64, edgeitems=3,
                               max_line_width=100)
        return f"array of shape {value.shape}, dtype {value.dtype}:\n{text}"
    if isinstance(value, dict):
        return "\n".join(f"{k}: {render(v, full)}" for k, v in value.items())
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def print_mode(asked: str, terminal: bool) -> str:
    """What ``--print asked`` prints: ``auto`` is ``text`` on a terminal and ``json`` otherwise
    (a pipe, a file); ``json``, ``text`` and ``none`` are themselves."""
    if asked == "auto":
        return "text" if terminal else "json"
    return asked


def print_problem(value: Any, cap: int = MAX_PRINT_ELEMENTS) -> str | None:
    """Why ``value`` is not printed as JSON, or None when it is: it has more than ``cap``
    elements, or a part with no JSON form."""
    try:
        count = json_elements(value)
    except _NoJsonForm as exc:
        return str(exc)
    if count > cap:
        return f"{count:,} elements, more than the {cap:,} printed as JSON"
    return None


def json_elements(value: Any) -> int:
    """The elements of ``value``: each number, string, bool or None counts one, an array its
    size. Raises ``_NoJsonForm`` at the first part that has no JSON form."""
    if isinstance(value, dict):
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:
            raise _NoJsonForm(f"dict key {bad!r} ({type(bad).__name__}) has no JSON form "
                              "(JSON keys are strings)")
        return sum(json_elements(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(json_elements(v) for v in value)
    if value is None or isinstance(value, (str, int, float)):  # also numpy's str_ and float64
        return 1
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.kind not in _JSON_KINDS:
            raise _NoJsonForm(f"a {value.dtype} {'array' if value.ndim else 'scalar'} "
                              "has no JSON form")
        return int(value.size)
    raise _NoJsonForm(f"a {type(value).__name__} has no JSON form")


def to_json(value: Any) -> str:
    """``value`` as one compact JSON document (see the module docstring for the mapping).
    Raises ``ValueError`` when it has no JSON form (``print_problem`` says why first)."""
    json_elements(value)
    return json.dumps(_jsonable(value), separators=(",", ":"), allow_nan=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _array_jsonable(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _array_jsonable(array: np.ndarray) -> Any:
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            boxed = array.astype(object)
            boxed[~finite] = None
            return boxed.tolist()
    return array.tolist()


def show(value: Any, mode: str, stream: TextIO) -> str | None:
    """Print ``value`` to ``stream`` as ``mode`` (``json``, ``text`` or ``none``). Returns why
    nothing was printed when JSON was asked and ``print_problem`` refuses the value."""
    if mode == "json":
        problem = print_problem(value)
        if problem is not None:
            return problem
        text = to_json(value)
    elif mode == "text":
        text = render(value)
    else:
        return None
    print(text, file=stream, flush=True)
    return None


def keep(stem: str, value: Any) -> Path:
    """Write a result that was not printed (or not written where asked) to ``stem`` plus a
    suffix that fits it, in the current directory, else (not writable) in the temporary
    directory."""
    name = keep_name(stem, value)
    try:
        return write(name, value)
    except OSError:
        return write(str(Path(tempfile.gettempdir()) / name), value)


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """While inside, what is written to stdout goes to stderr: a job's prints in this process
    (at import, in scatter or gather), writes of C code to file descriptor 1, and the output of
    the processes started inside (a local cluster's agent and workers, which run compute).
    stdout is left for the result alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def check_path(path: str) -> None:
    """Refuse an output file we could not write before the job runs, not after: an unknown
    format, a directory that is missing or not writable (a file is created in it and removed),
    a directory in the file's place, PNG without pypng."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"--output {path}: unknown format {suffix or '(none)'}; "
                         f"use one of {', '.join(FORMATS)}")
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"--output {path}: directory {parent} does not exist")
    if target.is_dir():
        raise UsageError(f"--output {path}: is a directory")
    problem = _unwritable(parent)
    if problem:
        raise UsageError(f"--output {path}: cannot write in {parent}: {problem}")
    if suffix == ".png":
        _png()


def _unwritable(directory: Path) -> str | None:
    """Why no file can be created in ``directory``, or None. A file is created and removed:
    unlike ``os.access``, that also answers for root, a read-only mount or a full inode table,
    and with the system's own reason."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".cluster-probe-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def _png() -> Any:
    try:
        import png
    except ImportError:
        raise UsageError("writing PNG needs pypng: pip install 'cluster[png]'") from None
    return png


def write(path: str, value: Any) -> Path:
    """Write ``value`` in the format the suffix names, atomically (``write_atomically``). When
    the value does not fit that format (``misfit`` says why) it is written next to it in the
    first of JSON, .npy and text that holds it (``FILE.json``, ``FILE.npy``, ``FILE.txt``):
    never lost. Returns the path written."""
    target = fitting(path, value)
    writer = _WRITERS[target.suffix.lower()]
    write_atomically(target, lambda file: writer(file, value))
    return target


def fitting(path: str, value: Any) -> Path:
    """The file ``write`` writes ``value`` to: ``path``, or ``path`` plus the suffix of the
    first of JSON, .npy and text that holds it."""
    target = Path(path)
    asked = target.suffix.lower()
    suffix = next(s for s in (asked, ".json", ".npy", ".txt") if _FITS[s](value))
    return target if suffix == asked else target.with_suffix(target.suffix + suffix)


def write_atomically(target: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Write ``target`` through a temporary file in its directory (``.NAME.tmp-PID``): ``fill``
    writes it, it is flushed to disk and renamed over ``target``. A reader sees the previous
    file or the new one, never part of one; on any failure the temporary file is removed and
    the previous file is left as it was. The new file keeps the previous one's permissions."""
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with temporary.open("wb") as file:
            fill(file)
            file.flush()
            os.fsync(file.fileno())
        with suppress(OSError):
            os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(temporary, target)
    except BaseException:
        with suppress(OSError):
            temporary.unlink()
        raise
    _sync_directory(target.parent)


def _sync_directory(directory: Path) -> None:
    """Make the rename itself durable (best effort: not every file system allows it)."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def misfit(path: str, value: Any) -> str | None:
    """Why ``value`` does not fit the format ``path`` names (``write`` then writes it beside,
    as ``FILE.json``...), or None when it fits."""
    suffix = Path(path).suffix.lower()
    if _FITS[suffix](value):
        return None
    if suffix == ".json":
        return print_problem(value, cap=sys.maxsize)
    return f"a {suffix} file holds {_HOLDS[suffix]}, and the result is {_describe(value)}"


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return f"a {type(value).__name__}"


def keep_name(stem: str, value: Any) -> str:
    """A file name for keeping ``value`` that was not printed: ``stem.npy`` for an array,
    ``stem.npz`` for a dict of arrays, else ``stem.json`` (``write`` may still add a suffix)."""
    if _array_like(value):
        return f"{stem}.npy"
    if isinstance(value, dict) and value and all(map(_array_like, value.values())):
        return f"{stem}.npz"
    return f"{stem}.json"


def _array_like(value: Any) -> bool:
    try:
        return np.asarray(value).dtype.kind in "biufcmM?"
    except (ValueError, TypeError):
        return False


def _image(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.ndim in (2, 3) and value.dtype == np.uint8


def _has_json_form(value: Any) -> bool:
    try:
        json_elements(value)
    except _NoJsonForm:
        return False
    return True


def _write_npz(file: BinaryIO, value: dict[Any, Any]) -> None:
    arrays: dict[str, Any] = {str(k): np.asarray(v) for k, v in value.items()}
    np.savez(file, **arrays)


def _write_png(file: BinaryIO, image: np.ndarray) -> None:
    png = _png()
    rows = image.reshape(image.shape[0], -1)
    greyscale = image.ndim == 2
    planes = 1 if greyscale else image.shape[2]
    png.Writer(image.shape[1], image.shape[0], greyscale=greyscale,
               alpha=planes in (2, 4), bitdepth=8).write(file, rows.tolist())


_FITS: dict[str, Callable[[Any], bool]] = {
    ".npz": lambda v: isinstance(v, dict), ".npy": _array_like, ".png": _image,
    ".json": _has_json_form, ".txt": lambda v: True}
_HOLDS = {".npz": "a dict of arrays", ".npy": "an array (or numbers)",
          ".png": "a 2-D or 3-D uint8 array (an image)"}
_WRITERS: dict[str, Callable[[BinaryIO, Any], object]] = {
    ".npz": _write_npz,
    ".npy": lambda file, v: np.save(file, np.asarray(v)),
    ".png": lambda file, v: _write_png(file, np.asarray(v)),
    ".json": lambda file, v: file.write((to_json(v) + "\n").encode()),
    ".txt": lambda file, v: file.write((render(v, full=True) + "\n").encode()),
}
