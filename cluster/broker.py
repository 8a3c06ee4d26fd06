"""The only Redis client code, and its Lua scripts. Key names come from ``keys.py``.

Each script is one atomic step of the protocol:

- ``ADD``: a coordinator appends a batch of units, fenced by its owner token.
- ``RECORD``: a worker commits a batch: for each unit, the first result wins (a bit in the job's
  ``recorded`` bitmap), a duplicate is discarded and counted; a unit that raised is re-queued
  until it runs out of attempts, then recorded as failed; then the entry is acknowledged. A
  commit for an entry no longer pending for that worker (its lease was lost and the entry was
  reissued) is discarded and counted as stale.
- ``REISSUE``: the entries pending for a dead worker are queued again (split into single units
  when the death is charged to them as an attempt, so a unit that kills its worker is isolated).
- ``RENEW``: an agent renews its heartbeat and the leases of its workers, on Redis server time.
- ``PURGE``: a finished job's keys and any of its entries still queued are removed.

A large result does not pass through a script: the worker stores it in the job's ``blobs`` hash
in the same round trip, and the script records a reference to it (or deletes it when the result
is a duplicate or stale).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis

from .errors import InfraError, RedisUnavailable
from .keys import GROUP, Keys

_JOBKEYS = """
local function jobkey(template, jid) return (string.gsub(template, '{jid}', jid)) end
"""

_ADD = """
if redis.call('HGET', KEYS[2], 'owner') ~= ARGV[1] then
  return redis.error_reply('FENCED job ' .. ARGV[2] .. ' is owned by another coordinator')
end
local fields = {'j', ARGV[2], 'a', ARGV[3]}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
return redis.call('XADD', KEYS[1], '*', unpack(fields))
"""

_RECORD = """
local units, job, recorded, results, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local function drop(payload)  -- a large result sent beside the script, not recorded
  if string.sub(payload, 1, 1) == 'R' then redis.call('HDEL', KEYS[6], string.sub(payload, 2)) end
end
local group, msgid, wid, seconds, jid = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local attempt = tonumber(ARGV[6])
local n = (#ARGV - 6) / 4
if redis.call('EXISTS', job) == 0 then
  redis.call('XACK', units, group, msgid)
  redis.call('XDEL', units, msgid)
  redis.call('DEL', KEYS[6])
  return {-1, 0}
end
if #redis.call('XPENDING', units, group, msgid, msgid, 1, wid) == 0 then
  for i = 7, #ARGV, 4 do drop(ARGV[i + 2]) end
  redis.call('HINCRBY', stats, 'stale', n)
  return {0, 0}
end
local max_attempts = tonumber(redis.call('HGET', job, 'max_attempts'))
local out = {'w', wid, 't', seconds}
local done, dups = 0, 0
for i = 7, #ARGV, 4 do
  local idx, kind, payload, unit = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('GETBIT', recorded, idx) == 1 then
    drop(payload)
    dups = dups + 1
  elseif kind == 'ok' then
    redis.call('SETBIT', recorded, idx, 1)
    out[#out + 1] = idx
    out[#out + 1] = payload
    done = done + 1
  elseif kind == 'err' and attempt < max_attempts then
    redis.call('XADD', units, '*', 'j', jid, 'a', attempt + 1, idx, unit)
    redis.call('HINCRBY', stats, 'retried', 1)
  else
    redis.call('SETBIT', recorded, idx, 1)
    redis.call('XADD', results, '*', 'f', idx, 'e', payload)
    redis.call('HINCRBY', stats, 'failed', 1)
  end
end
if done > 0 then
  redis.call('XADD', results, '*', unpack(out))
  redis.call('HINCRBY', stats, 'recorded', done)
end
if dups > 0 then redis.call('HINCRBY', stats, 'duplicates', dups) end
redis.call('XACK', units, group, msgid)
redis.call('XDEL', units, msgid)
return {done, dups}
"""

_REISSUE = _JOBKEYS + """
local units, workers = KEYS[1], KEYS[2]
local group, wid, charge, reason = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local lease = tonumber(ARGV[5])
if lease > 0 then
  local seen = redis.call('ZSCORE', workers, wid)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if seen and now - tonumber(seen) <= lease then return -1 end
end
local moved = 0
local pending = redis.call('XPENDING', units, group, '-', '+', 100000, wid)
for _, p in ipairs(pending) do
  local id = p[1]
  local entry = redis.call('XRANGE', units, id, id)
  redis.call('XACK', units, group, id)
  redis.call('XDEL', units, id)
  if #entry > 0 then
    local f = entry[1][2]
    local jid, attempt = f[2], tonumber(f[4])
    local job = jobkey(ARGV[6], jid)
    if redis.call('EXISTS', job) == 1 then
      local recorded = jobkey(ARGV[7], jid)
      local results, stats = jobkey(ARGV[8], jid), jobkey(ARGV[9], jid)
      local max_attempts = tonumber(redis.call('HGET', job, 'max_attempts'))
      local whole = {'j', jid, 'a', attempt}
      for i = 5, #f, 2 do
        local idx, unit = f[i], f[i + 1]
        if redis.call('GETBIT', recorded, idx) == 0 then
          moved = moved + 1
          if not charge then
            whole[#whole + 1] = idx
            whole[#whole + 1] = unit
          elseif attempt < max_attempts then
            redis.call('XADD', units, '*', 'j', jid, 'a', attempt + 1, idx, unit)
          else
            redis.call('SETBIT', recorded, idx, 1)
            redis.call('XADD', results, '*', 'f', idx, 'e', cjson.encode({
              error = reason, attempts = attempt, worker = wid, traceback = ''}))
            redis.call('HINCRBY', stats, 'failed', 1)
          end
        end
      end
      if #whole > 4 then redis.call('XADD', units, '*', unpack(whole)) end
      redis.call('HINCRBY', stats, 'reissued', moved)
    end
  end
end
redis.call('XGROUP', 'DELCONSUMER', units, group, wid)
redis.call('ZREM', workers, wid)
redis.call('DEL', KEYS[3])
return moved
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now, ARGV[1])
local refused = {}
for i = 2, #ARGV do
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', now, ARGV[i]) == 0
     and not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    refused[#refused + 1] = ARGV[i]
  end
end
return {now, redis.call('EXISTS', KEYS[3]), refused}
"""

_REGISTER_WORKER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return now
"""

_EXPIRED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local dead = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name
  for i = 1, #c, 2 do if c[i] == 'name' then name = c[i + 1] end end
  local seen = redis.call('ZSCORE', KEYS[2], name)
  if not seen or now - tonumber(seen) > lease then dead[#dead + 1] = name end
end
return dead
"""

_PURGE = """
local units, group, jid = KEYS[1], ARGV[1], ARGV[2]
for _, e in ipairs(redis.call('XRANGE', units, '-', '+')) do
  if e[2][2] == jid then
    redis.call('XACK', units, group, e[1])
    redis.call('XDEL', units, e[1])
  end
end
redis.call('SREM', KEYS[2], jid)
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""


@dataclass(frozen=True)
class Work:
    """One stream entry as a worker receives it."""

    msgid: str
    jid: str
    attempt: int
    units: list[tuple[int, bytes]]


BLOB_THRESHOLD = 32 * 1024  # results at least this large travel beside the RECORD script


@dataclass(frozen=True)
class Outcome:
    """What a worker reports for one unit: ``ok`` with the encoded result, ``err`` (retryable)
    or ``fatal`` with a JSON error; ``unit`` is the encoded unit, needed to queue a retry."""

    index: int
    kind: str
    payload: bytes
    unit: bytes = b""


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
        self._add = reg(_ADD)
        self._record = reg(_RECORD)
        self._reissue = reg(_REISSUE)
        self._renew = reg(_RENEW)
        self._register_worker = reg(_REGISTER_WORKER)
        self._expired = reg(_EXPIRED)
        self._purge = reg(_PURGE)

    @classmethod
    def connect(
        cls, url: str, password: str | None = None, *, prefix: str = "cluster:",
        timeout: float = 5.0,
    ) -> Broker:
        """Connect and check that Redis answers and accepts our credentials."""
        where = redact(url)
        with translate_errors(where):
            client = redis.Redis.from_url(
                url, password=password or None, socket_connect_timeout=timeout,
                socket_timeout=60, socket_keepalive=True, health_check_interval=30,
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

    def purge_job(self, jid: str) -> None:
        self._purge(keys=[self.keys.units, self.keys.jobs, *self.keys.job_keys(jid)],
                    args=[GROUP, jid])

    def expired_workers(self, lease_ms: int) -> list[str]:
        """Consumers of the work stream whose lease is older than ``lease_ms``."""
        return [w.decode() for w in self._expired(keys=[self.keys.units, self.keys.workers],
                                                  args=[GROUP, lease_ms])]

    def live_workers(self, lease_ms: int) -> list[str]:
        return self._alive(self.keys.workers, lease_ms)

    def live_agents(self, lease_ms: int) -> list[str]:
        return self._alive(self.keys.agents, lease_ms)

    def _alive(self, zset: str, lease_ms: int) -> list[str]:
        now = self.server_time_ms()
        return [m.decode() for m in self.client.zrangebyscore(zset, now - lease_ms, "+inf")]

    # -- worker --------------------------------------------------------------------------------

    def read_work(self, wid: str, block_ms: int) -> Work | None:
        reply = self.client.xreadgroup(GROUP, wid, {self.keys.units: ">"}, count=1,
                                       block=block_ms)
        if not reply or not reply[0][1]:
            return None
        msgid, fields = reply[0][1][0]
        items = list(fields.items())
        jid, attempt = items[0][1].decode(), int(items[1][1])
        units = [(int(k), v) for k, v in items[2:]]
        return Work(msgid.decode(), jid, attempt, units)

    def job_info(self, jid: str) -> dict[str, bytes] | None:
        raw = self.client.hgetall(self.keys.job(jid))
        return {k.decode(): v for k, v in raw.items()} or None

    def record(self, work: Work, wid: str, seconds: float, outcomes: Sequence[Outcome]
               ) -> tuple[int, int]:
        """Commit a batch. Returns (results recorded, duplicates); (0, 0) when it was stale."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        args: list[Any] = [GROUP, work.msgid, wid, f"{seconds:.6f}", work.jid, work.attempt]
        for o in outcomes:
            payload = o.payload
            if o.kind == "ok" and len(payload) >= BLOB_THRESHOLD:
                field = f"{work.msgid}:{o.index}"
                pipe.hset(k.blobs(work.jid), field, payload)
                payload = b"R" + field.encode()
            args += (o.index, o.kind, payload, o.unit)
        self._record(keys=[k.units, k.job(work.jid), k.recorded(work.jid), k.results(work.jid),
                           k.stats(work.jid), k.blobs(work.jid)], args=args, client=pipe)
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

    def register_worker(self, wid: str, info: dict[str, Any]) -> None:
        args: list[Any] = [wid]
        for key, value in info.items():
            args += (key, value)
        self._register_worker(keys=[self.keys.workers, self.keys.worker(wid)], args=args)

    def renew(self, aid: str, wids: Sequence[str]) -> tuple[int, bool, list[str]]:
        """Heartbeat of an agent and lease renewal of its workers.

        Returns (server time ms, shutdown requested, workers whose lease was already taken)."""
        now, shutdown, refused = self._renew(
            keys=[self.keys.workers, self.keys.agents, self.keys.shutdown], args=[aid, *wids])
        return int(now), bool(shutdown), [w.decode() for w in refused]

    def reissue(self, wid: str, *, charge: bool, reason: str, lease_ms: int = 0) -> int:
        """Queue again what ``wid`` held; with ``lease_ms``, only if its lease is that old.

        Returns how many units were queued again, or -1 when the lease was still fresh."""
        moved = self._reissue(
            keys=[self.keys.units, self.keys.workers, self.keys.worker(wid)],
            args=[GROUP, wid, "1" if charge else "0", reason, lease_ms,
                  *self.keys.job_templates()])
        return int(moved)
