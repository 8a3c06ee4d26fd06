"""The end of a ``cluster submit``: its record (``history.RunRecord``), built once whatever the
outcome, and written to ``--summary-json`` (a file, written atomically, or ``-``: one line on
stderr), to the cluster's history in Redis (bounded by ``history_days``), to the local history
file and to the local journal.

Writing it is best effort: a record that cannot be written is a warning, never a failed run.
A run that ended with no coordinator left to record it is recorded by
``history.ended_elsewhere``.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import redis

from . import console, settings
from .broker import Broker
from .credentials import Credentials
from .destination import CHECK_ID, Destination
from .errors import ClusterError, ExitCode, Fenced, ResultNotPrinted, UsageError
from .history import (
    FailedUnit,
    LocalHistory,
    RunRecord,
    Units,
    save_locally,
    save_to_redis,
    state_of,
)
from .jobfile import Job
from .plan import host_of
from .resume import note

if TYPE_CHECKING:
    from .coordinator import Coordinator

log = logging.getLogger("cluster.history")
INTERNAL = 70  # a bug of ours (``cli.EXIT_INTERNAL``)
MAX_TRACEBACK = 4_000  # characters of a failed unit's traceback kept in its record


def exit_code_of(exc: BaseException) -> int:
    """The exit code ``cluster`` ends with when ``exc`` stops it (as ``cli.main`` maps it)."""
    if isinstance(exc, ClusterError):
        return int(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        return 128 + signal.SIGPIPE
    if isinstance(exc, redis.RedisError):
        return ExitCode.INFRA
    return INTERNAL


def error_text(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    if isinstance(exc, ClusterError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}"


class Recorder:
    """Records one submit: ``submitting`` and ``watch`` tell it what runs, and it builds and
    writes the record when its ``with`` block ends, by ``ended(exit_code)`` or an exception."""

    def __init__(self, summary: str | None, *, local: LocalHistory | None = None,
                 now: Callable[[], float] = time.time, job_name: str = "job") -> None:
        # {job}, {date}, {time} and {id} as in --output (destination.py)
        self.destination = Destination(summary, job_name, now()) \
            if summary and summary != "-" else None
        if self.destination is not None:
            parent = Path(self.destination.path(CHECK_ID)).parent
            if not parent.is_dir():
                raise UsageError(f"--summary-json {summary}: directory {parent} does not exist")
        self.summary = summary
        self.local = local or LocalHistory()
        self.now = now
        self.started = now()
        self.run = secrets.token_hex(4)
        self.job: Job | None = None
        self.creds: Credentials | None = None
        self.history_days = settings.DEFAULT_HISTORY_DAYS
        self.coordinator: Coordinator | None = None
        self.output: str | None = None  # where the result was written
        self.record: RunRecord | None = None

    def submitting(self, job: Job, creds: Credentials | None, history_days: float) -> None:
        """The job to run, on the cluster of ``creds`` (None: a private local cluster)."""
        self.job, self.creds, self.history_days = job, creds, history_days

    def watch(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and self.record is None:
            self.end(exit_code_of(exc), exc)

    def ended(self, exit_code: int) -> int:
        """The submit ends with ``exit_code``: record it, and return it."""
        self.end(exit_code, None)
        return exit_code

    def end(self, exit_code: int, exc: BaseException | None) -> RunRecord:
        self.record = record = self.build(exit_code, exc)
        if record.job:
            console.STDERR.job = record.job  # for the error line that may follow
        self.write_summary(record)
        if record.job is not None or exit_code != ExitCode.USAGE:  # else nothing ran
            self.save(record)
        return record

    def build(self, exit_code: int, exc: BaseException | None) -> RunRecord:
        c = self.coordinator if self.coordinator is not None and self.coordinator.opened \
            else None
        ended = self.now()
        output = exc.path if isinstance(exc, ResultNotPrinted) else self.output
        failed = c.tally.failed if c else 0
        return RunRecord(
            job=c.jid if c else None, run=self.run, name=self.job.name if self.job else "",
            file=self.job.path if self.job else "",
            state=state_of(exit_code, fenced=isinstance(exc, Fenced), failed_units=failed),
            exit_code=exit_code, started=console.utc(self.started), ended=console.utc(ended),
            seconds=round(ended - self.started, 3), error=error_text(exc),
            units=units_of(c) if c else Units(),
            hosts=dict(sorted(c.tally.by_host().items())) if c else {},
            failed_units=failed_units(c) if c else (),
            resumed_from=c.jid if c and c.recorded_before is not None else None,
            recorded_before=c.recorded_before if c else None,
            output=os.path.abspath(output) if output else None,
            coordinator=socket.gethostname(),
            redis=c.broker.where if c and self.creds else None, kept=c.kept if c else False)

    def write_summary(self, record: RunRecord) -> None:
        if self.summary == "-":
            sys.stderr.write(record.to_json() + "\n")
            sys.stderr.flush()
        elif self.destination is not None:
            path = self.destination.path(record.job or CHECK_ID)
            try:
                write_atomically(Path(path), record.to_json(indent=1) + "\n")
            except OSError as exc:
                log.warning("job=%s: could not write the summary to %s: %s", record.job or "-",
                            path, exc)

    def save(self, record: RunRecord) -> None:
        """To the cluster's history (a job on a running cluster), the local one, the journal."""
        if record.job and self.creds is not None:
            save_to_cluster(self.creds, record, self.history_days)
        save_locally(self.local, record)
        c = self.coordinator
        if record.job and c is not None:
            note("kept" if record.kept else record.state, record.job, c.identity, c.job.path,
                 c.broker.where)


def units_of(c: Coordinator) -> Units:
    s = c.stats
    return Units(total=c.total, done=c.tally.done, failed=c.tally.failed,
                 reissued=s.get("reissued", 0),
                 duplicates=s.get("duplicates", 0) + s.get("stale", 0),
                 speculative=s.get("speculated", 0),
                 nondeterministic=len(c.gatherer.mismatched),
                 lost_results=s.get("lost_data", 0))


def failed_units(c: Coordinator) -> tuple[FailedUnit, ...]:
    """The failed units whose errors the gatherer kept, with their host and traceback."""
    found = []
    for index, error in sorted(c.gatherer.errors.items()):
        worker = str(error.get("worker", "?"))
        found.append(FailedUnit(index, str(error.get("error", "?")), host_of(worker), worker,
                                int(error.get("attempts", 0) or 0),
                                str(error.get("traceback", ""))[-MAX_TRACEBACK:]))
    return tuple(found)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file, then a rename)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_to_cluster(creds: Credentials, record: RunRecord, history_days: float) -> None:
    try:
        broker = Broker.of(creds, timeout=2.0, socket_timeout=10.0)
    except (ClusterError, redis.RedisError) as exc:
        log.warning("job=%s: the run's record is not in the cluster's history: %s",
                    record.job, exc)
        return
    try:
        save_to_redis(broker, record, history_days)
    finally:
        broker.close()
