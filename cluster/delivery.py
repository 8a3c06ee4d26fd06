"""The protocol's steps that workers and agents take: take work and mark it started, split a
packed entry, record a batch (``Delivery``); register, renew leases, reissue what a dead worker
held. ``Broker`` (``broker.py``) adds the coordinator's steps, and registers the Lua scripts
(``workscripts.py``) these call.

A large result does not pass through a script: the worker stores it in the job's ``blobs`` hash
in the same transaction (MULTI/EXEC: both happen or neither), under a field unique to that
commit attempt, and the script records a reference to it (or deletes it when the result is a
duplicate or stale).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import redis

from .entries import Commit, Outcome, Renewal, Work
from .errors import RedisFull
from .fleet import Fleet
from .keys import GROUP, JOB_ID
from .redisio import _fields, _status, edge

log = logging.getLogger("cluster.broker")
BLOB_THRESHOLD = 32 * 1024  # results at least this large travel beside the RECORD script


HEAD_FIELDS = (b"r", b"n", b"s", b"p")
USAGE_MS = 30_000  # an agent's published usage of its workers is kept this long


def _work(msgid: str, fields: dict[bytes, bytes], started: bool = False) -> Work | None:
    """A work entry as ADD, REISSUE, SPLIT and REQUEUE write it (see ``scripts.ADD``), or
    None."""
    items = list(fields.items())
    try:
        if len(items) < 3 or items[0][0] != b"j" or items[1][0] != b"a":
            return None
        head: dict[bytes, bytes] = {}
        first = 2
        while first < len(items) and items[first][0] in HEAD_FIELDS:
            head[items[first][0]] = items[first][1]
            first += 1
        units = [(int(k), v) for k, v in items[first:]]
        attempt = int(items[1][1])
        split = b"s" in head and len(units) > 1  # to split before computing (``TAKE``)
        if attempt < 1 or not units or any(i < 0 for i, _ in units):
            return None
        return Work(msgid, items[0][1].decode(), attempt, units,
                    reason=head.get(b"r", b"").decode("utf-8", "replace")[:200],
                    spool=not head.get(b"n"), started=started and not split,
                    split=split, packed=head.get(b"p", b""))
    except (ValueError, UnicodeDecodeError):
        return None


class Delivery(Fleet):
    """Redis as a worker and an agent see it (``Broker`` is one)."""

    scripts: list[redis.commands.core.Script]  # every script, registered by ``Broker``
    _take: Any
    _split: Any
    _record: Any
    _log: Any
    _renew: Any
    _renew_same: Any
    _register_worker: Any
    _reissue: Any

    @edge
    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.keys.units, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def pipelined(self, build: Callable[[redis.client.Pipeline], None], transaction: bool
                  ) -> list[Any]:
        """Run the pipeline ``build`` fills, whose scripts are called by their SHA alone: one
        round trip, where redis-py asks ``SCRIPT EXISTS`` before every pipeline that runs a
        script. A Redis that lost its scripts (restarted, flushed) answers NOSCRIPT: the
        scripts are loaded and the pipeline sent again (its plain commands write the same
        values again; no script ran)."""
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=transaction)
            build(pipe)
            try:
                return list(pipe.execute())
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                for script in self.scripts:
                    script.sha = str(self.client.script_load(script.script))
        raise AssertionError("unreachable")

    @edge
    def memory(self) -> tuple[int, int]:
        """(used, maxmemory) in bytes; maxmemory 0 means no limit."""
        info = self.client.info("memory")
        return int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))

    @edge
    def read_work(self, wid: str, block_ms: int, own: bool = False) -> Work | None:
        """The next entry for worker ``wid``; with ``own``, one already delivered to it and
        not acknowledged (after a lost connection, a delivery may never have reached it).
        An entry waiting in the stream comes marked as started (``TAKE``, one round trip);
        else the worker blocks reading the stream for up to ``block_ms``."""
        if not own:
            taken = self._take(keys=[self.keys.units, self.keys.worker(wid)], args=[GROUP, wid])
            status = _status(taken)
            if status == "NOGROUP":
                self.ensure_group()
                return None
            if status == "OK":
                flat: list[bytes] = taken[2]
                return self._checked(taken[1].decode(), dict(zip(flat[::2], flat[1::2],
                                                                 strict=True)), started=True)
        try:
            reply: Any = self.client.xreadgroup(GROUP, wid, {self.keys.units: "0" if own else ">"},
                                                count=1, block=None if own else block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()  # Redis lost its data: start again with an empty stream
            return None
        if not reply or not reply[0][1]:
            return None
        entry: tuple[bytes, dict[bytes, bytes]] = reply[0][1][0]
        msgid, fields = entry
        if not fields:  # delivered, then deleted (its job was purged): nothing to do
            self.client.xack(self.keys.units, GROUP, msgid)
            return self.read_work(wid, block_ms, own) if own else None
        work = self._checked(msgid.decode(), fields)
        if work is None and own:
            return self.read_work(wid, block_ms, own)
        return work

    def _checked(self, msgid: str, fields: dict[bytes, bytes], started: bool = False
                 ) -> Work | None:
        """The entry as a ``Work``; None when it is not what ADD writes: then it is dropped,
        so no worker trips on it again."""
        work = _work(msgid, fields, started)
        if work is None:
            log.warning("work entry %s is malformed (%s): dropped", msgid,
                        str(list(fields)[:4])[:100])
            self.client.xack(self.keys.units, GROUP, msgid)
            self.client.xdel(self.keys.units, msgid)
        return work

    @edge
    def job_info(self, jid: str) -> dict[str, bytes] | None:
        reply: Any = self.client.hgetall(self.keys.job(jid))
        raw: dict[bytes, bytes] = reply
        return {k.decode(): v for k, v in raw.items()} or None

    @edge
    def workdir(self, jid: str) -> bytes | None:
        """The job's packed directory (``workdir.Archive.data``)."""
        reply: Any = self.client.get(self.keys.workdir(jid))
        return bytes(reply) if reply is not None else None

    @edge
    def jobs_exist(self, jids: Sequence[str]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for jid in jids:
            pipe.exists(self.keys.job(jid))
        return [bool(n) for n in pipe.execute()]

    @edge
    @edge
    def split(self, work: Work, wid: str, units: Sequence[tuple[int, bytes]]) -> int:
        """Replace a packed entry marked to be split with one entry per unit (``units``:
        index, unit sealed on its own); how many were queued (0 when an earlier call, whose
        reply was lost, did it, or when the job is gone)."""
        args: list[Any] = [GROUP, work.msgid, wid, work.jid, work.attempt,
                           "" if work.spool else "1"]
        for index, blob in units:
            args += (index, blob)
        reply = self._split(keys=[self.keys.units, self.keys.job(work.jid)], args=args)
        return int(reply[1])

    def started(self, wid: str, work: Work) -> None:
        """The worker starts computing ``work``: a death from now on is charged to it (and
        ``cluster status`` shows the job and unit)."""
        self.client.hset(self.keys.worker(wid), mapping={
            "job": work.jid, "unit": work.units[0][0], "entry": work.msgid})

    @edge
    def record(self, work: Work, wid: str, seconds: float, outcomes: Sequence[Outcome],
               log_bound: int = 0, packed: bytes = b"") -> Commit:
        """Commit a batch (see ``Commit`` for the answers), with the log records of its units
        (up to ``log_bound`` bytes for the job) and ``packed``, the sealed small results that
        outcomes with the payload ``P`` name. Safe to call again with the same arguments
        after a lost reply (log records may then be written twice: readers drop the copy)."""
        k = self.keys
        self.check_room(sum(len(o.payload) for o in outcomes
                            if o.kind == "ok" and len(o.payload) >= BLOB_THRESHOLD))
        logs = [o.log for o in outcomes if o.log]
        attempt = secrets.token_hex(4)  # no commit can touch another commit's large results
        args: list[Any] = [GROUP, work.msgid, wid, f"{seconds:.6f}", work.jid, work.attempt,
                           packed]
        blobs: list[tuple[str, bytes]] = []
        for o in outcomes:
            payload = o.payload
            if o.kind == "ok" and len(payload) >= BLOB_THRESHOLD:
                blobs.append((f"{work.msgid}:{o.index}:{attempt}", payload))
                payload = b"R" + blobs[-1][0].encode()
            args += (o.index, o.kind, payload, o.unit, o.digest)
        fields = [f for f, _ in blobs]

        def build(pipe: redis.client.Pipeline) -> None:
            if logs:
                by_sha(pipe, self._log, [k.job(work.jid), k.stats(work.jid), k.logs(work.jid)],
                       [log_bound, *logs])
            for field, payload in blobs:
                pipe.hset(k.blobs(work.jid), field, payload)
            by_sha(pipe, self._record, [
                k.units, k.job(work.jid), k.recorded(work.jid), k.results(work.jid),
                k.stats(work.jid), k.blobs(work.jid), k.worker(wid)], args)

        try:
            reply = self.pipelined(build, transaction=True)[-1]
        except redis.ResponseError as exc:
            # Redis filled up between queueing and EXEC: our large results may be in (a
            # transaction is no rollback) while the script was refused. Nothing else will
            # ever delete them, and they would keep Redis full: out with them
            if fields and (isinstance(exc, redis.exceptions.OutOfMemoryError)
                           or "maxmemory" in str(exc)):
                with contextlib.suppress(redis.RedisError):
                    self.client.hdel(k.blobs(work.jid), *fields)
            raise
        return Commit(_status(reply), int(reply[1]), int(reply[2]), tuple(reply[3:]))

    def check_room(self, size: int) -> None:
        """``RedisFull`` when ``size`` bytes of large results would take Redis past its
        maxmemory: they are not sent. Sent, they would fill Redis for as long as it reads them
        (its query buffer counts), and it would refuse everyone's writes meanwhile (agents'
        lease renewals too)."""
        if size < 1 << 20:
            return
        used, limit = self.memory()
        if limit and used + size > limit:
            raise RedisFull(f"Redis at {self.where} is out of memory: {size / 1e6:.1f} MB of "
                            f"results would not fit ({used >> 20} MB used of maxmemory "
                            f"{limit >> 20} MB)")

    @edge
    def register_agent(self, aid: str, info: dict[str, Any]) -> None:
        self.client.hset(self.keys.agent(aid), mapping=_fields(info))

    @edge
    def describe_worker(self, wid: str, info: dict[str, Any]) -> None:
        """Add to what `cluster status` shows of a worker (pid, current job and unit)."""
        self.client.hset(self.keys.worker(wid), mapping=_fields(info))

    @edge
    def register_worker(self, wid: str, aid: str, info: dict[str, Any]) -> None:
        """``wid`` holds a lease, which its agent ``aid`` renews (with its own)."""
        args: list[Any] = [wid, aid]
        for key, value in info.items():
            args += (key, value)
        k = self.keys
        self._register_worker(keys=[k.workers, k.worker(wid), k.leases, k.agent_workers(aid),
                                    k.agent(aid)], args=args)

    @edge
    def renew(self, aid: str, wids: Sequence[str], ended: str = "", same: bool = False
              ) -> Renewal:
        """Heartbeat of an agent and the lease of its workers, one renewal whatever their
        number (see ``Renewal``). With ``same``, ``wids`` are those of the agent's previous
        renewal and are not sent, unless Redis asks for them (one was taken from the agent, or
        a job ended). Workers computing a unit of a job that is gone are looked for when jobs
        ended since the count ``ended`` a previous renewal returned ("": now)."""
        k = self.keys
        keys = [k.agents, k.shutdown, k.agent(aid), k.leases, k.agent_workers(aid), k.orphans,
                k.ended]
        reply = self._renew_same(keys=keys, args=[aid, len(wids), ended]) \
            if same and ended else None
        if reply is None or _status(reply) == "LIST":
            reply = self._renew(keys=keys, args=[aid, k.worker_template(), k.job(JOB_ID),
                                                 ended, *wids])
        _, _, shutdown, refused, registered, abandoned, count, agents = reply
        return Renewal(bool(shutdown), [w.decode() for w in refused], bool(registered),
                       [w.decode() for w in abandoned], count.decode(), int(agents))

    @edge
    def reissue(self, wid: str, *, charge: bool, reason: str, lease_ms: int = 0) -> int:
        """Queue again what ``wid`` held; with ``lease_ms``, only if its lease is that old.
        With ``charge``, the entry it had started computing costs its units an attempt.

        Returns how many units were queued again, or -1 when the lease was still fresh."""
        return self._queue_again(wid, "1" if charge else "0", reason, lease_ms)

    @edge
    def give_back(self, wid: str) -> None:
        """A worker about to exit gives back what was delivered to it and that it did not
        start (not charged, not counted as reissued); its agent removes it once it exited."""
        self._queue_again(wid, "back", "given back", 0)

    def _queue_again(self, wid: str, mode: str, reason: str, lease_ms: int) -> int:
        k = self.keys
        moved = self._reissue(
            keys=[k.units, k.workers, k.worker(wid), k.leases, k.orphans],
            args=[GROUP, wid, mode, reason, lease_ms, *k.job_templates(),
                  k.agent_workers_template()])
        return int(moved)

    @edge
    def publish_usage(self, aid: str, usage: dict[str, dict[str, float]]) -> None:
        """CPU load and memory of an agent's workers, for ``cluster status``: one write per
        agent, whatever its number of workers, which expires (``USAGE_MS``)."""
        self.client.set(self.keys.agent_usage(aid), json.dumps(usage), px=USAGE_MS)


def by_sha(pipe: redis.client.Pipeline, script: Any, keys: list[str], args: list[Any]) -> None:
    """Queue a call of ``script`` by its SHA alone (``Delivery.pipelined``)."""
    pipe.evalsha(script.sha, len(keys), *keys, *args)
