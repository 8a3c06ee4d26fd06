"""Starting a job, or picking up one whose coordinator died.

A job's state lives in Redis (with AOF on a cluster that `up` started): the units queued, the
results recorded, how many units scatter has produced. A job is found again by its id
(``--resume JOB_ID``) or, when the same command runs again (cron), by its identity: a hash of the
job's code, its directory's digest, params and seed. Taking a job over changes its owner token,
which fences the previous coordinator off, and gives the new one a snapshot of what was
recorded: results that the old coordinator had gathered (and dropped from Redis) are lost with
it, and are computed again, unless it had kept the value gather returned (its ``--output`` write
failed, or it died writing it): then that value is delivered, and nothing is computed.
A small local journal (one JSON line per event) records which job ids were
started and resumed, and how each run ended (``history.STATES``, or ``kept`` for a job kept
to be resumed), so a user can find them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .broker import Broker
from .control import remove, settle
from .entries import Snapshot
from .errors import UsageError
from .jobfile import Job
from .signing import Keyring

log = logging.getLogger("cluster.coordinator")
JOURNAL = Path("~/.local/state/cluster/journal.jsonl")


@dataclass(frozen=True)
class Opened:
    jid: str
    identity: str
    resumed: bool
    scattered: int = 0  # units already queued by the previous coordinator
    total: int | None = None  # known when its scatter had finished
    snapshot: Snapshot | None = None  # resumed: what was recorded when it was taken over
    final: bytes | None = None  # resumed: the result a previous run gathered but did not write
    description: dict[str, Any] | None = None  # the signed fields (``describe``)


@dataclass(frozen=True)
class Overlap:
    """What a run does about a live run of the same job (``control.settle``)."""

    policy: str = "forbid"
    name: str | None = None  # --name: the job goes by this name rather than its identity
    keep_s: int = 86400
    deadline: float = float("inf")  # monotonic time until which ``wait`` waits
    fresh: bool = False  # a dead run's job is removed rather than resumed


def identity(job: Job, params: dict[str, Any], seed: int) -> str:
    shipped = job.archive.digest if job.archive else ""
    text = json.dumps([job.source, params, seed, shipped], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Limits:
    """A job's limits, as its workers read them (signed with the job)."""

    max_attempts: int = 3
    max_result: int = 256 << 20
    redis_grace: float = 60.0
    max_log: int = 32_000_000


def describe(job: Job, params: dict[str, Any], seed: int, limits: Limits) -> dict[str, Any]:
    """The signed fields of a job's hash, but its expiry."""
    return {"name": job.name, "path": job.path, "code": job.source, "seed": seed,
            "params": json.dumps(params, default=str), "max_attempts": limits.max_attempts,
            "max_result": limits.max_result, "redis_grace": limits.redis_grace,
            "max_log": limits.max_log, "workdir_sha": job.archive.digest if job.archive else "",
            "workdir_job": job.archive.job if job.archive else ""}


def signed(keyring: Keyring, jid: str, description: dict[str, Any], expires: int
           ) -> dict[str, Any]:
    """The description with its expiry (Redis server ms) and signature (``sig``)."""
    fields = {**description, "expires": expires}
    return {**fields, "sig": keyring.sign_job({"jid": jid, **fields})}


def open_job(broker: Broker, job: Job, params: dict[str, Any], seed: int, *, jid: str,
             owner: str, keyring: Keyring, limits: Limits, resume: str | None, auto: bool,
             keep_s: int = 86400, overlap: Overlap | None = None) -> Opened:
    """Resume ``resume`` (or, with ``auto``, the unfinished job of the same identity or
    ``--name``, as ``overlap`` says), or register a new job ``jid``, signed to be valid
    ``keep_s`` from now. Safe to call again after a lost reply."""
    overlap = overlap or Overlap()
    ident = identity(job, params, seed)
    name = f"name:{overlap.name}" if overlap.name else ident
    description = describe(job, params, seed, limits)
    wanted = resume
    if wanted is None and auto:
        wanted = settle(broker, name, jid, overlap.policy, overlap.keep_s, overlap.deadline,
                        fresh=overlap.fresh, owner=owner)
    if wanted:
        fields = broker.job_fields(wanted)
        if fields is None and resume:
            raise UsageError(f"job {resume} is not in Redis (it finished, failed, was "
                             "cancelled or expired)")
        if fields is not None:
            if fields.get("identity") != ident and resume:
                raise UsageError(f"job {wanted} was submitted with other code, params or seed; "
                                 "run the same job file and --param values to resume it")
            if fields.get("identity") != ident:  # --name: the same name, other code
                log.warning("job %s of the same --name, whose coordinator is gone, was "
                            "submitted with other code, params or seed: it is removed", wanted)
                remove(broker, wanted)
                return open_job(broker, job, params, seed, jid=jid, owner=owner,
                                keyring=keyring, limits=limits, resume=None, auto=auto,
                                keep_s=keep_s, overlap=overlap)
            snapshot = broker.take_over(wanted, owner)
            if snapshot is not None:
                # our own description (never what Redis holds), signed anew
                expires = broker.server_time_ms() + keep_s * 1000
                broker.resign(wanted, owner, signed(keyring, wanted, description, expires))
                total = fields.get("total")
                return Opened(wanted, name, True, int(fields.get("scattered", 0)),
                              int(total) if total else None, snapshot, broker.final(wanted),
                              description)
    now = broker.server_time_ms()
    shipped = {} if job.archive is None else {"workdir_files": job.archive.files}
    broker.create_job(jid, {**shipped, **signed(keyring, jid, description, now + keep_s * 1000),
        "identity": ident, "owner": owner, "scattered": 0, "started": now, "beat": now,
        "host": socket.gethostname(), "pid": os.getpid(),
    }, workdir=job.archive.data if job.archive else None)
    held = auto and broker.claim(name, jid, overlap.keep_s) is None  # not ours with allow
    return Opened(jid, name if held else "", False, description=description)


def note(event: str, jid: str, ident: str, path: str, where: str) -> None:
    """Append one line to the local journal (best effort: a read-only home is no error)."""
    file = Path(os.environ.get("CLUSTER_JOURNAL") or JOURNAL).expanduser()
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event,
                       "job": jid, "identity": ident, "file": path, "redis": where})
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with file.open("a") as f:
            f.write(line + "\n")
    except OSError:
        pass
