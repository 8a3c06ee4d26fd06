"""``cluster.Executor``: a ``concurrent.futures.Executor`` whose calls run on the cluster.

One Executor is one job: its coordinator runs in a thread of this process, and its units are
calls (``tasks``), fed to it as they are submitted. A task lost with a worker or a host is
reissued and its result recorded once, as for a job file; the Future gets it as it arrives.

    with cluster.Executor() as pool:             # a private local cluster, like cluster submit
        squares = list(pool.map(f, range(100)))
    cluster.Executor(hosts="hosts.ini")          # the cluster that cluster up started
    cluster.Executor(redis=URL) / Executor(credentials=FILE)
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Future
from concurrent.futures import Executor as BaseExecutor
from pathlib import Path
from typing import Any

from . import progress, tasks, workdir
from .broker import Broker
from .coordinator import Coordinator, RunOptions
from .credentials import Credentials, named
from .errors import UsageError
from .jobfile import Job, load_source
from .local import LocalCluster
from .scattering import WAIT
from .signing import Keyring
from .tasks import RemoteTraceback, TaskFailed

__all__ = ["BrokenCluster", "Executor", "RemoteTraceback", "TaskFailed"]

log = logging.getLogger("cluster.executor")

EVERYTHING = 1 << 62  # failed units an Executor's job tolerates: each fails its own Future
IN_FLIGHT = 4096  # calls that map() keeps submitted ahead of the one it yields
SIGNED_KEPT = 256  # functions kept pickled and signed
IDLE_WAIT_S = 0.25  # an idle coordinator's wait for a call, between its upkeep (maintain)


class BrokenCluster(BrokenExecutor):
    """The Executor's job stopped (no workers, Redis gone, a timeout...): every call not done
    fails with this, and no new call is accepted."""


Calls = list[tuple[tuple[Any, ...], dict[str, Any]]]


class _Chunk:
    """Calls of one function submitted together: one unit, one Future: of the call's value
    (``submit``), or of the calls' outcomes (``map`` with its chunks)."""

    def __init__(self, fn: Callable[..., Any], calls: Calls, single: bool) -> None:
        self.fn = fn
        self.calls = calls
        self.single = single
        self.future: Future[Any] = Future()


class Executor(BaseExecutor):
    """Run calls on the cluster. ``hosts`` (a hosts.ini), ``redis`` (a URL) or ``credentials``
    (a credentials file) name a running cluster; with none of them, a private local cluster
    starts (``cores`` workers, default every core) and stops again on ``shutdown``.

    ``max_attempts``: how many times a call that kills its worker is tried. ``timeout``:
    seconds the whole Executor may run. ``progress``: True shows on stderr what ``cluster
    submit`` shows (a bar on a terminal, else lines), or name a mode: bar, lines.
    ``directory``: shipped to the workers and put first on their ``sys.path`` (modules of
    yours that functions come from); default: the directory of the running script, none in a
    notebook or an interactive session (False: none). ``seed``: for
    ``cluster.unit_rng()`` inside calls (each call has its own stream, by its submission
    number)."""

    def __init__(self, hosts: str | None = None, *, redis: str | None = None,
                 credentials: str | None = None, cores: int | None = None,
                 max_attempts: int = 3, timeout: float | None = None,
                 progress: bool | str = False,
                 directory: str | Path | bool | None = None, seed: int = 0,
                 worker_timeout: float = 30.0) -> None:
        self._lock = threading.Condition()
        self._queue: deque[_Chunk] = deque()  # submitted, not yet given to the coordinator
        self._sent: list[_Chunk | None] = []  # by unit index; None once its result is in
        self._calls = 0  # calls numbered so far (unit_rng)
        self._first: dict[int, int] = {}  # unit index -> number of its first call
        self._closed = False
        self._pid = os.getpid()  # a child made by fork has a copy of it, not the executor
        self._broken: BaseException | None = None
        self._local: LocalCluster | None = None
        _, creds = named(hosts, redis, credentials)
        if creds is None:
            self._local = LocalCluster(cores=cores)
            creds = self._local.__enter__()
        self._creds: Credentials = creds
        try:
            self._start(creds, max_attempts, timeout, progress, directory, seed, worker_timeout)
        except BaseException:
            self._stop_local()
            raise

    def _start(self, creds: Credentials, max_attempts: int, timeout: float | None,
               progress_mode: bool | str, directory: str | Path | bool | None, seed: int,
               worker_timeout: float) -> None:
        module = load_source(tasks.SOURCE, tasks.PATH, module_name="cluster_executor_tasks")
        module.__dict__["scatter"] = lambda params: self._units()  # calls, as submitted
        archive = None
        where = _directory(directory)
        if where is not None:
            try:
                archive = workdir.pack(where / tasks.PATH, where)
            except UsageError as exc:
                raise UsageError(f"cluster.Executor: {exc.message.split(' (skip')[0]}: pass "
                                 "directory= a smaller one, or directory=False to ship "
                                 "none") from None
        job = Job(path=tasks.PATH, source=tasks.SOURCE, module=module, seed=seed,
                  archive=archive)
        options = RunOptions(seed=seed, max_attempts=max_attempts, max_failed=EVERYTHING,
                             timeout=timeout, worker_timeout=worker_timeout,
                             keep_logs_locally=self._local is not None, overlap="allow",
                             poll_ms=20)
        self._broker = Broker.of(creds, socket_timeout=15.0, retry_s=options.redis_grace_s)
        self._coordinator = Coordinator(
            self._broker, job, {}, creds.key, options,
            progress.reporter(_progress_mode(progress_mode)), deliver=self._deliver)
        # one submit (or one chunk of map) per stream entry: a call's result does not wait for
        # other calls batched with it (map's chunksize batches, as for ProcessPoolExecutor)
        self._coordinator.batcher.max_units = 1
        self._keyring = Keyring(creds.key)
        # function -> [pickle, signature], the latest used
        self._signed: OrderedDict[Callable[..., Any], Any] = OrderedDict()
        self._thread = threading.Thread(target=self._run, name="cluster-executor", daemon=True)
        self._thread.start()
        _live.add(self)

    # -- the concurrent.futures API -------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._add(fn, [(args, kwargs)], single=True).future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Results in input order. The input is read lazily: at most ``IN_FLIGHT`` calls are
        submitted ahead of the result being yielded. ``chunksize`` calls share one unit."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        end = None if timeout is None else time.monotonic() + timeout
        calls = iter(zip(*iterables, strict=False))
        window: deque[_Chunk] = deque()
        ahead = max(1, IN_FLIGHT // chunksize)

        def refill() -> None:
            while len(window) < ahead:
                batch = list(itertools.islice(calls, chunksize))
                if not batch:
                    return
                window.append(self._add(fn, [(tuple(args), {}) for args in batch],
                                        single=False))

        refill()  # work starts now, as with any Executor, not at the first next()

        def results() -> Iterator[Any]:
            try:
                while window:
                    left = None if end is None else end - time.monotonic()
                    outcomes = window[0].future.result(left)
                    window.popleft()
                    refill()
                    for item in outcomes:
                        yield tasks.value_of(item)  # a call's exception is raised here
            finally:
                for chunk in window:
                    chunk.future.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft().future.cancel()
            self._lock.notify_all()
        if wait:
            self._thread.join()
            self._stop_local()

    # -- the coordinator's side (its thread) ------------------------------------------------------

    def _add(self, fn: Callable[..., Any], calls: Calls, single: bool) -> _Chunk:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        chunk = _Chunk(fn, calls, single)
        with self._lock:
            if self._broken is not None:
                raise BrokenCluster(f"the cluster Executor stopped: {self._broken}")
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.append(chunk)
            self._lock.notify_all()  # an idle coordinator waits for this (``_units``)
        return chunk

    def _units(self) -> Iterator[Any]:
        """The units, from the first one sent (again, after Redis lost them); ``WAIT`` while
        none is submitted; the end once shut down and all sent."""
        index = 0
        while True:
            if index < len(self._sent):  # sent before: Redis lost them (``rebuild``)
                chunk = self._sent[index]
                yield {} if chunk is None else self._unit(index, chunk)
                index += 1
                continue
            with self._lock:
                if not self._queue and not self._closed and self._idle():
                    # nothing in flight: wait here for a call (not in a loop polling Redis);
                    # the coordinator's upkeep runs between these waits
                    self._lock.wait(IDLE_WAIT_S)
                chunk = self._queue.popleft() if self._queue else None
                if chunk is None and self._closed:
                    return
            if chunk is None:
                yield WAIT
            elif chunk.future.set_running_or_notify_cancel():
                self._first[index] = self._calls
                self._calls += len(chunk.calls)
                self._sent.append(chunk)
                try:
                    unit = self._unit(index, chunk)
                except Exception as exc:  # noqa: BLE001 - its arguments: the call's error
                    self._sent[index] = None
                    chunk.future.set_exception(exc)
                    unit = {}  # nothing to compute: a unit that no call is waiting for
                yield unit
                index += 1

    def _idle(self) -> bool:
        """No call sent and not yet answered."""
        return self._coordinator.idle

    def _unit(self, index: int, chunk: _Chunk) -> dict[str, Any]:
        return {"f": self._function(chunk.fn), "n": self._first[index],
                "c": [self._call(args, kwargs) for args, kwargs in chunk.calls]}

    def _function(self, fn: Callable[..., Any]) -> Any:
        try:
            found = self._signed.get(fn)
        except TypeError:  # an unhashable callable: signed each time
            return self._sign(tasks.pickled(fn, "the function"))
        if found is None:
            found = self._signed[fn] = self._sign(tasks.pickled(fn, "the function"))
            while len(self._signed) > SIGNED_KEPT:
                self._signed.popitem(last=False)
        else:
            self._signed.move_to_end(fn)
        return found

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        try:  # what pack gives, the codec carries
            return {"a": tasks.pack(args), "k": tasks.pack(kwargs)}
        except (tasks.Unpackable, RecursionError):
            return {"p": self._sign(tasks.pickled((args, kwargs), "the arguments"))}

    def _sign(self, blob: bytes) -> list[Any]:
        return [tasks.as_array(blob),
                tasks.as_array(self._keyring.sign_code(self._coordinator.jid, blob))]

    def _deliver(self, index: int, value: Any, error: dict[str, Any] | None) -> None:
        chunk = self._sent[index] if index < len(self._sent) else None
        if chunk is None:
            return
        self._sent[index] = None
        if error is not None:
            chunk.future.set_exception(TaskFailed(
                f"task {self._first.get(index, index)}: {error.get('error', 'failed')}"))
        elif not isinstance(value, list) or len(value) != len(chunk.calls):
            chunk.future.set_exception(TaskFailed(f"task {self._first.get(index, index)}: "
                                                  "its result is not what its worker sends"))
        elif not chunk.single:
            chunk.future.set_result(value)
        else:
            try:
                result = tasks.value_of(value[0])
            except BaseException as exc:  # noqa: BLE001 - the call's own exception
                chunk.future.set_exception(exc)
            else:
                chunk.future.set_result(result)
        self._first.pop(index, None)

    def _run(self) -> None:
        try:
            self._coordinator.run()
        except BaseException as exc:  # noqa: BLE001 - every waiting Future learns of it
            self._fail_all(exc)
        finally:
            self._broker.close()
            if self._closed:
                self._stop_local()

    def _fail_all(self, exc: BaseException) -> None:
        log.error("cluster Executor stopped: %s", exc)
        with self._lock:
            self._broken = exc
            running = [c for c in self._sent if c is not None]
            queued = list(self._queue)
            self._queue.clear()
        broken = BrokenCluster(f"the cluster Executor stopped: {exc}")
        for chunk in running:
            if not chunk.future.done():
                chunk.future.set_exception(broken)
        for chunk in queued:
            if chunk.future.set_running_or_notify_cancel():
                chunk.future.set_exception(broken)

    def _stop_local(self) -> None:
        with self._lock:
            local, self._local = self._local, None
        if local is not None:
            local.stop()


_live: weakref.WeakSet[Executor] = weakref.WeakSet()


def _shutdown_all() -> None:
    """At exit, as concurrent.futures does: executors not shut down finish their calls. Not
    in a child made by fork (a multiprocessing worker runs these hooks as it ends): the
    executors are its parent's."""
    for executor in list(_live):
        if executor._pid == os.getpid():
            executor.shutdown(wait=True)


threading._register_atexit(_shutdown_all)  # type: ignore[attr-defined]  # before threads join


def _progress_mode(mode: bool | str) -> str:
    """``progress=True`` shows what cluster submit shows (a bar on a terminal, else lines);
    a mode of ``--progress`` by name."""
    if mode is True:
        return "auto"
    if mode is False:
        return "none"
    if mode not in ("auto", "bar", "lines", "none"):
        raise UsageError(f"cluster.Executor: progress={mode!r}: True, False, or auto, bar, "
                         "lines, none")
    return mode


def _directory(directory: str | Path | bool | None) -> Path | None:
    """The directory to ship: the one named, none for False, else the running script's."""
    if directory is False:
        return None
    if directory is not None and directory is not True:
        return Path(directory).resolve()
    import __main__

    main = getattr(__main__, "__file__", None)
    return Path(main).resolve().parent if main else None
