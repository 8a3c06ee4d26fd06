"""One worker: one process on one core, one loop. Started by an agent, never by hand.

The agent passes the worker its settings and credentials as JSON on stdin (never as arguments).
Signals: SIGTERM or SIGINT asks the worker to stop after the batch it is computing (at once when
it is idle); the worker also stops when its agent goes away.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import sys
import time
import traceback
import types
import zlib
from typing import Any

import redis

from . import codec
from .broker import Broker, Outcome, Work
from .context import running_unit
from .credentials import Credentials
from .errors import ClusterError, CodecError, RedisUnavailable
from .jobfile import load_source
from .proc import die_with_parent

log = logging.getLogger("cluster.worker")


class LoadedJob:
    """Job code as a worker runs it, or the reason it cannot run here."""

    def __init__(self, module: types.ModuleType | None, seed: int, error: str = "") -> None:
        self.module = module
        self.seed = seed
        self.error = error


class Worker:
    def __init__(self, broker: Broker, wid: str, key: bytes, block_ms: int = 500,
                 parent: int | None = None) -> None:
        self.broker = broker
        self.parent = parent
        self.wid = wid
        self.key = key
        self.block_ms = block_ms
        self.jobs: dict[str, LoadedJob | None] = {}
        self.idle = True
        self.stopping = False
        self.recovering = True  # first take back what was delivered to us and not recorded
        self.unrecorded: tuple[Work, float, list[Outcome]] | None = None  # commit to retry

    def run(self) -> None:
        if self.unrecorded is not None:  # computed before Redis went away: commit it now
            self.commit(*self.unrecorded)
        while not self.stopping and (self.parent is None or os.getppid() == self.parent):
            self.idle = True
            work = self.broker.read_work(self.wid, self.block_ms, own=self.recovering)
            if work is None and self.recovering:
                self.recovering = False
                continue
            self.idle = False
            if work is not None:
                self.handle(work)

    def handle(self, work: Work) -> None:
        job = self.job(work.jid)
        self.broker.describe_worker(self.wid, {"job": work.jid, "unit": work.units[0][0]})
        started = time.perf_counter()
        outcomes = [] if job is None else [self.run_unit(job, work, i, b) for i, b in work.units]
        self.commit(work, time.perf_counter() - started, outcomes)

    def commit(self, work: Work, seconds: float, outcomes: list[Outcome]) -> None:
        """Record a batch; kept for a retry if Redis is unreachable (when it is back, a batch
        reissued meanwhile is discarded as stale, and compared with what was recorded)."""
        self.unrecorded = (work, seconds, outcomes)
        done, dups = self.broker.record(work, self.wid, seconds, outcomes)
        self.unrecorded = None
        if done == -2:
            log.warning("job=%s: this worker lost its lease; its batch was reissued and its "
                        "results discarded; stopping to be replaced", work.jid)
            self.stopping = True
            return
        log.debug("← job=%s units=%d recorded=%d duplicates=%d %.3fs", work.jid,
                  len(work.units), done, dups, seconds)

    def job(self, jid: str) -> LoadedJob | None:
        """The job's code, loaded once per worker; None when the job is gone."""
        if jid not in self.jobs:
            self.jobs[jid] = self.load(jid)
        return self.jobs[jid]

    def load(self, jid: str) -> LoadedJob | None:
        info = self.broker.job_info(jid)
        if info is None:
            return None
        seed = int(info.get("seed", b"0"))
        code = info.get("code", b"")
        if not codec.verify(self.key, code, info.get("sig", b"")):
            log.error("job=%s: code signature does not verify; refusing to run it", jid)
            return LoadedJob(None, seed, f"worker {self.wid} refused the job: its code is not "
                             "signed by this cluster's key (the key files differ)")
        name = info.get("name", b"job").decode()
        try:
            module = load_source(code.decode(), info.get("path", b"job.py").decode(),
                                 module_name=f"cluster_job_{name}_{jid}")
        except ClusterError as exc:
            return LoadedJob(None, seed, f"on worker {self.wid}: {exc}")
        log.info("job=%s loaded (%s)", jid, name)
        return LoadedJob(module, seed)

    def run_unit(self, job: LoadedJob, work: Work, index: int, blob: bytes) -> Outcome:
        if job.module is None:
            return self.failure(work, index, blob, "err", job.error, "")
        try:
            unit = codec.decode(blob)
        except CodecError as exc:
            return self.failure(work, index, blob, "fatal", f"unit cannot be decoded: {exc}", "")
        try:
            with running_unit(job.seed, index):
                result = job.module.compute(unit)
        except Exception as exc:  # noqa: BLE001 - the job's own failure, reported with its unit
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next
                                                    if exc.__traceback__ else None))
            log.warning("unit=%d job=%s attempt=%d raised %s: %s", index, work.jid,
                        work.attempt, type(exc).__name__, exc)
            return self.failure(work, index, blob, "err", f"{type(exc).__name__}: {exc}", tb)
        try:
            payload = codec.encode(result)
        except CodecError as exc:
            return self.failure(work, index, blob, "fatal",
                                f"compute() returned a result that {exc}", "")
        return Outcome(index, "ok", payload, digest=digest(payload))

    def failure(self, work: Work, index: int, blob: bytes, kind: str, error: str, tb: str
                ) -> Outcome:
        payload = json.dumps({"error": error, "traceback": tb, "worker": self.wid,
                              "attempts": work.attempt}).encode()
        return Outcome(index, kind, payload, blob)


def digest(payload: bytes) -> bytes:
    """8 bytes that tell two results apart: CRC-32 and length. Not a security hash; it only
    has to notice that nondeterministic compute gave a unit two different results, and it
    must cost little next to sending the result (about 7 GB/s)."""
    return struct.pack("<II", zlib.crc32(payload), len(payload) & 0xFFFFFFFF)


def main() -> int:
    """Entry point of a worker process: ``python -m cluster.worker`` with JSON on stdin."""
    die_with_parent(signal.SIGKILL)
    config: dict[str, Any] = json.loads(sys.stdin.read())
    parent = int(config["agent_pid"])
    logging.basicConfig(level=config.get("log_level", "INFO"),
                        format=f"%(asctime)s {config['wid']} %(levelname)s %(message)s")
    creds = Credentials.from_json(json.dumps(config["credentials"]), "stdin")
    if os.getppid() != parent:
        return 0
    broker = Broker.connect(creds.redis_url, creds.password, prefix=creds.prefix,
                            socket_timeout=10)
    worker = Worker(broker, config["wid"], creds.key, block_ms=config.get("block_ms", 500),
                    parent=parent)

    def stop(signum: int, frame: object) -> None:
        worker.stopping = True
        if worker.idle:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return run_forever(worker, parent)


def run_forever(worker: Worker, parent: int) -> int:
    """Run, riding out Redis outages, until asked to stop or orphaned."""
    backoff = 0.1
    while (not worker.stopping or worker.unrecorded) and os.getppid() == parent:
        try:
            worker.run()
            backoff = 0.1
        except (redis.ConnectionError, redis.TimeoutError, RedisUnavailable) as exc:
            worker.recovering = True
            log.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
