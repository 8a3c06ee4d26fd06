"""A coordinator's heartbeat on its job, from a thread of its own.

The beat (Redis server time, in the job's hash) is how another run of the same job tells a live
coordinator from a dead one (``--overlap``): a live one is waited for or refused, a dead one's
job is resumed. It comes from a thread, so that a long ``scatter`` or ``gather`` (the job's own
code, running in the coordinator) does not make its coordinator look dead. The answer also
carries a request to stop (``cluster cancel``), which the coordinator acts on in its loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from .broker import Broker
from .errors import Fenced, JobGone, RedisUnavailable

log = logging.getLogger("cluster.coordinator")

BEAT_S = 1.0  # how often a coordinator beats
LEASE_MS = 10_000  # a coordinator that has not beaten for this long is taken for dead


class Heartbeat(threading.Thread):
    """Beats every ``every_s`` for the job ``job()`` names (id, owner token) until stopped."""

    def __init__(self, broker: Broker, job: Callable[[], tuple[str, str]],
                 every_s: float = BEAT_S) -> None:
        super().__init__(name="cluster-heartbeat", daemon=True)
        self.broker = broker
        self.job = job
        self.every_s = every_s
        self.cancelled = ""  # who asked the job to stop, once someone did
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every_s):
            self.beat()

    def beat(self) -> None:
        jid, owner = self.job()
        try:
            who = self.broker.beat(jid, owner)
        except (Fenced, JobGone):  # the coordinator's own loop notices and acts
            return
        except (redis.RedisError, RedisUnavailable) as exc:
            log.debug("job=%s: heartbeat failed: %s", jid, exc)
            return
        if who and not self.cancelled:
            self.cancelled = who

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(timeout=5)
