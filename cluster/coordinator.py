"""The coordinator: scatter units through Redis, track them, reissue lost ones, gather results.

Decisions (batch size, how far scatter may run ahead) come from ``plan.py``; this module does the
I/O around them. ``clock`` is injectable so tests decide time instead of sleeping.

What it survives:
- Redis unreachable, or a reply lost, for up to ``redis_grace_s``: every step that touches Redis
  runs in ``guarded``, which repeats it; a step changes local state only after the I/O it
  depends on succeeded (the results cursor moves last, building a batch does no I/O), and
  batches it was sending are reconciled with the job's ``scattered`` counter, so none is queued
  twice or lost.
- Redis losing its data (restarted without persistence, flushed): the job's hash is gone; the
  job is registered again and every unit not yet gathered is queued again. Redis losing its
  last writes (back from an older state): the units it lost are queued again
  (``scattering.py``, which holds the sending side).
- Its own death: the job stays in Redis (``keep_s``) and a new coordinator resumes it
  (``resume.py``); a coordinator whose job was taken over is fenced and stops. Results leave
  Redis once gathered, so the new coordinator has the units whose results died with the old
  one computed again (``catch_up``).
- A failed write of its result: with ``write`` (``--output``), the result is written before the
  job leaves Redis, and kept there (``keep_final``) while it is written: when the write fails,
  the job stays, and a re-run delivers the kept result without computing anything (``deliver``).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from . import codec, dataserver
from .broker import Broker
from .entries import Snapshot
from .errors import (
    ClusterError,
    CodecError,
    Fenced,
    InfraError,
    JobCancelled,
    JobFailed,
    JobGone,
    JobTimeout,
    NoWorkers,
    OutputFailed,
    RedisUnavailable,
)
from .gathering import Gatherer
from .heartbeat import Heartbeat
from .jobfile import Job, user_traceback
from .joblogs import Follower, save_local
from .plan import Batcher, Tally, speculation_threshold_ms
from .progress import NoReporter, Reporter
from .results import Deliver, Results, RunResult
from .resume import Limits, Overlap, note, open_job, signed
from .scattering import Scattering
from .signing import Keyring
from .watching import Watch

log = logging.getLogger("cluster.coordinator")
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, RedisUnavailable)
# writes the result: (value, job id, why it is not kept in Redis or None); ``OutputFailed``
Write = Callable[[Any, str, str | None], None]


@dataclass(frozen=True)
class RunOptions:
    seed: int | None = None  # None: the job file's SEED
    max_attempts: int = 3
    max_failed: int = 0
    timeout: float | None = None
    worker_timeout: float = 30.0
    lease_s: float = 5.0
    maintain_every_s: float = 0.5
    redis_grace_s: float = 60.0
    keep_s: int = 86400  # an unfinished job stays resumable this long
    max_result_bytes: int = 256_000_000  # an encoded unit (or result) larger than this is refused
    speculate: bool = True
    resume: str | None = None  # a job id to resume
    auto_resume: bool = False  # resume the unfinished job of the same identity, if any
    fresh: bool = False  # --fresh: an unfinished job of the same identity is removed, not resumed
    max_log_bytes: int = 32_000_000  # what job code wrote, kept in Redis for the whole job
    stream_logs: bool = False  # show what job code writes on stderr as it arrives (--logs)
    keep_logs_locally: bool = False  # a private local cluster: its Redis ends with the run
    overlap: str = "forbid"  # what to do about a live run of the same job (control.settle)
    poll_ms: int = 100  # how long a step waits for results (cluster.Executor: less)
    name: str | None = None  # --name: the job goes by this name, for --overlap and resume

    @property
    def redis_outlives_run(self) -> bool:
        """A running cluster keeps a job for a later run; a private local one ends with it."""
        return not self.keep_logs_locally


class Coordinator:
    def __init__(self, broker: Broker, job: Job, params: dict[str, Any], key: bytes,
                 options: RunOptions, reporter: Reporter | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 deliver: Deliver | None = None) -> None:
        self.broker = broker
        self.job = job
        self.params = params
        self.key = key
        self.keyring = Keyring(key)
        self.sealer = self.keyring.sealer
        self.watch = Watch(broker, self.keyring, int(options.lease_s * 1000),
                           options.worker_timeout)
        self.data = dataserver.Client(self.keyring.for_workers().message,
                                      local=self.watch.local_spools)
        self.description: dict[str, Any] = {}  # the job's signed fields (``resume.describe``)
        self.options = options
        self.reporter = reporter or NoReporter()
        self.clock = clock
        self.seed = job.seed if options.seed is None else options.seed
        self.jid = secrets.token_hex(6)
        self.owner = secrets.token_hex(8)
        self.identity = ""
        self.tally = Tally()
        self.batcher = Batcher()
        self.results = Results(job.reduce, deliver)
        self.sending = Scattering(job, params, self.tally, self.batcher, self.results,
                                  self.sealer, options.max_result_bytes, self.user_error)
        self.snapshot: Snapshot | None = None  # resumed: recorded units at the takeover
        self.recorded_before: int | None = None  # resumed: units recorded by earlier runs
        self.kept = False  # ended, but the job stays in Redis to be resumed
        self.gatherer = Gatherer(broker, self.results, self.tally, self.batcher,
                                 options.max_failed, lambda exc: self.user_error("reduce()", exc),
                                 clock, self.sealer,
                                 units=lambda: self.sending.known,
                                 data=self.data)
        self.opened = False
        self.lost = False  # Redis lost the job: rebuild it before anything else
        self.stats: dict[str, int] = {}
        self.started = 0.0
        self.next_maintenance = 0.0
        self.next_expiry = 0.0
        self.no_worker_since: float | None = None
        self.redis_down_since: float | None = None
        self.follower: Follower | None = None
        self.heartbeat = Heartbeat(broker, lambda: (self.jid, self.owner))
        self.final: bytes | None = None  # resumed: the result a previous run kept, encoded

    def run(self, write: Write | None = None) -> RunResult:
        """Run the job to its end; with ``write``, deliver its result before it leaves Redis."""
        self.started = self.clock()
        try:
            self.guarded(lambda: self.open(self.options.resume))
            self.heartbeat.start()
            if self.final is None:
                self.guarded(self.catch_up)
                self.wait_for_workers()
                self.sending.start()
                self.reporter.begin(self.jid, self.recorded_before, self.total)
                while not self.tally.finished:
                    self.guarded(self.step)
                value = self.finish()
            else:
                value = codec.decode(self.final)
            self.guarded(self.fetch_stats)
            if write is not None:
                self.deliver(value, write)
        except OutputFailed:
            raise  # deliver kept the job, or removed a private cluster's
        except (JobFailed, JobTimeout, JobCancelled, KeyboardInterrupt):
            self.heartbeat.stop()
            self.close(purge=True)
            raise
        except ClusterError as exc:  # infrastructure: keep a started job for --resume
            if isinstance(exc, Fenced):
                raise
            resumable = self.kept = self.options.auto_resume and self.sending.sent > 0
            self.close(purge=not resumable)
            if resumable:
                exc.message += f" (job {self.jid} is kept in Redis: run the same command " \
                               f"again, or add --resume {self.jid})"
            raise
        finally:
            self.heartbeat.stop()
            self.reporter.close()
            self.data.close()
        self.close(purge=True)
        return RunResult(self.jid, value, self.tally, self.clock() - self.started, self.stats,
                         sorted(self.gatherer.failed), sorted(self.gatherer.mismatched),
                         reused=self.final is not None)

    def step(self) -> None:
        self.check_deadline()
        self.fill()
        self.gatherer.collect(block_ms=self.options.poll_ms)
        self.reporter.update(self.tally.done, self.total, self.stats.get("reissued", 0))
        self.maintain()
        if self.options.stream_logs:
            self.show_logs()

    def show_logs(self) -> None:
        """``--logs``: what job code wrote, on stderr, as it arrives."""
        if self.follower is None or self.follower.jid != self.jid:
            self.follower = Follower(self.broker, self.jid)
        for record in self.follower.poll():
            for line in record.lines():
                self.reporter.write(line)

    def keep_logs(self) -> None:
        """Before the job's keys go: the last of ``--logs``, and a local cluster's records
        saved locally (its Redis ends with the run)."""
        if self.options.stream_logs:
            self.show_logs()
        if self.options.keep_logs_locally and self.broker.logs_exist(self.jid):
            records = Follower(self.broker, self.jid).poll()
            save_local(self.jid, records)

    def fetch_stats(self) -> None:
        self.stats = self.broker.job_stats(self.jid)

    # -- setup ------------------------------------------------------------------------------

    def open(self, resume: str | None = None) -> None:
        """Register the job, or take over the one to resume; it expires unless refreshed."""
        limits = Limits(max_attempts=self.options.max_attempts,
                        max_result=self.options.max_result_bytes,
                        redis_grace=self.options.redis_grace_s, max_log=self.options.max_log_bytes)
        opened = open_job(self.broker, self.job, self.params, self.seed, jid=self.jid,
                          owner=self.owner, keyring=self.keyring, limits=limits,
                          resume=resume, auto=self.options.auto_resume, keep_s=self.options.keep_s,
                          overlap=Overlap(self.options.overlap, self.options.name,
                                          self.options.keep_s, self.deadline(),
                                          self.options.fresh))
        self.broker.expire_job(opened.jid, self.options.keep_s, opened.identity)
        if opened.resumed:  # the heartbeat says who runs it now, at once
            self.broker.beat(opened.jid, self.owner)
            self.broker.describe_job(opened.jid, {"host": socket.gethostname(),
                                                  "pid": os.getpid()})
        # only now that every call went through: a retry after a lost reply opens afresh
        # (our own new id, which cannot be mistaken for the job we took over)
        self.jid, self.identity = opened.jid, opened.identity
        self.description = opened.description or {}
        self.sending.opened(opened.scattered, opened.total)
        self.snapshot = opened.snapshot
        self.final = opened.final
        self.gatherer.restart(self.jid, self.owner)
        self.opened = True
        note("resumed" if opened.resumed else "started", self.jid, self.identity,
             self.job.path, self.broker.where)
        log.info("job=%s %s (%s, seed %d)", self.jid,
                 "resumed" if opened.resumed else "submitted", self.job.name, self.seed)

    def catch_up(self) -> None:
        """Resumed: results that died with the previous coordinator are queued again."""
        if self.snapshot is not None:
            self.sending.reclaimed = self.gatherer.catch_up(self.snapshot)
            self.snapshot = None
            self.recorded_before = self.tally.done

    def wait_for_workers(self) -> None:
        deadline = self.clock() + self.options.worker_timeout
        while True:
            self.guarded(self.watch.first_count)
            if self.watch.workers:
                return
            self.check_deadline()
            if self.clock() > deadline:
                raise NoWorkers(f"no worker appeared within {self.options.worker_timeout:g} s "
                                f"(Redis at {self.broker.where})")
            time.sleep(0.05)

    # -- the loop ---------------------------------------------------------------------------

    def guarded(self, action: Callable[[], None], grace: float | None = None) -> None:
        """Run ``action``, riding out a Redis outage (or lost replies) of up to ``grace``
        (default ``redis_grace_s``), and rebuilding the job if Redis lost it. ``action`` must
        be safe to repeat: it changes local state only after its I/O succeeded."""
        grace = self.options.redis_grace_s if grace is None else grace
        delay = 0.05
        while True:
            try:
                if self.lost:
                    self.rebuild()
                elif self.redis_down_since is not None and self.opened:
                    self.resync()
                action()
                self.redis_down_since = None
                return
            except JobGone:
                self.lost = True
            except REDIS_ERRORS as exc:
                now = self.clock()
                self.redis_down_since = self.redis_down_since or now
                if now - self.redis_down_since > grace:
                    raise RedisUnavailable(f"Redis at {self.broker.where} unreachable for "
                                           f"{grace:g} s: {exc}") from None
                log.warning("job=%s: Redis unavailable (%s); retrying", self.jid, exc)
                time.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
                delay = min(delay * 2, 2.0)

    def resync(self) -> None:
        """After an outage: which of the batches being sent did Redis take, and did it lose
        any it had taken (``Scattering.reconcile``)?"""
        fields = self.broker.job_fields(self.jid)
        if fields is None:
            self.rebuild()
            return
        self.sending.reconcile(int(fields.get("scattered", 0)))

    @property
    def idle(self) -> bool:
        """Every unit scattered so far is recorded (none queued, none waiting to be)."""
        return self.tally.outstanding == 0 and not self.sending.pending

    @property
    def total(self) -> int | None:
        """How many units the job has, once known."""
        return self.sending.total

    def fill(self) -> None:
        self.sending.fill(self.broker, self.jid, self.owner, self.watch.workers)

    def maintain(self) -> None:
        """Reissue what dead workers held; notice lost data, a takeover, no workers left."""
        now = self.clock()
        if now < self.next_maintenance:
            return
        self.next_maintenance = now + self.options.maintain_every_s
        if self.heartbeat.cancelled:
            raise JobCancelled(f"job {self.jid} was cancelled ({self.heartbeat.cancelled})")
        owner = self.broker.owner(self.jid)
        if owner is None:
            raise JobGone(self.jid)
        if owner != self.owner:
            raise Fenced(self.jid)
        self.watch.reissue_lapsed(now)
        self.watch.count()
        self.stats = self.broker.job_stats(self.jid)
        if now >= self.next_expiry:
            self.next_expiry = now + min(30.0, self.options.keep_s / 3)
            self.broker.expire_job(self.jid, self.options.keep_s, self.identity)
            expires = self.broker.server_time_ms() + self.options.keep_s * 1000
            self.broker.resign(self.jid, self.owner,
                               signed(self.keyring, self.jid, self.description, expires))
        threshold = speculation_threshold_ms(self.tally, self.batcher, self.watch.workers)
        if self.options.speculate and threshold is not None:
            self.watch.speculate(self.jid, self.owner, threshold)
        self.watch.check_workers(now, self.tally.outstanding)
        self.check_memory(now)

    def rebuild(self) -> None:
        """Redis lost the job (restarted without persistence, or flushed): register it again
        and queue everything not gathered yet."""
        log.error("job=%s is gone from Redis (restarted empty or flushed): queueing again every "
                  "unit not yet gathered", self.jid)
        note("rebuilt", self.jid, self.identity, self.job.path, self.broker.where)
        self.broker.ensure_group()
        self.sending.reclaimed = set()
        self.open()
        self.snapshot = None
        self.sending.start(skip=0)
        self.lost = False

    def deadline(self) -> float:
        """Until when the run may wait (for another run of the job: ``--overlap wait``)."""
        timeout = self.options.timeout
        return self.started + (timeout if timeout is not None else self.options.keep_s)

    def check_deadline(self) -> None:
        timeout = self.options.timeout
        if timeout is not None and self.clock() - self.started > timeout:
            raise JobTimeout(f"the job did not finish within {timeout:g} s "
                             f"({units_done(self.tally.done, self.total)})")

    # -- the end ----------------------------------------------------------------------------

    def finish(self) -> Any:
        gathered = self.results.gathered(self.tally.scattered)
        try:
            return self.job.gather(gathered, self.params)
        except Exception as exc:  # noqa: BLE001
            raise self.user_error("gather()", exc) from None

    def deliver(self, value: Any, write: Write) -> None:
        """Write the result while the job is still in Redis, kept there first (``keep_final``):
        when the write fails, or this coordinator dies writing, a re-run delivers it without
        computing it again. A failed write keeps the job (a private cluster's goes with it)."""
        not_kept = self.keep_final(value) if self.final is None else None
        try:
            write(value, self.jid, not_kept)
        except OutputFailed:
            self.close(purge=not self.options.redis_outlives_run)
            raise

    def keep_final(self, value: Any) -> str | None:
        """Keep ``value`` in Redis with the job (it expires with it); None when kept, else why
        not, in words for the user."""
        if not self.options.redis_outlives_run:
            return "a private local cluster does not outlive its submit"
        again = f"job {self.jid} is kept, but a re-run computes it again"
        try:
            blob = codec.encode(value)
        except CodecError as exc:
            return f"Redis cannot keep it, as the result {exc}; {again}"
        try:  # briefly: the write waits for this, and does not need it when it succeeds
            self.guarded(lambda: self.broker.keep_final(self.jid, blob, self.options.keep_s),
                         grace=min(self.options.redis_grace_s, 2.0))
        except (redis.RedisError, ClusterError) as exc:
            return f"Redis did not keep it: {exc}; {again}"
        return None

    def close(self, purge: bool) -> None:
        """Remove the job from Redis (done or failed), or keep it for a later resume."""
        if not self.opened:
            return
        self.lost = False  # a job gone from Redis needs no cleaning up
        try:
            if purge:
                self.guarded(self.keep_logs, grace=min(self.options.redis_grace_s, 10.0))
                self.guarded(lambda: self.broker.purge_job(self.jid, self.owner, self.identity,
                                                           self.options.keep_s),
                             grace=min(self.options.redis_grace_s, 10.0))
        except (redis.RedisError, ClusterError) as exc:
            log.warning("job=%s: could not clean up in Redis: %s", self.jid, exc)

    def check_memory(self, now: float) -> None:
        """No result for a while and Redis full: say so instead of waiting forever."""
        stalled = now - self.gatherer.last_progress
        if stalled < 10:
            return
        used, limit = self.broker.memory()
        if limit and used >= 0.95 * limit and stalled > self.options.redis_grace_s:
            raise InfraError(f"Redis at {self.broker.where} is out of memory ({used >> 20} MB "
                             f"used of maxmemory {limit >> 20} MB) and no result was recorded "
                             f"for {stalled:.0f} s; raise maxmemory or shrink the results")

    @property
    def lease_ms(self) -> int:
        return int(self.options.lease_s * 1000)

    def user_error(self, where: str, exc: Exception) -> JobFailed:
        return JobFailed(f"{where} raised {type(exc).__name__}: {exc}",
                         detail=user_traceback(exc, self.job.path))


def units_done(done: int, total: int | None) -> str:
    """How far a job got, in units, for a message: ``4 of 40 units done``."""
    if total is None:
        return f"{done} units done; scatter had not finished, so the total is not known"
    return f"{done} of {total} units done"
