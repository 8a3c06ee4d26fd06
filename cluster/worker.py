"""One worker: one process on one core, one loop. Started by an agent, never by hand.

The agent passes the worker its settings and credentials as JSON on stdin (never as arguments).
Signals: SIGTERM or SIGINT asks the worker to stop after the batch it is computing (at once when
it is idle); the worker also stops when its agent goes away.

A worker runs the code of one job after another in a fresh process: once a job it ran has
finished, it exits with ``RECYCLE`` (giving back, uncharged, a delivery of another job it had
not started), and its agent starts a new worker at once. So no job's imports, globals or memory
carry over to the next.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import redis

from . import codec
from .broker import Broker
from .capture import Capture, is_ours
from .context import enter_unit, leave_unit, running_job
from .credentials import Credentials
from .entries import LogRecord, Outcome, Work
from .errors import CodecError, RedisFull, RedisUnavailable
from .loading import LoadedJob, load_job
from .outbox import Outbox
from .packing import unpack
from .proc import RECYCLE, die_with_parent
from .signing import TAG, Forged, WorkerKeys
from .spool import Spool
from .workdir import Cache, Workspace, default_cache_dir

log = logging.getLogger("cluster.worker")



class CommitAgain(Exception):
    """The commit did not go through as a whole (a large result was missing): retry it."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """A unit of a delivery: its index and, as it was queued, its sealed encoding (checked),
    or for a packed entry its decoded value; ``error`` when the packed units do not decode."""

    index: int
    sealed: bytes
    value: Any = None
    error: str = ""


class Worker:
    def __init__(self, broker: Broker, wid: str, keys: WorkerKeys, block_ms: int = 500,
                 parent: int | None = None, cache: Cache | None = None,
                 capture: Capture | None = None, spool: Spool | None = None) -> None:
        self.broker = broker
        self.outbox = Outbox(keys.sealer, wid, spool)  # how its outcomes leave it
        self.capture = capture
        self.cache = cache or Cache(default_cache_dir())
        self.workspace: Workspace | None = None  # the job directory units now run in
        self.parent = parent
        self.wid = wid
        self.keys = keys
        self.sealer = keys.sealer
        self.block_ms = block_ms
        self.jobs: dict[str, LoadedJob | None] = {}
        self.idle = True
        self.stopping = False
        self.recovering = True  # first take back what was delivered to us and not recorded
        self.unrecorded: tuple[Work, float, list[Outcome]] | None = None  # commit to retry
        self.full_since: float | None = None  # Redis refused our commit for lack of memory
        self.successes = 0  # Redis calls that went through (resets the reconnect backoff)
        self.recycle = False
        self.fresh: tuple[str, dict[int, Any]] | None = None  # a packed entry, decoded afresh

    def run(self) -> None:
        if self.unrecorded is not None:  # computed before Redis went away: commit it now
            self.commit(*self.unrecorded)
        while not self.stopping and (self.parent is None or os.getppid() == self.parent):
            self.idle = True
            work = self.broker.read_work(self.wid, self.block_ms, own=self.recovering)
            self.successes += 1
            if work is None and self.recovering:
                self.recovering = False
                continue
            self.idle = False
            if work is None:
                self.forget_finished(idle=True)
            elif work.jid not in self.jobs and self.forget_finished(idle=False):
                self.broker.give_back(self.wid)
            else:
                self.handle(work)

    def handle(self, work: Work) -> None:
        if not work.started and not work.split:
            self.broker.started(self.wid, work)
        job = self.job(work.jid)
        if job is not None:
            self.enter(job.workspace)
        started = time.perf_counter()
        if job is None or not self.current(work, job):
            outcomes = []  # the job is gone, or this entry replays one of its past
        elif work.attempt > job.max_attempts:  # each attempt killed its worker: not again
            outcomes = [self.failure(work, u, "fatal", "it was computing when its worker "
                                     f"died, {work.attempt - 1} times (last: {work.reason})",
                                     "") for u in self.genuine(work)]
        elif work.split and self.split(work):
            return
        else:
            with running_job(work.jid, self.keys.verify_code):
                outcomes = [self.run_unit(job, work, u) for u in self.genuine(work)]
        self.commit(work, time.perf_counter() - started, outcomes)

    def genuine(self, work: Work) -> list[Unit]:
        """The entry's units that its job's coordinator signed for that job (and unit); any
        other is left out (its entry is acknowledged all the same)."""
        if work.packed:
            return self.unpacked(work)
        units = []
        for index, sealed in work.units:
            try:
                self.sealer.open(sealed, "unit", work.jid, index)
                units.append(Unit(index, sealed))
            except Forged:
                log.warning("unit=%d job=%s entry %s is not signed by this cluster's key: "
                            "dropped", index, work.jid, work.msgid)
        return units

    def unpacked(self, work: Work) -> list[Unit]:
        """The units of a packed entry, decoded (``packing``)."""
        try:
            values = unpack(self.sealer, work)
        except Forged:
            log.warning("job=%s entry %s: its units are not signed by this cluster's key: "
                        "dropped", work.jid, work.msgid)
            return []
        except CodecError as exc:
            return [Unit(i, b"", error=f"unit cannot be decoded: {exc}") for i, _ in work.units]
        units = []
        for index, _ in work.units:
            if index in values:
                units.append(Unit(index, b"", values[index]))
            else:
                log.warning("unit=%d job=%s entry %s is not among its signed units: dropped",
                            index, work.jid, work.msgid)
        return units

    def unit_blob(self, work: Work, index: int) -> bytes:
        """A unit encoded and sealed on its own, as queued again (a retry, a split, a result
        lost with its host): a packed one is decoded afresh (job code may have changed the
        value it computed on) and encoded alone."""
        if not work.packed:
            return dict(work.units).get(index, b"")
        if self.fresh is None or self.fresh[0] != work.msgid:
            self.fresh = (work.msgid, unpack(self.sealer, work))
        return self.sealer.seal(codec.encode(self.fresh[1][index]), "unit", work.jid, index)

    def split(self, work: Work) -> bool:
        """Replace a packed entry whose last worker died computing it with one entry per unit
        (``packing``); False when its units cannot be split (they are then failed as they
        are)."""
        units = self.genuine(work)
        if any(u.error for u in units):
            return False
        queued = self.broker.split(work, self.wid, [  # values just decoded: nothing ran on them
            (u.index, self.sealer.seal(codec.encode(u.value), "unit", work.jid, u.index))
            for u in units])
        log.info("job=%s entry %s (attempt %d) split into %d entries, one per unit", work.jid,
                 work.msgid, work.attempt, queued)
        return True

    def current(self, work: Work, job: LoadedJob) -> bool:
        """The entry was queued (Redis server time) while its job's signature held; the
        coordinator signs anew as it keeps the job, so a newer signature is looked up once."""
        queued = int(work.msgid.partition("-")[0])
        if queued <= job.expires:
            return True
        info = self.broker.job_info(work.jid)
        fields = self.keys.job(work.jid, info) if info is not None else None
        if fields is not None:
            job.expires = int(fields["expires"] or 0)
        if queued <= job.expires:
            return True
        log.warning("job=%s entry %s was queued after the job's signature expired: dropped "
                    "(a replay)", work.jid, work.msgid)
        return False

    def commit(self, work: Work, seconds: float, outcomes: list[Outcome]) -> None:
        """Record a batch; kept for a retry if Redis is unreachable. A retry whose first try
        went through is recognised (``AGAIN``); a batch reissued meanwhile is discarded as
        stale, and compared with what was recorded."""
        self.unrecorded = (work, seconds, outcomes)
        try:
            job = self.jobs.get(work.jid)
            sealed, packed = self.outbox.seal_once(work, outcomes, self.unit_blob)
            answer = self.broker.record(work, self.wid, seconds, sealed,
                                        log_bound=job.max_log if job else 0, packed=packed)
        except RedisFull:
            self.unrecorded = (work, seconds, self.when_full(work, outcomes))
            raise
        self.unrecorded = None
        self.full_since = None
        self.successes += 1
        self.outbox.drop_spooled(answer, sealed)
        self.outbox.forget()
        if answer.status == "NOBLOB":
            self.unrecorded = (work, seconds, outcomes)
            raise CommitAgain(f"job={work.jid}: a large result did not reach Redis")
        if answer.status == "STALE":
            log.warning("job=%s: this worker lost its lease; its batch was reissued and its "
                        "results discarded; stopping to be replaced", work.jid)
            self.stopping = True
            return
        log.debug("← job=%s units=%d %s recorded=%d duplicates=%d %.3fs", work.jid,
                  len(work.units), answer.status, answer.done, answer.dups, seconds)

    def when_full(self, work: Work, outcomes: list[Outcome]) -> list[Outcome]:
        """Redis is out of memory: retry the commit for a while (the coordinator frees memory
        as it gathers), then report the units as failed (an attempt each) instead."""
        now = time.monotonic()
        self.full_since = self.full_since or now
        job = self.jobs.get(work.jid)
        wait = job.full_wait if job is not None else 60.0
        if now - self.full_since < wait:
            return outcomes
        log.error("job=%s: Redis has been out of memory for %.0f s: failing the batch",
                  work.jid, now - self.full_since)
        return [o if o.kind != "ok" else self.failure(
            work, Unit(o.index, b""), "err",
            f"Redis is out of memory: it refused the result ({len(o.payload)} bytes) for "
            f"{wait:g} s", "") for o in outcomes]

    def job(self, jid: str) -> LoadedJob | None:
        """The job's code, loaded once per worker; None when the job is gone or not signed
        with this cluster's key."""
        if jid not in self.jobs:
            self.jobs[jid] = self.load(jid)
        return self.jobs[jid]

    def enter(self, workspace: Workspace | None) -> None:
        """Run in the job's directory (leaving another job's, when they alternate)."""
        if workspace is self.workspace:
            return
        if self.workspace is not None:
            self.workspace.leave()
        if workspace is not None:
            workspace.enter()
        self.workspace = workspace

    def forget_finished(self, idle: bool) -> bool:
        """True (and this worker is to be recycled) when a job it ran has finished. Jobs it
        never loaded (gone, or not signed: a forged entry names any job id it likes) are
        forgotten: none of their code ran here."""
        for jid in [j for j, job in self.jobs.items() if job is None]:
            del self.jobs[jid]
        if not self.jobs:
            return False
        jids = list(self.jobs)
        finished = [j for j, alive in zip(jids, self.broker.jobs_exist(jids), strict=True)
                    if not alive]
        if not finished:
            return False
        log.info("job=%s finished; this worker is replaced by a fresh one", ",".join(finished))
        self.recycle = self.stopping = True
        return True

    def load(self, jid: str) -> LoadedJob | None:
        loaded = load_job(self.broker, self.keys, self.cache, jid, self.wid, self.enter)
        if loaded is not None:  # what its code wrote while being imported
            loaded.imported = self.capture.take() if self.capture else {}
        return loaded

    def run_unit(self, job: LoadedJob, work: Work, unit: Unit) -> Outcome:
        """Compute one unit; what its code wrote (and, if it failed, why) goes with it."""
        outcome = self.compute(job, work, unit)
        streams = self.capture.take() if self.capture else {}
        if job.imported:
            streams, job.imported = {"import": "".join(job.imported.values()), **streams}, {}
        if not streams and outcome.kind == "ok":
            return outcome
        error: dict[str, Any] = {} if outcome.kind == "ok" else json.loads(outcome.payload)
        record = LogRecord(unit.index, work.attempt, self.wid, time.time(), outcome.kind,
                           streams, error.get("error", ""), error.get("traceback", ""))
        payload = outcome.payload if outcome.kind == "ok" else json.dumps(
            {**error, "output": streams}).encode()
        return dataclasses.replace(outcome, payload=payload, log=record.to_json())

    def compute(self, job: LoadedJob, work: Work, unit: Unit) -> Outcome:
        index = unit.index
        if job.module is None:
            return self.failure(work, unit, "err", job.error, "")
        if unit.error:
            return self.failure(work, unit, "fatal", unit.error, "")
        try:  # a unit's tag was checked (``genuine``)
            value = codec.decode(unit.sealed[:-TAG]) if unit.sealed else unit.value
        except CodecError as exc:
            return self.failure(work, unit, "fatal", f"unit cannot be decoded: {exc}", "")
        token = enter_unit(job.seed, index)
        try:
            result = job.module.compute(value)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the job's own failure
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next
                                                    if exc.__traceback__ else None))
            log.warning("unit=%d job=%s attempt=%d raised %s: %s", index, work.jid,
                        work.attempt, type(exc).__name__, exc)
            return self.failure(work, unit, "err", f"{type(exc).__name__}: {exc}", tb)
        finally:
            leave_unit(token)
        try:
            payload = codec.encode(result)
        except CodecError as exc:
            return self.failure(work, unit, "fatal",
                                f"compute() returned a result that {exc}", "")
        if len(payload) > job.max_result:
            return self.failure(work, unit, "fatal",
                                f"its result is {len(payload) / 1e6:.1f} MB encoded, more than "
                                f"the limit of {job.max_result / 1e6:g} MB (--max-result-size)",
                                "")
        return Outcome(index, "ok", payload, digest=codec.digest(payload))

    def failure(self, work: Work, unit: Unit, kind: str, error: str, tb: str) -> Outcome:
        """A unit that failed; a retryable one (``err``) carries its unit, to be queued
        again."""
        payload = json.dumps({"error": error, "traceback": tb, "worker": self.wid,
                              "attempts": work.attempt}).encode()
        return Outcome(unit.index, kind, payload,
                       unit.sealed or (self.unit_blob(work, unit.index) if kind == "err"
                                       else b""))


def main() -> int:
    """Entry point of a worker process: ``python -m cluster.worker`` with JSON on stdin."""
    die_with_parent(signal.SIGKILL)
    raw = sys.stdin.read()
    if not raw.strip():
        return 0  # its agent went away before it sent the configuration: nothing to do
    config: dict[str, Any] = json.loads(raw)
    parent = int(config["agent_pid"])
    capture = Capture()  # from here on, fds 1 and 2 are job code's, caught per unit
    logging.basicConfig(level=config.get("log_level", "INFO"), stream=capture.install(),
                        format=f"%(asctime)s {config['wid']} %(levelname)s %(message)s")
    logging.getLogger().handlers[0].addFilter(is_ours)
    logging.getLogger().addHandler(capture.records)
    creds = Credentials.from_json(json.dumps(config["credentials"]), "stdin")
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if worker is None or worker.idle:
            raise SystemExit(0)
        worker.stopping = True

    worker: Worker | None = None
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    broker = connect(creds, parent)
    if broker is None:
        return 0
    cache = Cache(Path(config["cache_dir"])) if config.get("cache_dir") else None
    keys = WorkerKeys.from_json(config["keys"])
    worker = Worker(broker, config["wid"], keys, block_ms=config.get("block_ms", 500),
                    parent=parent, cache=cache, capture=capture,
                    spool=Spool.from_json(config.get("spool")))
    worker.stopping = stopping
    return run_forever(worker, parent)


def connect(creds: Credentials, parent: int) -> Broker | None:
    """Connect to Redis, retrying with backoff and jitter while the agent lives (a worker
    that cannot connect must not crash-loop); None when the agent went away."""
    delay = 0.1
    while os.getppid() == parent:
        try:
            return Broker.of(creds, socket_timeout=10)
        except RedisUnavailable as exc:
            log.warning("cannot reach Redis (%s); retrying", exc)
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 2.0)
    return None


def run_forever(worker: Worker, parent: int) -> int:
    """Run, riding out Redis outages and lost replies, until asked to stop, orphaned or
    recycled. The reconnect delay starts small again once Redis answered."""
    delay, seen = 0.05, -1
    while (not worker.stopping or worker.unrecorded) and os.getppid() == parent:
        try:
            worker.run()
        except (redis.ConnectionError, redis.TimeoutError, RedisUnavailable,
                CommitAgain) as exc:
            if worker.successes != seen:
                delay, seen = 0.05, worker.successes
            worker.recovering = True
            log.warning("Redis unavailable (%s); retrying in %.2fs", exc, delay)
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 1.0)
    return RECYCLE if worker.recycle else 0


def _main() -> int:
    """``main``, with a crash logged where the agent's log goes (fds 1 and 2 are job code's)."""
    try:
        return main()
    except Exception:
        log.critical("worker crashed", exc_info=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(_main())
