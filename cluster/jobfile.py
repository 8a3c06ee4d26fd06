"""Loading a job file and checking its contract.

A job file is a plain Python module with::

    PARAMS = {"units": 64}                # optional defaults, overridden by --param
    SEED = 0                              # optional default seed, overridden by --seed
    REQUIREMENTS = ["scipy>=1.11"]        # optional: what hosts must have (requirements.py)
    def scatter(params): yield {...}      # work units, lazily
    def compute(unit): return ...         # runs on workers
    def reduce(accumulator, result): ...  # optional: fold results as they arrive
    def count(params): return 64          # optional: how many units scatter yields (progress)
    def gather(results, params): ...      # results in scatter order (or the accumulator)
"""

from __future__ import annotations

import json
import linecache
import sys
import traceback
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from . import requirements
from .errors import JobFileError, UsageError
from .workdir import Archive

REQUIRED = ("scatter", "compute", "gather")


@dataclass(frozen=True)
class Job:
    """A loaded job file whose contract has been checked."""

    path: str
    source: str
    module: types.ModuleType
    defaults: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    archive: Archive | None = None  # its directory, packed to ship to workers
    requirements: tuple[Requirement, ...] = ()  # REQUIREMENTS, and a requirements.txt beside

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def scatter(self) -> Callable[[dict[str, Any]], Iterable[Any]]:
        scatter: Callable[[dict[str, Any]], Iterable[Any]] = self.module.scatter
        return scatter

    @property
    def compute(self) -> Callable[[Any], Any]:
        compute: Callable[[Any], Any] = self.module.compute
        return compute

    @property
    def gather(self) -> Callable[[Any, dict[str, Any]], Any]:
        gather: Callable[[Any, dict[str, Any]], Any] = self.module.gather
        return gather

    @property
    def reduce(self) -> Callable[[Any, Any], Any] | None:
        return getattr(self.module, "reduce", None)

    @property
    def count(self) -> Callable[[dict[str, Any]], int] | None:
        return getattr(self.module, "count", None)


def load_job(path: str, workdir: str | None = None) -> Job:
    """Read, compile and import a job file, with its directory (or ``workdir``) first on
    ``sys.path``, as ``python job.py`` would. Raises ``JobFileError`` naming the problem."""
    file = Path(path)
    if not file.is_file():
        raise JobFileError(path, "no such job file")
    try:
        source = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(path, f"cannot read it: {exc}") from None
    sys.path.insert(0, str(Path(workdir or file.parent).resolve()))
    module = load_source(source, path, module_name=f"cluster_job_{file.stem}")
    missing = [name for name in REQUIRED if not callable(getattr(module, name, None))]
    if missing:
        raise JobFileError(path, f"a job file must define {', '.join(missing)}() "
                                 "(see the job contract in the README)")
    defaults = getattr(module, "PARAMS", {})
    if not isinstance(defaults, dict) or not all(isinstance(k, str) for k in defaults):
        raise JobFileError(path, "PARAMS must be a dict with str keys")
    seed = getattr(module, "SEED", 0)
    if not isinstance(seed, int) or seed < 0:
        raise JobFileError(path, "SEED must be a non-negative int")
    return Job(path=path, source=source, module=module, defaults=dict(defaults), seed=seed,
               requirements=requirements.of_job(module, path))


def load_source(source: str, path: str, module_name: str, file: str | None = None
                ) -> types.ModuleType:
    """Compile and execute job code as a module (on the coordinator and on workers).
    ``path`` names it in tracebacks; ``file`` (default ``path``) is its ``__file__``."""
    try:
        code = compile(source, path, "exec")
    except SyntaxError as exc:
        where = f"{path}:{exc.lineno}" if exc.lineno else path
        raise JobFileError(where, f"syntax error: {exc.msg}") from None
    # Tracebacks show the job's lines from this source, not from whatever file (if any) is at
    # ``path`` where this process runs: a worker on another host or in another directory.
    # mtime None: linecache.checkcache leaves the entry alone.
    linecache.cache[path] = (len(source), None, source.splitlines(keepends=True), path)
    module = types.ModuleType(module_name)
    module.__file__ = file or path
    sys.modules[module_name] = module
    try:
        exec(code, module.__dict__)
    except Exception as exc:  # noqa: BLE001 - any error at import is the job file's
        del sys.modules[module_name]
        raise JobFileError(path, f"importing it failed: {type(exc).__name__}: {exc}",
                           detail=user_traceback(exc, path)) from None
    return module


def user_traceback(exc: BaseException, path: str) -> str:
    """The traceback of ``exc`` from the first frame in the job file on."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != path:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def parse_params(pairs: Iterable[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """``key=value`` strings over the job's defaults; values are JSON where they parse."""
    params = dict(defaults)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"bad --param {pair!r}: expected key=value")
        if defaults and key not in defaults:
            known = ", ".join(sorted(defaults))
            raise UsageError(f"bad --param {pair!r}: the job has no parameter {key!r} "
                             f"(it has {known})")
        try:
            params[key] = json.loads(text)
        except ValueError:
            params[key] = text
    return params
