"""Acting on a job that runs, from outside its coordinator: cancelling it (``cluster cancel``,
``--overlap replace``), and what a new run of the same job does about it (``settle``: the
overlap policy). A job's coordinator is alive while it beats (``heartbeat``).

A cancel asks the coordinator to stop (it notices within a second, drops the job's queued
units, removes the job and exits ``CANCELLED``; agents replace the workers that compute its
units, charging no attempt). When no coordinator beats any more, nobody would act on the
request: the cancelling side then takes the job over (which fences a coordinator that comes
back) and removes it itself.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone

import psutil
import redis

from .broker import Broker
from .errors import AlreadyRunning, ClusterError, ExitCode, InfraError, JobTimeout, UsageError
from .heartbeat import LEASE_MS
from .history import ended_elsewhere

log = logging.getLogger("cluster.control")


def cancel(broker: Broker, jid: str, who: str, wait_s: float = 30.0,
           clock: Callable[[], float] = time.monotonic) -> str:
    """Cancel job ``jid`` and wait until it is gone from Redis; returns how it ended:
    ``stopped by its coordinator`` or ``removed``."""
    age = broker.cancel_job(jid, who)
    if age is None:
        raise UsageError(f"job {jid} is not running on the cluster at {broker.where} (it "
                         "finished, failed, was cancelled or expired)")
    deadline = clock() + wait_s
    while True:
        if age is None:
            return "stopped by its coordinator"
        if age > LEASE_MS:
            try:
                ended_elsewhere(broker, jid, "cancelled", ExitCode.CANCELLED, who)
            except (ClusterError, redis.RedisError) as exc:  # best effort, as all history
                log.warning("job=%s: its cancel was not recorded in the history: %s", jid, exc)
            remove(broker, jid)
            return "removed (its coordinator was gone)"
        if clock() > deadline:
            raise InfraError(f"job {jid}: its coordinator was asked to stop {wait_s:g} s ago "
                             "and has not; it beats still (is it stuck in scatter or gather?)")
        time.sleep(0.1)
        age = broker.cancel_job(jid, who) if broker.job_exists(jid) else None


def remove(broker: Broker, jid: str) -> None:
    """Take the job over and remove it, queued units and all (not its logs)."""
    fields = broker.job_fields(jid) or {}
    owner = secrets.token_hex(8)
    if broker.take_over(jid, owner) is not None:
        broker.purge_job(jid, owner, fields.get("identity", ""))


OVERLAP = ("forbid", "wait", "replace", "allow")


def settle(broker: Broker, name: str, jid: str, overlap: str, keep_s: int, deadline: float,
           clock: Callable[[], float] = time.monotonic, fresh: bool = False,
           owner: str = "") -> str | None:
    """Before a new run of the job that goes by ``name`` registers as ``jid``: what of the
    same job is there? Returns the id of a job to resume (its coordinator is dead), or None:
    register ``jid`` (the name is then taken for it, except with ``allow``). A live run of it
    is refused (``forbid``: ``AlreadyRunning``), waited for until ``deadline`` (``wait``:
    ``JobTimeout`` after), cancelled (``replace``), or left to run beside (``allow``). With
    ``fresh``, a dead run's job is removed instead of resumed. A job that ``owner`` (this
    run's token) took over already, in a try whose reply was lost, is resumed."""
    while True:
        holder = broker.claim(name, jid, keep_s)
        if holder is None:
            return None
        fields = broker.job_fields(holder)
        if fields is None:  # its job is gone: the name is free
            broker.release(name, holder)
            continue
        if owner and fields.get("owner") == owner:
            return holder
        if not alive(broker, fields):
            if not fresh:
                return holder
            remove(broker, holder)
            continue
        if overlap == "allow":
            return None
        if overlap == "forbid":
            raise AlreadyRunning(f"job {holder} ({fields.get('name', '?')}) is already running "
                                 f"on this cluster: started {_when(fields)} on "
                                 f"{fields.get('host', '?')} (pid {fields.get('pid', '?')}); "
                                 "see --overlap (forbid, wait, replace, allow)")
        if overlap == "replace":
            cancel(broker, holder, f"replaced by a newer run on {socket.gethostname()} "
                                   "(--overlap replace)")
            continue
        wait_gone(broker, holder, deadline, clock)


def wait_gone(broker: Broker, jid: str, deadline: float,
              clock: Callable[[], float] = time.monotonic) -> None:
    """``--overlap wait``: until job ``jid`` is gone or its coordinator dead, or ``deadline``."""
    while broker.job_exists(jid):
        if not alive(broker, broker.job_fields(jid) or {}):
            return
        if clock() > deadline:
            raise JobTimeout(f"waited for job {jid}, the same job, to finish until --timeout "
                             "(--overlap wait); it still runs")
        time.sleep(0.2)


def alive(broker: Broker, fields: dict[str, str]) -> bool:
    """A job's coordinator is alive while it beats; one on this host whose process is gone is
    dead at once (a re-run right after a crash resumes rather than waits for the lease)."""
    if broker.server_time_ms() - int(fields.get("beat") or 0) > LEASE_MS:
        return False
    pid = int(fields.get("pid") or 0)
    return not (fields.get("host") == socket.gethostname() and pid and not psutil.pid_exists(pid))


def _when(fields: dict[str, str]) -> str:
    started = int(fields.get("started") or 0) / 1000
    return datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
