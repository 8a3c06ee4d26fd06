"""The only Redis client code: the rest of ``cluster`` sees Redis through ``Broker``.

The protocol's atomic steps are Lua scripts, in ``scripts.py``. A large result does not pass
through a script: the worker stores it in the job's ``blobs`` hash in the same round trip, and
the script records a reference to it (or deletes it when the result is a duplicate or stale).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis

from . import scripts
from .errors import InfraError, RedisUnavailable
from .keys import GROUP, Keys


@dataclass(frozen=True)
class Work:
    """One stream entry as a worker receives it."""

    msgid: str
    jid: str
    attempt: int
    units: list[tuple[int, bytes]]


BLOB_THRESHOLD = 32 * 1024  # results at least this large travel beside the RECORD script


@dataclass(frozen=True)
class Recorded:
    """A results entry: units of one batch recorded for the first time (payloads may be
    ``R...`` references to the job's blobs, see ``fetch_blobs``)."""

    wid: str
    seconds: float  # compute time of the whole batch
    batch: int  # units in the batch, duplicates included
    units: list[tuple[int, bytes]]


@dataclass(frozen=True)
class Failed:
    """A results entry: a unit recorded as failed for good."""

    index: int
    error: dict[str, Any]


@dataclass(frozen=True)
class Mismatch:
    """A results entry: a later result for ``index`` differed from the first one."""

    index: int
    wid: str


def parse_result(fields: dict[bytes, bytes]) -> Recorded | Failed | Mismatch:
    """One entry of a job's results stream, as RECORD and REISSUE write it."""
    if b"f" in fields:
        return Failed(int(fields[b"f"]), json.loads(fields[b"e"]))
    if b"m" in fields:
        return Mismatch(int(fields[b"m"]), fields[b"w"].decode())
    items = list(fields.items())
    units = [(int(i), p) for i, p in items[2:]]
    return Recorded(items[0][1].decode(), float(items[1][1]), len(units), units)


@dataclass(frozen=True)
class Outcome:
    """What a worker reports for one unit: ``ok`` with the encoded result, ``err`` (retryable)
    or ``fatal`` with a JSON error; ``unit`` is the encoded unit, needed to queue a retry."""

    index: int
    kind: str
    payload: bytes
    unit: bytes = b""
    digest: bytes = b""  # 8 bytes of the result's hash, to compare with later duplicates


def redact(url: str) -> str:
    """``host:port`` of a Redis URL, without user or password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


@contextmanager
def translate_errors(where: str) -> Iterator[None]:
    """Turn redis-py's connection and authentication errors into ``RedisUnavailable``."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise RedisUnavailable(f"Redis at {where} refused the password: {exc}") from None
    except redis.ResponseError as exc:
        text = str(exc)
        if text.startswith(("NOAUTH", "WRONGPASS", "invalid password", "invalid username")):
            raise RedisUnavailable(f"Redis at {where} refused us: {text}") from None
        raise
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailable(f"Redis at {where} is unreachable: {exc}") from None


class Broker:
    """Redis, as the rest of ``cluster`` sees it."""

    def __init__(self, client: redis.Redis, keys: Keys, where: str = "redis") -> None:
        self.client = client
        self.keys = keys
        self.where = where
        reg = client.register_script
        self._add = reg(scripts.ADD)
        self._record = reg(scripts.RECORD)
        self._reissue = reg(scripts.REISSUE)
        self._renew = reg(scripts.RENEW)
        self._register_worker = reg(scripts.REGISTER_WORKER)
        self._expired = reg(scripts.EXPIRED)
        self._purge = reg(scripts.PURGE)
        self._takeover = reg(scripts.TAKEOVER)
        self._copy = reg(scripts.COPY)

    @classmethod
    def connect(
        cls, url: str, password: str | None = None, *, prefix: str = "cluster:",
        timeout: float = 5.0, socket_timeout: float = 60.0,
    ) -> Broker:
        """Connect and check that Redis answers and accepts our credentials."""
        where = redact(url)
        with translate_errors(where):
            client = redis.Redis.from_url(
                url, password=password or None, socket_connect_timeout=timeout,
                socket_timeout=socket_timeout, socket_keepalive=True, health_check_interval=30,
            )
            client.ping()
        broker = cls(client, Keys(prefix), where)
        broker.ensure_group()
        return broker

    def close(self) -> None:
        self.client.close()

    def ensure_group(self) -> None:
        with translate_errors(self.where):
            try:
                self.client.xgroup_create(self.keys.units, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def server_time_ms(self) -> int:
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # -- coordinator -------------------------------------------------------------------------

    def create_job(self, jid: str, fields: dict[str, Any]) -> None:
        pipe = self.client.pipeline()
        pipe.hset(self.keys.job(jid), mapping=fields)
        pipe.sadd(self.keys.jobs, jid)
        pipe.execute()

    def add_units(self, jid: str, owner: str, batches: Sequence[Sequence[tuple[int, bytes]]]
                  ) -> None:
        """Queue batches of encoded units, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for batch in batches:
            args: list[Any] = [owner, jid, 1]
            for index, blob in batch:
                args += (index, blob)
            self._add(keys=[self.keys.units, self.keys.job(jid)], args=args, client=pipe)
        pipe.execute()

    def read_results(self, jid: str, after: str, count: int, block_ms: int
                     ) -> list[tuple[str, dict[bytes, bytes]]]:
        reply = self.client.xread({self.keys.results(jid): after}, count=count, block=block_ms)
        if not reply:
            return []
        return [(mid.decode(), fields) for mid, fields in reply[0][1]]

    def fetch_blobs(self, jid: str, refs: Sequence[bytes]) -> list[bytes]:
        """The large results named by ``R<field>`` references, in one round trip."""
        values = self.client.hmget(self.keys.blobs(jid), [r[1:] for r in refs])
        if any(v is None for v in values):
            raise InfraError(f"job {jid}: a recorded result is missing from Redis (was it "
                             "flushed or restarted without persistence?)")
        return values

    def job_stats(self, jid: str) -> dict[str, int]:
        raw = self.client.hgetall(self.keys.stats(jid))
        return {k.decode(): int(v) for k, v in raw.items()}

    def purge_job(self, jid: str, owner: str, identity: str = "") -> None:
        """Remove the job's keys and queued units; refused (FENCED) to a stale coordinator."""
        self._purge(keys=[self.keys.units, self.keys.jobs, *self.keys.job_keys(jid)],
                    args=[GROUP, jid, owner])
        if identity:
            self.client.delete(self.keys.resume(identity))

    def job_fields(self, jid: str) -> dict[str, str] | None:
        raw = self.client.hgetall(self.keys.job(jid))
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()} or None

    def take_over(self, jid: str, owner: str) -> bool:
        """Become the job's owner (the previous coordinator is fenced from now on)."""
        return bool(self._takeover(keys=[self.keys.job(jid)], args=[owner]))

    def owner(self, jid: str) -> str | None:
        value = self.client.hget(self.keys.job(jid), "owner")
        return value.decode() if value is not None else None

    def pending(self, count: int = 1000) -> list[tuple[str, str, int]]:
        """(entry id, worker, ms since delivery) of delivered, unrecorded entries, any job."""
        rows = self.client.xpending_range(self.keys.units, GROUP, "-", "+", count)
        return [(r["message_id"].decode(), r["consumer"].decode(), int(r["time_since_delivered"]))
                for r in rows]

    def copy_entry(self, jid: str, owner: str, msgid: str) -> int:
        """Queue a speculative copy of entry ``msgid`` of this job; units copied."""
        k = self.keys
        return int(self._copy(keys=[k.units, k.job(jid), k.stats(jid), k.recorded(jid)],
                              args=[owner, msgid, jid]))

    def expire_job(self, jid: str, seconds: int, identity: str = "") -> None:
        """Keep an unfinished job for ``seconds`` after its coordinator was last heard of."""
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys.job_keys(jid) + ([self.keys.resume(identity)] if identity else []):
            pipe.expire(key, seconds)
        pipe.execute()

    def expired_workers(self, lease_ms: int) -> list[str]:
        """Consumers of the work stream whose lease is older than ``lease_ms``."""
        return [w.decode() for w in self._expired(keys=[self.keys.units, self.keys.workers],
                                                  args=[GROUP, lease_ms])]

    def live_workers(self, lease_ms: int) -> list[str]:
        return self._alive(self.keys.workers, lease_ms)

    def live_agents(self, lease_ms: int) -> list[str]:
        return self._alive(self.keys.agents, lease_ms)

    def agent_fingerprints(self, lease_ms: int) -> dict[str, str | None]:
        """Live agent -> fingerprint of the cluster key it holds."""
        prints: dict[str, str | None] = {}
        for aid in self.live_agents(lease_ms):
            value = self.client.hget(self.keys.agent(aid), "key")
            prints[aid] = value.decode() if value is not None else None
        return prints

    def set_total(self, jid: str, total: int) -> None:
        """Scatter is done: the job has ``total`` units (kept for a resuming coordinator)."""
        self.client.hset(self.keys.job(jid), "total", total)

    def _alive(self, zset: str, lease_ms: int) -> list[str]:
        now = self.server_time_ms()
        return [m.decode() for m in self.client.zrangebyscore(zset, now - lease_ms, "+inf")]

    # -- worker --------------------------------------------------------------------------------

    def read_work(self, wid: str, block_ms: int, own: bool = False) -> Work | None:
        """The next entry for worker ``wid``; with ``own``, one already delivered to it and
        not acknowledged (after a lost connection, a delivery may never have reached it)."""
        try:
            reply = self.client.xreadgroup(GROUP, wid, {self.keys.units: "0" if own else ">"},
                                           count=1, block=None if own else block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()  # Redis lost its data: start again with an empty stream
            return None
        if not reply or not reply[0][1]:
            return None
        msgid, fields = reply[0][1][0]
        if not fields:  # delivered, then deleted (its job was purged): nothing to do
            self.client.xack(self.keys.units, GROUP, msgid)
            return self.read_work(wid, block_ms, own) if own else None
        items = list(fields.items())
        jid, attempt = items[0][1].decode(), int(items[1][1])
        units = [(int(k), v) for k, v in items[2:]]
        return Work(msgid.decode(), jid, attempt, units)

    def job_info(self, jid: str) -> dict[str, bytes] | None:
        raw = self.client.hgetall(self.keys.job(jid))
        return {k.decode(): v for k, v in raw.items()} or None

    def record(self, work: Work, wid: str, seconds: float, outcomes: Sequence[Outcome]
               ) -> tuple[int, int]:
        """Commit a batch. Returns (results recorded, duplicates); (-2, 0) when it was stale
        (this worker lost its lease), (-1, 0) when the job is gone."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        args: list[Any] = [GROUP, work.msgid, wid, f"{seconds:.6f}", work.jid, work.attempt]
        for o in outcomes:
            payload = o.payload
            if o.kind == "ok" and len(payload) >= BLOB_THRESHOLD:
                field = f"{work.msgid}:{o.index}"
                pipe.hset(k.blobs(work.jid), field, payload)
                payload = b"R" + field.encode()
            args += (o.index, o.kind, payload, o.unit, o.digest)
        self._record(keys=[k.units, k.job(work.jid), k.recorded(work.jid), k.results(work.jid),
                           k.stats(work.jid), k.blobs(work.jid), k.digests(work.jid),
                           k.worker(wid)],
                     args=args, client=pipe)
        done, dups = pipe.execute()[-1]
        return int(done), int(dups)

    # -- agent -----------------------------------------------------------------------------------

    def register_agent(self, aid: str, info: dict[str, Any]) -> None:
        self.client.hset(self.keys.agent(aid), mapping=info)

    def unregister_agent(self, aid: str) -> None:
        pipe = self.client.pipeline()
        pipe.zrem(self.keys.agents, aid)
        pipe.delete(self.keys.agent(aid))
        pipe.execute()

    def describe_worker(self, wid: str, info: dict[str, Any]) -> None:
        """Add to what `cluster status` shows of a worker (pid, current job and unit)."""
        self.client.hset(self.keys.worker(wid), mapping=info)

    def register_worker(self, wid: str, info: dict[str, Any]) -> None:
        args: list[Any] = [wid]
        for key, value in info.items():
            args += (key, value)
        self._register_worker(keys=[self.keys.workers, self.keys.worker(wid)], args=args)

    def renew(self, aid: str, wids: Sequence[str]) -> tuple[bool, list[str], bool]:
        """Heartbeat of an agent and lease renewal of its workers. Returns (shutdown requested,
        workers whose lease was already taken, whether the agent's registration is there)."""
        _, shutdown, refused, registered = self._renew(
            keys=[self.keys.workers, self.keys.agents, self.keys.shutdown, self.keys.agent(aid)],
            args=[aid, *wids])
        return bool(shutdown), [w.decode() for w in refused], bool(registered)

    def reissue(self, wid: str, *, charge: bool, reason: str, lease_ms: int = 0) -> int:
        """Queue again what ``wid`` held; with ``lease_ms``, only if its lease is that old.

        Returns how many units were queued again, or -1 when the lease was still fresh."""
        moved = self._reissue(
            keys=[self.keys.units, self.keys.workers, self.keys.worker(wid)],
            args=[GROUP, wid, "1" if charge else "0", reason, lease_ms,
                  *self.keys.job_templates()])
        return int(moved)

    # -- launcher / status ------------------------------------------------------------------
    # Every call here translates Redis errors (``_translated``): `up`, `down`, `status` and
    # `doctor` report a failing Redis in one line naming it, never with a traceback.

    AGENT_LEASE_MS = 5000  # an agent silent this long is lost; a new one on its host replaces it

    def agents_seen(self) -> list[tuple[str, float, dict[str, str]]]:
        """Every registered agent: (id, seconds since its last heartbeat, what it registered)."""
        with self._translated():
            now = self.server_time_ms()
            reply: Any = self.client.zrange(self.keys.agents, 0, -1, withscores=True)
            members = [(m.decode(), float(score)) for m, score in reply]
            infos = self._hashes([self.keys.agent(aid) for aid, _ in members])
        return [(aid, (now - score) / 1000, info)
                for (aid, score), info in zip(members, infos, strict=True)]

    def workers_seen(self) -> list[tuple[str, dict[str, str]]]:
        """Every registered worker, and what its agent published of it."""
        with self._translated():
            reply: Any = self.client.zrange(self.keys.workers, 0, -1)
            wids = [m.decode() for m in reply]
            return list(zip(wids, self._hashes([self.keys.worker(w) for w in wids]), strict=True))

    def live_agent(self, aid: str, lease_ms: int = AGENT_LEASE_MS) -> dict[str, str] | None:
        """What agent ``aid`` registered, if its heartbeat is younger than ``lease_ms``."""
        with self._translated():
            if aid not in self.live_agents(lease_ms):
                return None
            return self._hashes([self.keys.agent(aid)])[0]

    def forget_agent(self, aid: str) -> None:
        """Unregister an agent known to be gone (`up` replaced it)."""
        with self._translated():
            self.unregister_agent(aid)

    def live_agent_ids(self, lease_ms: int = AGENT_LEASE_MS) -> list[str]:
        with self._translated():
            return self.live_agents(lease_ms)

    def retire_replaced_agents(self, aid: str, host: str, lease_ms: int = AGENT_LEASE_MS
                               ) -> list[str]:
        """Unregister the other agents of ``host`` whose heartbeat is older than ``lease_ms``:
        agent ``aid`` replaces them (their host lost power, or they were SIGKILLed). An agent
        that was only paused registers again at its next heartbeat."""
        retired = [other for other, age, info in self.agents_seen()
                   if other != aid and age * 1000 > lease_ms
                   and info.get("host", other.split("/")[0]) == host]
        with self._translated():
            for other in retired:
                self.unregister_agent(other)
        return retired

    def request_shutdown(self) -> None:
        """Ask every agent to stop (``cluster down``)."""
        with self._translated():
            self.client.set(self.keys.shutdown, 1)

    def cancel_shutdown(self) -> None:
        with self._translated():
            self.client.delete(self.keys.shutdown)

    def forget_agents(self) -> None:
        """Drop every agent's heartbeat and worker's lease (after ``cluster down``)."""
        with self._translated():
            self.client.delete(self.keys.agents, self.keys.workers)

    def shutdown_server(self) -> None:
        """Stop Redis itself, saving first (its AOF is flushed)."""
        try:
            self.client.shutdown(nosave=False)
        except redis.ConnectionError:
            pass  # the connection closes as the server exits: that is success
        except redis.RedisError as exc:
            raise InfraError(f"Redis at {self.where} refused to shut down: {exc}") from None

    def server_config(self, *names: str) -> dict[str, str]:
        """``CONFIG GET`` of these parameters (maxclients, maxmemory...), as Redis runs now."""
        found: dict[str, str] = {}
        with self._translated():
            for name in names:
                reply: Any = self.client.config_get(name)
                found.update({self._str(k): self._str(v) for k, v in reply.items()})
        return found

    def raise_maxclients(self, wanted: int) -> int:
        """Raise ``maxclients`` to ``wanted`` if it is lower (Redis lowers what its file limit
        cannot hold); the value Redis runs with afterwards."""
        current = int(self.server_config("maxclients").get("maxclients", 0))
        if current < wanted:
            with self._translated():
                try:
                    self.client.config_set("maxclients", wanted)
                except redis.ResponseError:
                    pass  # beyond its file limit: it keeps what it has, said by the caller
            current = int(self.server_config("maxclients").get("maxclients", 0))
        return current

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """``translate_errors``, and any other Redis error as an ``InfraError`` naming Redis."""
        try:
            with translate_errors(self.where):
                yield
        except redis.RedisError as exc:
            raise InfraError(f"Redis at {self.where} failed: {exc}") from None

    @staticmethod
    def _str(value: bytes | str) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def _hashes(self, keys: list[str]) -> list[dict[str, str]]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return [{k.decode(): v.decode(errors="replace") for k, v in raw.items()}
                for raw in pipe.execute()] if keys else []
