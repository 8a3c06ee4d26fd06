"""The coordinator: scatter units through Redis, track them, reissue lost ones, gather results.

Decisions (batch size, how far scatter may run ahead) come from ``plan.py``; this module does the
I/O around them. ``clock`` is injectable so tests decide time instead of sleeping.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from . import codec
from .broker import Broker
from .errors import (
    ClusterError,
    CodecError,
    InfraError,
    JobFailed,
    JobTimeout,
    NoWorkers,
    UnitFailed,
)
from .jobfile import Job, user_traceback
from .plan import Batcher, Tally

log = logging.getLogger("cluster.coordinator")
_EMPTY = object()  # the accumulator before the first result


class Reporter(Protocol):
    def update(self, done: int, total: int | None, reissued: int) -> None: ...

    def close(self) -> None: ...


class NoReporter:
    def update(self, done: int, total: int | None, reissued: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class RunOptions:
    seed: int | None = None  # None: the job file's SEED
    max_attempts: int = 3
    max_failed: int = 0
    timeout: float | None = None
    worker_timeout: float = 30.0
    lease_s: float = 5.0
    maintain_every_s: float = 0.5


@dataclass
class RunResult:
    value: Any
    tally: Tally
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        t = self.tally
        hosts = len(t.hosts())
        rate = t.done / self.seconds if self.seconds > 0 else 0.0
        line = (f"{t.done} units on {len(t.by_worker)} workers ({hosts} host"
                f"{'' if hosts == 1 else 's'}) in {self.seconds:.1f} s, {rate:.1f} units/s, "
                f"{self.stats.get('reissued', 0)} reissued, "
                f"{self.stats.get('duplicates', 0) + self.stats.get('stale', 0)} "
                "duplicates discarded")
        if t.failed:
            line += f", {t.failed} failed"
        return line


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
        self.jid = secrets.token_hex(6)
        self.owner = secrets.token_hex(8)
        self.tally = Tally()
        self.batcher = Batcher()
        self.results: dict[int, Any] = {}
        self.accumulator: Any = _EMPTY
        self.last_id = "0-0"
        self.workers = 0
        self.stats: dict[str, int] = {}
        self.started = 0.0
        self.next_maintenance = 0.0
        self.no_worker_since: float | None = None
        self.total: int | None = None

    def run(self) -> RunResult:
        self.started = self.clock()
        self.register()
        try:
            self.wait_for_workers()
            units = self.scatter()
            while not self.tally.finished:
                self.check_deadline()
                self.fill(units)
                self.collect(block_ms=100)
                self.maintain()
            value = self.finish()
            self.stats = self.broker.job_stats(self.jid)
            return RunResult(value, self.tally, self.clock() - self.started, self.stats)
        finally:
            self.reporter.close()
            self.cleanup()

    # -- setup ------------------------------------------------------------------------------

    def register(self) -> None:
        code = self.job.source.encode()
        seed = self.job.seed if self.options.seed is None else self.options.seed
        self.broker.create_job(self.jid, {
            "name": self.job.name, "path": self.job.path, "code": code,
            "sig": codec.sign(self.key, code), "seed": seed,
            "max_attempts": self.options.max_attempts, "owner": self.owner,
            "started": self.broker.server_time_ms(),
        })
        log.info("job=%s submitted (%s, seed %d)", self.jid, self.job.name, seed)

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
        prints = {aid: self.broker.client.hget(self.broker.keys.agent(aid), "key")
                  for aid in self.broker.live_agents(self.lease_ms)}
        if prints and all(p is not None and p.decode() != mine for p in prints.values()):
            raise InfraError(f"every agent ({', '.join(sorted(prints))}) has a different "
                             "cluster key than this coordinator: copy the key file to them")

    def scatter(self) -> Iterator[Any]:
        try:
            units = self.job.scatter(self.params)
            if hasattr(units, "__len__"):
                self.total = len(units)
            elif self.job.count is not None:
                self.total = int(self.job.count(self.params))
            return iter(units)
        except Exception as exc:  # noqa: BLE001 - the job's own failure
            raise self.user_error("scatter()", exc) from None

    # -- the loop ---------------------------------------------------------------------------

    def fill(self, units: Iterator[Any]) -> None:
        batch = self.batcher.size()
        room = self.tally.room(self.workers, batch)
        batches: list[list[tuple[int, bytes]]] = []
        while room > 0 and not self.tally.exhausted:
            current: list[tuple[int, bytes]] = []
            size = 0
            while len(current) < min(batch, room) and size < self.batcher.max_bytes:
                blob = self.next_unit(units)
                if blob is None:
                    break
                current.append((self.tally.scattered, blob))
                self.tally.scattered += 1
                size += len(blob)
            room -= len(current)
            if current:
                batches.append(current)
        if batches:
            self.broker.add_units(self.jid, self.owner, batches)

    def next_unit(self, units: Iterator[Any]) -> bytes | None:
        try:
            unit = next(units)
        except StopIteration:
            self.tally.exhausted = True
            self.total = self.tally.scattered
            return None
        except Exception as exc:  # noqa: BLE001
            raise self.user_error("scatter()", exc) from None
        try:
            return codec.encode(unit)
        except CodecError as exc:
            raise JobFailed(f"unit {self.tally.scattered} from scatter() {exc}") from None

    def collect(self, block_ms: int) -> None:
        for mid, fields in self.broker.read_results(self.jid, self.last_id, 512, block_ms):
            self.last_id = mid
            self.take(fields)
        self.reporter.update(self.tally.done, self.total, self.stats.get("reissued", 0))

    def take(self, fields: dict[bytes, bytes]) -> None:
        if b"f" in fields:
            self.failed(int(fields[b"f"]), json.loads(fields[b"e"]))
            return
        items = list(fields.items())
        wid, seconds = items[0][1], float(items[1][1])
        units = items[2:]
        refs = [p for _, p in units if p[:1] == b"R"]
        if refs:
            blobs = iter(self.broker.fetch_blobs(self.jid, refs))
            units = [(i, next(blobs) if p[:1] == b"R" else p) for i, p in units]
        for index, payload in units:
            self.record(int(index), codec.decode(payload))
        self.tally.recorded += len(units)
        self.tally.by_worker[wid.decode()] += len(units)
        self.batcher.observe(len(units), seconds, sum(len(p) for _, p in units))

    def record(self, index: int, value: Any) -> None:
        reduce = self.job.reduce
        if reduce is None:
            self.results[index] = value
        elif self.accumulator is _EMPTY:
            self.accumulator = value
        else:
            try:
                self.accumulator = reduce(self.accumulator, value)
            except Exception as exc:  # noqa: BLE001
                raise self.user_error("reduce()", exc) from None

    def failed(self, index: int, error: dict[str, Any]) -> None:
        self.tally.failed += 1
        log.warning("unit=%d job=%s failed: %s", index, self.jid, error.get("error"))
        if self.tally.failed > self.options.max_failed:
            raise UnitFailed(index, error.get("error", "?"), attempts=error.get("attempts", 0),
                             worker=error.get("worker", "?"), detail=error.get("traceback", ""))

    def maintain(self) -> None:
        """Reissue what dead workers held; notice when no worker is left."""
        now = self.clock()
        if now < self.next_maintenance:
            return
        self.next_maintenance = now + self.options.maintain_every_s
        for wid in self.broker.expired_workers(self.lease_ms):
            moved = self.broker.reissue(wid, charge=False, reason=f"worker {wid} lost its lease",
                                        lease_ms=self.lease_ms)
            if moved > 0:
                log.warning("worker %s lost its lease; %d units reissued", wid, moved)
        self.workers = len(self.broker.live_workers(self.lease_ms))
        self.stats = self.broker.job_stats(self.jid)
        if self.workers:
            self.no_worker_since = None
        elif self.no_worker_since is None:
            self.no_worker_since = now
        elif now - self.no_worker_since > self.options.worker_timeout:
            raise NoWorkers(f"no live worker for {self.options.worker_timeout:g} s; "
                            f"{self.tally.outstanding} units still to do")

    def check_deadline(self) -> None:
        timeout = self.options.timeout
        if timeout is not None and self.clock() - self.started > timeout:
            raise JobTimeout(f"the job did not finish within {timeout:g} s "
                             f"({self.tally.done} of {self.tally.scattered} units done)")

    # -- the end ----------------------------------------------------------------------------

    def finish(self) -> Any:
        if self.job.reduce is not None:
            gathered = None if self.accumulator is _EMPTY else self.accumulator
        else:
            gathered = [self.results.get(i) for i in range(self.tally.scattered)]
            self.results.clear()
        try:
            return self.job.gather(gathered, self.params)
        except Exception as exc:  # noqa: BLE001
            raise self.user_error("gather()", exc) from None

    def cleanup(self) -> None:
        try:
            self.broker.purge_job(self.jid)
        except (redis.RedisError, ClusterError) as exc:
            log.warning("job=%s: could not remove the job's keys from Redis: %s", self.jid, exc)

    @property
    def lease_ms(self) -> int:
        return int(self.options.lease_s * 1000)

    def user_error(self, where: str, exc: Exception) -> JobFailed:
        return JobFailed(f"{where} raised {type(exc).__name__}: {exc}",
                         detail=user_traceback(exc, self.job.path))
