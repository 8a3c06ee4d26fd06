"""The record of one run, and the history of runs kept on this machine.

A ``RunRecord`` is built once, when a ``cluster submit`` ends, whatever the outcome (the
``recorder``), and written as it is to ``--summary-json``, to the cluster's history in Redis
(``Broker.save_run``, bounded by ``history_days``) and to the local history: an SQLite file,
``~/.local/state/cluster/history.sqlite`` (or ``CLUSTER_HISTORY``), which keeps the last
``LOCAL_RUNS`` runs of at most ``LOCAL_DAYS`` days, whatever cluster ran them.

A run's state is one of ``STATES``; it follows from its exit code (``state_of``). A run that
ended with no coordinator left to record it (``cluster cancel`` of a job whose coordinator is
gone) is recorded by ``ended_elsewhere``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import redis

from . import settings
from .broker import Broker
from .console import utc
from .errors import ClusterError, ExitCode

log = logging.getLogger("cluster.history")
VERSION = 1  # of the JSON form; readers ignore what they do not know
STATES = ("finished", "partial", "failed", "timed-out", "interrupted", "cancelled", "fenced")
_BY_EXIT_CODE: dict[int, str] = {ExitCode.OK: "finished", ExitCode.PARTIAL: "partial",
                 ExitCode.TIMEOUT: "timed-out", ExitCode.INTERRUPTED: "interrupted",
                 ExitCode.CANCELLED: "cancelled"}

HISTORY = Path("~/.local/state/cluster/history.sqlite")
LOCAL_RUNS = 10_000
LOCAL_DAYS = 365
REDIS_JOBS = 10_000  # jobs whose runs the cluster's history keeps at most


def state_of(exit_code: int, *, fenced: bool = False, failed_units: int = 0) -> str:
    """The state a run ended in, from its exit code: RESULT_ELSEWHERE (the result went to
    another file) is ``finished`` or ``partial``; an error with no state of its own (usage,
    job failed, infrastructure, output not written, a bug) is ``failed``; ``fenced`` wins."""
    if fenced:
        return "fenced"
    if exit_code == ExitCode.RESULT_ELSEWHERE:
        return "partial" if failed_units else "finished"
    return _BY_EXIT_CODE.get(exit_code, "failed")


@dataclass(frozen=True)
class FailedUnit:
    unit: int
    error: str
    host: str
    worker: str
    attempts: int
    traceback: str = ""


@dataclass(frozen=True)
class Units:
    """Counts of a job's units; ``done`` and the per-host counts include what runs before a
    resumed one recorded."""

    total: int | None = None  # None: scatter had not finished
    done: int = 0  # recorded or failed for good
    failed: int = 0
    reissued: int = 0
    duplicates: int = 0  # results discarded: a unit recorded twice, or late
    speculative: int = 0  # copies of straggling units
    nondeterministic: int = 0
    lost_results: int = 0  # recorded results lost with their host before fetched: recomputed


@dataclass(frozen=True)
class RunRecord:
    """One run of ``cluster submit``. ``job`` is None when it ended before a job was
    registered; one job has several runs when it was resumed (``resumed_from``)."""

    job: str | None
    run: str  # this run's id
    name: str
    file: str
    state: str
    exit_code: int
    started: str  # ISO 8601, UTC
    ended: str
    seconds: float
    error: str = ""
    units: Units = Units()
    hosts: dict[str, int] = field(default_factory=dict)  # units recorded per host
    failed_units: tuple[FailedUnit, ...] = ()  # the first 20 (``gathering``)
    resumed_from: str | None = None  # the job this run resumed (its own id)
    recorded_before: int | None = None  # resumed: units already recorded then
    output: str | None = None  # where the result was written
    coordinator: str = ""  # the host that ran the coordinator
    redis: str | None = None  # the cluster's Redis; None: a private local cluster
    kept: bool = False  # the job stays in Redis, to be resumed

    def as_dict(self) -> dict[str, Any]:
        return {"version": VERSION, **asdict(self)}

    def to_json(self, indent: int | None = None) -> str:
        """One JSON document: compact on one line, or indented by ``indent``."""
        return json.dumps(self.as_dict(), indent=indent,
                          separators=(",", ":") if indent is None else None)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunRecord:
        raw: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["units"] = Units(**_known(Units, raw.get("units") or {}))
        values["failed_units"] = tuple(FailedUnit(**_known(FailedUnit, f))
                                       for f in raw.get("failed_units") or ())
        return cls(**values)


def _known(kind: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(kind)}
    return {k: v for k, v in raw.items() if k in names}


def local_path() -> Path:
    return Path(os.environ.get("CLUSTER_HISTORY") or HISTORY).expanduser()


class LocalHistory:
    """Runs recorded on this machine, in an SQLite file that concurrent runs share (WAL, and
    a busy timeout): the last ``keep_runs`` runs of at most ``keep_days`` days."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, job TEXT, ended TEXT, "
              "record TEXT NOT NULL)", "CREATE INDEX IF NOT EXISTS runs_job ON runs (job)")

    def __init__(self, path: Path | None = None, keep_runs: int = LOCAL_RUNS,
                 keep_days: float = LOCAL_DAYS, now: Callable[[], float] = time.time) -> None:
        self.path = path or local_path()
        self.keep_runs = keep_runs
        self.keep_days = keep_days
        self.now = now

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            for statement in self.SCHEMA:
                db.execute(statement)
            with db:  # one transaction
                yield db

    def add(self, record: RunRecord) -> None:
        """Keep ``record`` and drop what is over the bounds. Raises ``OSError`` or
        ``sqlite3.Error`` when the file cannot be written."""
        oldest = utc(self.now() - self.keep_days * 86400)
        with self._db() as db:
            db.execute("INSERT INTO runs (job, ended, record) VALUES (?, ?, ?)",
                       (record.job or "", record.ended, record.to_json()))
            db.execute("DELETE FROM runs WHERE ended < ?", (oldest,))
            db.execute("DELETE FROM runs WHERE id <= (SELECT id FROM runs ORDER BY id DESC "
                       "LIMIT 1 OFFSET ?)", (self.keep_runs,))

    def recent(self, limit: int) -> list[RunRecord]:
        """The last ``limit`` runs, newest first."""
        return self._select("SELECT record FROM runs ORDER BY id DESC LIMIT ?", (limit,))

    def of_job(self, jid: str) -> list[RunRecord]:
        """The runs of job ``jid``, newest first."""
        return self._select("SELECT record FROM runs WHERE job = ? ORDER BY id DESC", (jid,))

    def _select(self, query: str, args: tuple[Any, ...]) -> list[RunRecord]:
        if not self.path.exists():
            return []
        with self._db() as db:
            rows = db.execute(query, args).fetchall()
        return [RunRecord.from_json(row[0]) for row in rows]


def save_to_redis(broker: Broker, record: RunRecord, history_days: float) -> None:
    """Add ``record`` to the cluster's history (best effort: a warning when it cannot)."""
    assert record.job is not None
    try:
        broker.save_run(record.job, record.run, record.to_json(), int(history_days * 86400e3),
                        REDIS_JOBS)
    except (ClusterError, redis.RedisError) as exc:
        log.warning("job=%s: the run's record is not in the cluster's history: %s",
                    record.job, exc)


def save_locally(local: LocalHistory, record: RunRecord) -> None:
    """Add ``record`` to this machine's history (best effort: a warning when it cannot)."""
    try:
        local.add(record)
    except (OSError, sqlite3.Error) as exc:
        log.warning("job=%s: the run's record is not in the local history %s: %s",
                    record.job or "-", local.path, exc)


def ended_elsewhere(broker: Broker, jid: str, state: str, exit_code: int, error: str = "",
                    history_days: float = settings.DEFAULT_HISTORY_DAYS) -> RunRecord | None:
    """Record a run of ``jid`` that ended with no coordinator to record it (``cluster cancel``
    of a job whose coordinator is gone: ``state`` "cancelled", exit code 8), from what the
    job's hash says; call it before the job is removed. None when the job is not in Redis."""
    found = broker.job_summaries([jid])
    if not found:
        return None
    _, fields, recorded = found[0]
    now = time.time()
    started = int(fields.get("started", 0) or 0) / 1000 or now
    total = fields.get("total")
    record = RunRecord(
        job=jid, run=secrets.token_hex(4), name=fields.get("name", ""),
        file=fields.get("path", ""), state=state, exit_code=exit_code,
        started=utc(started), ended=utc(now), seconds=round(now - started, 3),
        error=error, units=Units(total=int(total) if total else None, done=recorded),
        coordinator=fields.get("host", ""), redis=broker.where)
    save_to_redis(broker, record, history_days)
    save_locally(LocalHistory(), record)
    return record
