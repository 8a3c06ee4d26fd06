"""The Redis protocol of jobs: the rest of ``cluster`` sees Redis through ``Broker``: the
coordinator's steps here, the workers' and agents' in ``delivery.py``, the cluster's bookkeeping
in ``fleet.py``, on a shared connection (``redisio.py``).

The protocol's atomic steps are Lua scripts, in ``scripts.py`` and ``workscripts.py``,
registered here.

Redis errors are translated at the edge (``redisio.translate_errors``): callers see
``RedisUnavailable`` (unreachable, refusing writes, or ``RedisFull``), ``JobGone`` and
``Fenced``, never redis-py's exceptions or error text.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import scripts, workscripts
from .credentials import Credentials, redact
from .delivery import Delivery, by_sha
from .entries import Batch, Snapshot
from .errors import Fenced, JobGone, RedisRefused, RedisUnavailable
from .keys import GROUP, Keys
from .redisio import _fields, _status, edge, translate_errors

log = logging.getLogger("cluster.broker")
QUIET_START_S = 1.0  # Redis may be starting beside us (a local cluster): no warning before
EXPIRED_MOST = 1000  # dead workers one lease check returns (the rest: at the next one)


class Broker(Delivery):
    """Redis, as the rest of ``cluster`` sees it: the coordinator's steps here, the workers'
    and agents' in ``Delivery``, the cluster's bookkeeping (agents, run history, Redis's own
    settings) in ``Fleet``."""

    def __init__(self, client: redis.Redis, keys: Keys, where: str = "redis") -> None:
        super().__init__(client, keys, where)
        self.scripts: list[redis.commands.core.Script] = []

        def reg(source: str) -> redis.commands.core.Script:
            self.scripts.append(client.register_script(source))
            return self.scripts[-1]

        self._add = reg(scripts.ADD)
        self._record = reg(workscripts.RECORD)
        self._save_run = reg(scripts.SAVE_RUN)
        self._retire = reg(scripts.RETIRE)
        self._reissue = reg(workscripts.REISSUE)
        self._renew = reg(workscripts.RENEW)
        self._renew_same = reg(workscripts.RENEW_SAME)
        self._register_worker = reg(workscripts.REGISTER_WORKER)
        self._expired = reg(scripts.EXPIRED)
        self._purge = reg(scripts.PURGE)
        self._takeover = reg(scripts.TAKEOVER)
        self._copy = reg(scripts.COPY)
        self._consume = reg(scripts.CONSUME)
        self._reclaim = reg(scripts.RECLAIM)
        self._requeue = reg(scripts.REQUEUE)
        self._log = reg(workscripts.LOG)
        self._beat = reg(scripts.BEAT)
        self._resign = reg(scripts.RESIGN)
        self._cancel = reg(scripts.CANCEL)
        self._claim = reg(scripts.CLAIM)
        self._release = reg(scripts.RELEASE)
        self._take = reg(workscripts.TAKE)
        self._split = reg(workscripts.SPLIT)

    @classmethod
    def of(cls, creds: Credentials, *, timeout: float = 5.0, socket_timeout: float = 60.0,
           retry_s: float = 0.0) -> Broker:
        """``connect`` with these credentials (URL, password, user, prefix)."""
        return cls.connect(creds.redis_url, creds.password, prefix=creds.prefix,
                           timeout=timeout, socket_timeout=socket_timeout, retry_s=retry_s,
                           username=creds.username,
                           tls=(creds.tls_ca, creds.tls_cert, creds.tls_key))

    @classmethod
    def connect(
        cls, url: str, password: str | None = None, *, prefix: str = "cluster:",
        timeout: float = 5.0, socket_timeout: float = 60.0, retry_s: float = 0.0,
        username: str | None = None,
        tls: tuple[str | None, str | None, str | None] = (None, None, None),
    ) -> Broker:
        """Connect and check that Redis answers and accepts our credentials; an unreachable
        Redis (not a refused password) is tried again for up to ``retry_s`` seconds."""
        start = time.monotonic()
        delay, warned = 0.01, False
        while True:
            try:
                return cls._connect(url, password, username, prefix, timeout, socket_timeout,
                                    tls)
            except RedisRefused:  # a bad password or user: final
                raise
            except RedisUnavailable as exc:
                if time.monotonic() + delay > start + retry_s:
                    raise
                if not warned and time.monotonic() - start > QUIET_START_S:
                    log.warning("%s; retrying for up to %.0f s", exc, retry_s)
                    warned = True
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(2 * delay, 2.0)

    @classmethod
    def _connect(cls, url: str, password: str | None, username: str | None, prefix: str,
                 timeout: float, socket_timeout: float,
                 tls: tuple[str | None, str | None, str | None]) -> Broker:
        where = redact(url)
        secure: dict[str, Any] = {}
        if url.startswith("rediss://"):  # the server's certificate and name are checked
            ca, cert, key = tls
            secure = {"ssl_cert_reqs": "required", "ssl_check_hostname": True,
                      "ssl_ca_certs": ca, "ssl_certfile": cert, "ssl_keyfile": key}
        # No retries inside redis-py: a request whose reply was lost would be sent again
        # behind our back (an XREADGROUP would deliver a second entry while the first stays
        # pending, an ADD would queue a batch twice). Every retry is ours, and knows the step.
        client = redis.Redis.from_url(
            url, password=password or None, username=username or None,
            socket_connect_timeout=timeout,
            socket_timeout=socket_timeout, socket_keepalive=True, health_check_interval=30,
            retry=Retry(NoBackoff(), 0), **secure,
        )
        try:
            with translate_errors(where):
                client.ping()
            broker = cls(client, Keys(prefix), where)
            broker.ensure_group()
        except RedisUnavailable as exc:
            client.close()
            if not secure and any(s in str(exc) for s in ("closed by server", "reset by peer")):
                raise RedisUnavailable(f"{exc} (a TLS-only Redis? give a rediss:// URL and "
                                       "its CA: --tls-ca)") from None
            raise
        except BaseException:
            client.close()
            raise
        return broker

    def close(self) -> None:
        self.client.close()

    # -- coordinator -------------------------------------------------------------------------

    @edge
    def create_job(self, jid: str, fields: dict[str, Any], workdir: bytes | None = None) -> None:
        """Register job ``jid`` for the coordinator whose token is ``fields["owner"]``; a
        retry of its own creation writes the same again, but a job of another owner is never
        overwritten (``Fenced``)."""
        job = self.keys.job(jid)
        try:
            self._create(job, jid, fields, workdir)
        except redis.WatchError as exc:  # the job changed meanwhile, or the connection broke
            raise RedisUnavailable(f"Redis at {self.where}: registering job {jid} was "
                                   f"interrupted ({exc})") from None

    def _create(self, job: str, jid: str, fields: dict[str, Any], workdir: bytes | None
                ) -> None:
        with self.client.pipeline() as pipe:
            pipe.watch(job)  # type: ignore[no-untyped-call]  # EXEC fails if job changed
            current: Any = pipe.hget(job, "owner")
            if current is not None and current.decode() != fields["owner"]:
                raise Fenced(jid)
            pipe.multi()
            if workdir is not None:
                pipe.set(self.keys.workdir(jid), workdir)
            pipe.hset(job, mapping=_fields(fields))
            pipe.sadd(self.keys.jobs, jid)
            pipe.execute()

    @edge
    def add_units(self, jid: str, owner: str,
                  batches: Sequence[Batch | Sequence[tuple[int, bytes]]]) -> None:
        """Queue batches of encoded units (a plain list: index -> sealed unit), in one round
        trip. ``JobGone`` or ``Fenced`` when the job is not ours to add to (then none of the
        batches was queued)."""
        def build(pipe: redis.client.Pipeline) -> None:
            for given in batches:
                batch = given if isinstance(given, Batch) else Batch(list(given))
                args: list[Any] = [owner, jid, 1, len(batch)]
                if batch.packed:
                    args += ("p", batch.packed)
                for index, blob in batch.units:
                    args += (index, blob)
                by_sha(pipe, self._add, [self.keys.units, self.keys.job(jid)], args)

        for reply in self.pipelined(build, transaction=False):
            self._owned(jid, _status(reply))

    @staticmethod
    def _owned(jid: str, status: str) -> None:
        if status == "GONE":
            raise JobGone(jid)
        if status == "FENCED":
            raise Fenced(jid)

    @edge
    def read_results(self, jid: str, after: str, count: int, block_ms: int | None
                     ) -> list[tuple[str, dict[bytes, bytes]]]:
        """Up to ``count`` results entries after ``after``, waiting up to ``block_ms`` for one
        (None: not waiting)."""
        reply: Any = self.client.xread({self.keys.results(jid): after}, count=count,
                                       block=block_ms)
        if not reply:
            return []
        entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1]
        return [(mid.decode(), fields) for mid, fields in entries]

    @edge
    def fetch_blobs(self, jid: str, refs: Sequence[bytes]) -> list[bytes | None]:
        """The large results named by ``R<field>`` references, in one round trip (None for
        one that is not there)."""
        reply: Any = self.client.hmget(self.keys.blobs(jid), [r[1:] for r in refs])
        blobs: list[bytes | None] = list(reply)
        return blobs

    @edge
    def consume(self, jid: str, owner: str, upto: str, fields: Sequence[bytes]) -> None:
        """Drop what the coordinator has gathered: results entries up to ``upto`` (an entry
        id, inclusive; "" for none) and the job's blobs named ``fields`` (large results, and
        the units kept for spooled results). Idempotent."""
        k = self.keys
        minid = ""
        if upto:
            ms, _, seq = upto.partition("-")
            minid = f"{ms}-{int(seq) + 1}"
        reply = self._consume(keys=[k.job(jid), k.results(jid), k.blobs(jid)],
                              args=[owner, minid, *fields])
        self._owned(jid, _status(reply))

    @edge
    def requeue(self, jid: str, owner: str, index: int, ref: bytes) -> bool:
        """A result recorded as ``ref`` (in a host's spool) is lost with its host: clear its
        unit's recorded bit and queue the unit again, once. Idempotent: True only for the call
        that queued it."""
        k = self.keys
        reply = self._requeue(keys=[k.job(jid), k.recorded(jid), k.units, k.blobs(jid),
                                    k.stats(jid)], args=[owner, jid, index, ref])
        self._owned(jid, _status(reply))
        return bool(int(reply[1]))

    @edge
    def reclaim(self, jid: str, owner: str, mask: bytes) -> None:
        """Clear the recorded bits set in ``mask`` (results lost with a previous coordinator),
        so that those units are recorded again."""
        reply = self._reclaim(keys=[self.keys.job(jid), self.keys.recorded(jid)],
                              args=[owner, mask])
        self._owned(jid, _status(reply))

    @edge
    def resign(self, jid: str, owner: str, fields: dict[str, Any]) -> None:
        """Write the job's signed description (``resume.signed``), fenced."""
        args: list[Any] = [owner]
        for name, value in fields.items():
            args += (name, value)
        self._owned(jid, _status(self._resign(keys=[self.keys.job(jid)], args=args)))

    @edge
    def keep_final(self, jid: str, value: bytes, seconds: int) -> None:
        """Keep the encoded value gather returned, for ``seconds`` (the job's ``--keep``), so
        that a coordinator resuming the job can deliver it without computing it again. Not
        fenced: any coordinator that got this far gathered every unit of the same job."""
        self.client.set(self.keys.final(jid), value, ex=max(1, seconds))

    @edge
    def final(self, jid: str) -> bytes | None:
        """What ``keep_final`` kept, or None."""
        reply: Any = self.client.get(self.keys.final(jid))
        return bytes(reply) if reply is not None else None

    @edge
    def job_stats(self, jid: str) -> dict[str, int]:
        reply: Any = self.client.hgetall(self.keys.stats(jid))
        raw: dict[bytes, bytes] = reply
        return {k.decode(): int(v) for k, v in raw.items()}

    @edge
    def purge_job(self, jid: str, owner: str, identity: str = "", keep_logs_s: int = 86400
                  ) -> None:
        """Remove the job's keys and queued units, and keep its logs ``keep_logs_s`` longer;
        ``Fenced`` for a stale coordinator. Idempotent: purging a job that is gone already
        succeeds."""
        k = self.keys
        reply = self._purge(keys=[k.units, k.jobs, k.logs(jid), k.ended, *k.job_keys(jid)],
                            args=[GROUP, jid, owner, max(1, keep_logs_s) * 1000])
        self._owned(jid, _status(reply))
        if identity:
            self.release(identity, jid)

    @edge
    def job_fields(self, jid: str) -> dict[str, str] | None:
        reply: Any = self.client.hgetall(self.keys.job(jid))
        raw: dict[bytes, bytes] = reply
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()} or None

    @edge
    def job_exists(self, jid: str) -> bool:
        return bool(self.client.exists(self.keys.job(jid)))

    @edge
    def take_over(self, jid: str, owner: str) -> Snapshot | None:
        """Become the job's owner (the previous coordinator is fenced from now on); None when
        the job is gone. Idempotent for the same ``owner``."""
        k = self.keys
        reply = self._takeover(keys=[k.job(jid), k.recorded(jid), k.results(jid)], args=[owner])
        if _status(reply) != "OK":
            return None
        return Snapshot(bytes(reply[1]), reply[2].decode())

    @edge
    def find_resumable(self, identity: str) -> str | None:
        reply: Any = self.client.get(self.keys.resume(identity))
        found: bytes | None = reply
        return found.decode() if found else None

    @edge
    def set_resumable(self, identity: str, jid: str) -> None:
        self.client.set(self.keys.resume(identity), jid)

    @edge
    def claim(self, name: str, jid: str, keep_s: int) -> str | None:
        """Take the name a job goes by for ``jid``; None when it is ours, else the id of the
        job that holds it."""
        reply = self._claim(keys=[self.keys.resume(name)], args=[jid, max(1, keep_s) * 1000])
        return None if _status(reply) == "OK" else self._str(reply[1])

    @edge
    def release(self, name: str, jid: str) -> None:
        """Drop the name if it still points at ``jid``."""
        self._release(keys=[self.keys.resume(name)], args=[jid])

    @edge
    def owner(self, jid: str) -> str | None:
        reply: Any = self.client.hget(self.keys.job(jid), "owner")
        value: bytes | None = reply
        return value.decode() if value is not None else None

    @edge
    def pending(self, count: int = 1000) -> list[tuple[str, str, int]]:
        """(entry id, worker, ms since delivery) of delivered, unrecorded entries, any job."""
        reply: Any = self.client.xpending_range(self.keys.units, GROUP, "-", "+", count)
        rows: list[dict[str, Any]] = reply
        return [(r["message_id"].decode(), r["consumer"].decode(), int(r["time_since_delivered"]))
                for r in rows]

    @edge
    def copy_entry(self, jid: str, owner: str, msgid: str) -> int:
        """Queue a speculative copy of entry ``msgid`` of this job; units copied."""
        k = self.keys
        reply = self._copy(keys=[k.units, k.job(jid), k.stats(jid), k.recorded(jid)],
                           args=[owner, msgid, jid])
        self._owned(jid, _status(reply))
        return int(reply[1])

    @edge
    def expire_job(self, jid: str, seconds: int, identity: str = "") -> None:
        """Keep an unfinished job for ``seconds`` after its coordinator was last heard of."""
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys.job_keys(jid) + [self.keys.logs(jid)] + (
                [self.keys.resume(identity)] if identity else []):
            pipe.expire(key, seconds)
        pipe.execute()

    @edge
    def expired_workers(self, lease_ms: int, full: bool = True, most: int = EXPIRED_MOST
                        ) -> list[str]:
        """Workers whose lease is older than ``lease_ms`` (at most ``most``; the rest at the
        next call); with ``full``, also consumers of the work stream that hold no lease at
        all (their leases were forgotten by `cluster down`, or never were): a scan of every
        consumer, where the rest costs what it finds."""
        k = self.keys
        reply: Any = self._expired(keys=[k.units, k.workers, k.leases, k.orphans],
                                   args=[GROUP, lease_ms, "1" if full else "0", most,
                                         k.agent_workers_template()])
        return [w.decode() for w in reply]

    @edge
    def agent_fingerprints(self, lease_ms: int) -> dict[str, str | None]:
        """Live agent -> fingerprint of the cluster key it holds."""
        prints: dict[str, str | None] = {}
        for aid in self.live_agents(lease_ms):
            reply: Any = self.client.hget(self.keys.agent(aid), "key")
            value: bytes | None = reply
            prints[aid] = value.decode() if value is not None else None
        return prints

    @edge
    def live_agents_info(self, lease_ms: int) -> list[dict[str, str]]:
        """What each live agent registered: host, version, installed packages..."""
        return self._hashes([self.keys.agent(aid) for aid in self.live_agents(lease_ms)])

    @edge
    def set_total(self, jid: str, total: int) -> None:
        """Scatter is done: the job has ``total`` units (kept for a resuming coordinator)."""
        self.client.hset(self.keys.job(jid), "total", total)

    # -- job control and logs --------------------------------------------------------------

    @edge
    def describe_job(self, jid: str, info: dict[str, Any]) -> None:
        """Fields of a job that only say who runs it (its coordinator's host and pid)."""
        if self.client.exists(self.keys.job(jid)):
            self.client.hset(self.keys.job(jid), mapping=_fields(info))

    @edge
    def beat(self, jid: str, owner: str) -> str:
        """The coordinator's heartbeat on its job; returns who asked it to stop ("" if no
        one). ``JobGone`` or ``Fenced`` when the job is not ours."""
        reply = self._beat(keys=[self.keys.job(jid)], args=[owner])
        self._owned(jid, _status(reply))
        return self._str(reply[1])

    @edge
    def cancel_job(self, jid: str, who: str) -> int | None:
        """Ask job ``jid``'s coordinator to stop. Returns how many ms ago it last beat (a
        large number if it never did), or None when the job is not in Redis."""
        reply = self._cancel(keys=[self.keys.job(jid)], args=[who])
        return int(reply[1]) if _status(reply) == "OK" else None

    @edge
    def read_logs(self, jid: str, after: str = "0-0", count: int = 1000
                  ) -> list[tuple[str, bytes]]:
        """Log records of a job after the stream id ``after``, oldest first."""
        reply: Any = self.client.xrange(self.keys.logs(jid), min=f"({after}" if after != "0-0"
                                        else "-", max="+", count=count)
        return [(mid.decode(), fields[b"r"]) for mid, fields in reply if b"r" in fields]

    @edge
    def logs_exist(self, jid: str) -> bool:
        return bool(self.client.exists(self.keys.logs(jid)))
