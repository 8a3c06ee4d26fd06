"""The coordinator: scatter units through Redis, track them, reissue lost ones, gather results.

Decisions (batch size, how far scatter may run ahead) come from ``plan.py``; this module does the
I/O around them. ``clock`` is injectable so tests decide time instead of sleeping.

What it survives:
- Redis unreachable for up to ``redis_grace_s``: it retries with backoff; batches it was sending
  are reconciled with the job's ``scattered`` counter, so none is queued twice or lost.
- Redis losing its data (restarted without persistence, flushed): the job's hash is gone; the
  job is registered again and every unit not yet gathered is queued again.
- Its own death: the job stays in Redis (``keep_s``) and a new coordinator resumes it
  (``resume.py``); a coordinator whose job was taken over is fenced and stops.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from . import codec
from .broker import Broker, Failed, Mismatch, parse_result
from .errors import (
    ClusterError,
    CodecError,
    Fenced,
    InfraError,
    JobFailed,
    JobTimeout,
    NoWorkers,
    RedisUnavailable,
    UnitFailed,
)
from .jobfile import Job, user_traceback
from .plan import Batcher, Tally, host_of, speculation_threshold_ms
from .progress import NoReporter, Reporter
from .results import Results, RunResult
from .resume import note, open_job

log = logging.getLogger("cluster.coordinator")
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, RedisUnavailable)
Batch = list[tuple[int, bytes]]


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
    speculate: bool = True
    resume: str | None = None  # a job id to resume
    auto_resume: bool = False  # resume the unfinished job of the same identity, if any


class Coordinator:
    def __init__(self, broker: Broker, job: Job, params: dict[str, Any], key: bytes,
                 options: RunOptions, reporter: Reporter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.broker = broker
        self.job = job
        self.params = params
        self.key = key
        self.options = options
        self.reporter = reporter or NoReporter()
        self.clock = clock
        self.seed = job.seed if options.seed is None else options.seed
        self.jid = secrets.token_hex(6)
        self.owner = secrets.token_hex(8)
        self.identity = ""
        self.tally = Tally()
        self.batcher = Batcher()
        self.results = Results(job.reduce)
        self.units: Iterator[Any] = iter(())
        self.unsent: list[Batch] = []
        self.sent = 0  # units confirmed queued in Redis (its `scattered` counter)
        self.skip = 0  # units the previous coordinator had queued already
        self.last_id = "0-0"
        self.workers = 0
        self.hosts_seen: set[str] = set()
        self.stats: dict[str, int] = {}
        self.failed: list[int] = []
        self.mismatched: list[int] = []
        self.copied: set[str] = set()
        self.started = 0.0
        self.next_maintenance = 0.0
        self.next_expiry = 0.0
        self.no_worker_since: float | None = None
        self.redis_down_since: float | None = None
        self.total: int | None = None

    def run(self) -> RunResult:
        self.started = self.clock()
        self.open(self.options.resume)
        try:
            self.wait_for_workers()
            self.units = self.scatter()
            while not self.tally.finished:
                self.guarded(self.step)
            value = self.finish()
            self.stats = self.broker.job_stats(self.jid)
        except (JobFailed, JobTimeout, KeyboardInterrupt):
            self.close(purge=True)
            raise
        except ClusterError as exc:  # infrastructure: keep a started job for --resume
            if isinstance(exc, Fenced):
                raise
            resumable = self.options.auto_resume and self.sent > 0
            self.close(purge=not resumable)
            if resumable:
                exc.message += f" (job {self.jid} is kept in Redis: run the same command " \
                               f"again, or add --resume {self.jid})"
            raise
        finally:
            self.reporter.close()
        self.close(purge=True)
        return RunResult(self.jid, value, self.tally, self.clock() - self.started, self.stats,
                         sorted(self.failed), sorted(self.mismatched))

    def step(self) -> None:
        self.check_deadline()
        self.fill()
        self.collect(block_ms=100)
        self.maintain()

    # -- setup ------------------------------------------------------------------------------

    def open(self, resume: str | None = None) -> None:
        """Register the job, or take over the one to resume; it expires unless refreshed."""
        opened = open_job(self.broker, self.job, self.params, self.seed, jid=self.jid,
                          owner=self.owner, key=self.key, max_attempts=self.options.max_attempts,
                          resume=resume, auto=self.options.auto_resume)
        self.jid, self.identity = opened.jid, opened.identity
        self.skip = self.sent = opened.scattered
        self.total = opened.total or self.total
        self.broker.expire_job(self.jid, self.options.keep_s, self.identity)
        log.info("job=%s %s (%s, seed %d)", self.jid,
                 "resumed" if opened.resumed else "submitted", self.job.name, self.seed)

    def wait_for_workers(self) -> None:
        deadline = self.clock() + self.options.worker_timeout
        while True:
            self.workers = len(self.broker.live_workers(self.lease_ms))
            self.check_keys()
            if self.workers:
                return
            self.check_deadline()
            if self.clock() > deadline:
                raise NoWorkers(f"no worker appeared within {self.options.worker_timeout:g} s "
                                f"(Redis at {self.broker.where})")
            time.sleep(0.05)

    def check_keys(self) -> None:
        """Fail fast when the only agents there cannot verify our job code."""
        mine = codec.fingerprint(self.key)
        prints = self.broker.agent_fingerprints(self.lease_ms)
        if prints and all(p is not None and p != mine for p in prints.values()):
            raise InfraError(f"every agent ({', '.join(sorted(prints))}) has a different "
                             "cluster key than this coordinator: copy the key file to them")

    def scatter(self) -> Iterator[Any]:
        """The job's units from the start; a resumed job skips those already queued."""
        try:
            units = self.job.scatter(self.params)
            if hasattr(units, "__len__"):
                self.total = len(units)
            elif self.job.count is not None and self.total is None:
                self.total = int(self.job.count(self.params))
            iterator = iter(units)
            if self.skip:
                for _ in itertools.islice(iterator, self.skip):
                    pass
        except Exception as exc:  # noqa: BLE001 - the job's own failure
            raise self.user_error("scatter()", exc) from None
        self.tally.scattered = self.skip
        return iterator

    # -- the loop ---------------------------------------------------------------------------

    def guarded(self, action: Callable[[], None]) -> None:
        """Run ``action``, riding out a Redis outage of up to ``redis_grace_s``."""
        delay = 0.1
        while True:
            try:
                if self.redis_down_since is not None:
                    self.resync()
                action()
                self.redis_down_since = None
                return
            except REDIS_ERRORS as exc:
                now = self.clock()
                self.redis_down_since = self.redis_down_since or now
                if now - self.redis_down_since > self.options.redis_grace_s:
                    raise RedisUnavailable(f"Redis at {self.broker.where} unreachable for "
                                           f"{self.options.redis_grace_s:g} s: {exc}") from None
                log.warning("job=%s: Redis unavailable (%s); retrying", self.jid, exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def resync(self) -> None:
        """After an outage: which of the batches being sent did Redis take?"""
        fields = self.broker.job_fields(self.jid)
        if fields is None:
            self.rebuild()
            return
        queued = int(fields.get("scattered", 0))
        while self.unsent and queued - self.sent >= len(self.unsent[0]):
            self.sent += len(self.unsent.pop(0))

    def fill(self) -> None:
        batch = self.batcher.size()
        room = self.tally.room(self.workers, batch)
        building = not self.unsent  # batches left over from an outage go first
        while building and room > 0 and not self.tally.exhausted and len(self.unsent) < 64:
            current: Batch = []
            size = 0
            while len(current) < min(batch, room) and size < self.batcher.max_bytes:
                index, blob = self.next_unit()
                if blob is None:
                    break
                if blob:  # empty: gathered already, before Redis lost its data
                    current.append((index, blob))
                    size += len(blob)
            room -= len(current)
            if current:
                self.unsent.append(current)
        if self.unsent:
            if not self.fenced(self.broker.add_units, self.jid, self.owner, self.unsent):
                return
            self.sent += sum(len(b) for b in self.unsent)
            self.unsent = []

    def fenced(self, script: Callable[..., Any], *args: Any) -> bool:
        """Run a script that checks ownership: False (and the job rebuilt) when Redis lost the
        job; ``Fenced`` when another coordinator owns it now."""
        try:
            script(*args)
            return True
        except redis.ResponseError as exc:
            reply = str(exc).split("caused error: ")[-1]  # a pipeline prefixes its command
            if reply.startswith("GONE"):
                self.rebuild()
                return False
            if reply.startswith("FENCED"):
                raise Fenced(f"job {self.jid} was taken over by another coordinator; "
                             "this one stops") from None
            raise

    def next_unit(self) -> tuple[int, bytes | None]:
        index = self.tally.scattered
        try:
            unit = next(self.units)
        except StopIteration:
            self.tally.exhausted = True
            self.total = index
            self.broker.set_total(self.jid, index)
            return index, None
        except Exception as exc:  # noqa: BLE001
            raise self.user_error("scatter()", exc) from None
        self.tally.scattered += 1
        if self.results.is_taken(index):
            return index, b""  # already gathered before Redis lost its data
        try:
            return index, codec.encode(unit)
        except CodecError as exc:
            raise JobFailed(f"unit {index} from scatter() {exc}") from None

    def collect(self, block_ms: int) -> None:
        for mid, fields in self.broker.read_results(self.jid, self.last_id, 512, block_ms):
            self.last_id = mid
            self.take(fields)
        self.reporter.update(self.tally.done, self.total, self.stats.get("reissued", 0))

    def take(self, fields: dict[bytes, bytes]) -> None:
        entry = parse_result(fields)
        if isinstance(entry, Failed):
            self.unit_failed(entry.index, entry.error)
            return
        if isinstance(entry, Mismatch):
            self.mismatched.append(entry.index)
            log.warning("unit=%d job=%s: a duplicate result from %s differs from the recorded "
                        "one: compute() is not deterministic", entry.index, self.jid, entry.wid)
            return
        units = [(i, p) for i, p in entry.units if self.results.mark(i)]
        refs = [p for _, p in units if p[:1] == b"R"]
        if refs:
            blobs = iter(self.broker.fetch_blobs(self.jid, refs))
            units = [(i, next(blobs) if p[:1] == b"R" else p) for i, p in units]
        for index, payload in units:
            try:
                self.results.add(index, codec.decode(payload))
            except Exception as exc:  # noqa: BLE001 - reduce() is the job's code
                raise self.user_error("reduce()", exc) from None
        self.tally.recorded += len(units)
        self.tally.by_worker[entry.wid] += len(units)
        self.batcher.observe(entry.batch, entry.seconds, sum(len(p) for _, p in units))

    def unit_failed(self, index: int, error: dict[str, Any]) -> None:
        if not self.results.mark(index):
            return
        self.tally.failed += 1
        self.failed.append(index)
        log.warning("unit=%d job=%s failed: %s", index, self.jid, error.get("error"))
        if self.tally.failed > self.options.max_failed:
            raise UnitFailed(index, error.get("error", "?"), attempts=error.get("attempts", 0),
                             worker=error.get("worker", "?"), detail=error.get("traceback", ""))

    def maintain(self) -> None:
        """Reissue what dead workers held; notice lost data, a takeover, no workers left."""
        now = self.clock()
        if now < self.next_maintenance:
            return
        self.next_maintenance = now + self.options.maintain_every_s
        owner = self.broker.owner(self.jid)
        if owner is None:
            self.rebuild()
            return
        if owner != self.owner:
            raise Fenced(f"job {self.jid} was taken over by another coordinator; this one stops")
        for wid in self.broker.expired_workers(self.lease_ms):
            moved = self.broker.reissue(wid, charge=False, reason=f"worker {wid} lost its lease",
                                        lease_ms=self.lease_ms)
            if moved > 0:
                log.warning("worker %s lost its lease; %d units reissued", wid, moved)
        live = self.broker.live_workers(self.lease_ms)
        self.workers = len(live)
        self.hosts_seen.update(host_of(w) for w in live)
        self.stats = self.broker.job_stats(self.jid)
        if now >= self.next_expiry:
            self.next_expiry = now + 30
            self.broker.expire_job(self.jid, self.options.keep_s, self.identity)
        self.speculate()
        self.check_workers(now, {host_of(w) for w in live})

    def check_workers(self, now: float, alive: set[str]) -> None:
        if self.workers:
            self.no_worker_since = None
        elif self.no_worker_since is None:
            self.no_worker_since = now
        elif now - self.no_worker_since > self.options.worker_timeout:
            lost = ", ".join(sorted(self.hosts_seen - alive)) or "none seen"
            raise NoWorkers(f"no live worker for {self.options.worker_timeout:g} s "
                            f"(hosts lost: {lost}); {self.tally.outstanding} units still to do")

    def speculate(self) -> None:
        """When only a few units are left and workers idle, give the slowest a second copy."""
        threshold = speculation_threshold_ms(self.tally, self.batcher, self.workers)
        if not self.options.speculate or threshold is None:
            return
        for msgid, wid, idle in self.broker.pending():
            if idle > threshold and msgid not in self.copied:
                self.copied.add(msgid)
                if not self.fenced(self.broker.copy_entry, self.jid, self.owner, msgid):
                    return
                log.info("job=%s: straggling entry %s on %s gets a speculative copy",
                         self.jid, msgid, wid)

    def rebuild(self) -> None:
        """Redis lost the job (restarted without persistence, or flushed): register it again
        and queue everything not gathered yet."""
        log.error("job=%s is gone from Redis (restarted empty or flushed): queueing again every "
                  "unit not yet gathered", self.jid)
        note("rebuilt", self.jid, self.identity, self.job.path, self.broker.where)
        self.broker.ensure_group()
        self.unsent = []
        self.last_id = "0-0"
        self.tally.exhausted = False
        self.open()
        self.units = self.scatter()

    def check_deadline(self) -> None:
        timeout = self.options.timeout
        if timeout is not None and self.clock() - self.started > timeout:
            raise JobTimeout(f"the job did not finish within {timeout:g} s "
                             f"({self.tally.done} of {self.tally.scattered} units done)")

    # -- the end ----------------------------------------------------------------------------

    def finish(self) -> Any:
        gathered = self.results.gathered(self.tally.scattered)
        try:
            return self.job.gather(gathered, self.params)
        except Exception as exc:  # noqa: BLE001
            raise self.user_error("gather()", exc) from None

    def close(self, purge: bool) -> None:
        """Remove the job from Redis (done or failed), or keep it for a later resume."""
        try:
            if purge:
                self.broker.purge_job(self.jid, self.owner, self.identity)
            note("finished" if purge else "kept", self.jid, self.identity, self.job.path,
                 self.broker.where)
        except (redis.RedisError, ClusterError) as exc:
            log.warning("job=%s: could not clean up in Redis: %s", self.jid, exc)

    @property
    def lease_ms(self) -> int:
        return int(self.options.lease_s * 1000)

    def user_error(self, where: str, exc: Exception) -> JobFailed:
        return JobFailed(f"{where} raised {type(exc).__name__}: {exc}",
                         detail=user_traceback(exc, self.job.path))
