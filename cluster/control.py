"""Acting on a job that runs, from outside its coordinator: cancelling it (``cluster cancel``,
``--overlap replace``) and telling whether its coordinator is alive (``heartbeat``).

A cancel asks the coordinator to stop (it notices within a second, drops the job's queued
units, removes the job and exits ``CANCELLED``; agents replace the workers that compute its
units, charging no attempt). When no coordinator beats any more, nobody would act on the
request: the cancelling side then takes the job over (which fences a coordinator that comes
back) and removes it itself.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from .broker import Broker
from .errors import InfraError, UsageError
from .heartbeat import LEASE_MS


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
