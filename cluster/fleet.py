"""The cluster's bookkeeping in Redis, beside the protocol (``broker.py``): the jobs running and
the history of runs (`cluster jobs`, `show`), the agents and workers registered (`status`,
`up`, `down`), and Redis's own settings (`up`, `doctor`)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any

import redis

from .errors import InfraError
from .keys import JOB_ID
from .redisio import Connected, edge


class Fleet(Connected):
    _save_run: Any  # the SAVE_RUN and RETIRE scripts, registered by ``Broker``
    _retire: Any

    # -- history -----------------------------------------------------------------------------

    RUNNING_FIELDS = ("name", "path", "started", "host", "pid", "scattered", "total")

    @edge
    def running_jobs(self) -> list[tuple[str, dict[str, str], int]]:
        """The jobs being run: (id, ``RUNNING_FIELDS`` of its hash, units recorded)."""
        reply: Any = self.client.smembers(self.keys.jobs)
        return self.job_summaries(sorted(j.decode() for j in reply))

    @edge
    def job_summaries(self, jids: Sequence[str]) -> list[tuple[str, dict[str, str], int]]:
        """(id, ``RUNNING_FIELDS`` of its hash, units recorded) of those jobs still there."""
        pipe = self.client.pipeline(transaction=False)
        for jid in jids:
            pipe.hmget(self.keys.job(jid), self.RUNNING_FIELDS)
            pipe.bitcount(self.keys.recorded(jid))
        replies = pipe.execute() if jids else []
        jobs = []
        for jid, values, recorded in zip(jids, replies[::2], replies[1::2], strict=True):
            found = {k: v.decode(errors="replace")
                     for k, v in zip(self.RUNNING_FIELDS, values, strict=True) if v is not None}
            if found:  # not expired or purged between the two reads
                jobs.append((jid, found, int(recorded)))
        return jobs

    @edge
    def save_run(self, jid: str, run: str, record: str, keep_ms: int, most_jobs: int) -> int:
        """Add the record of a run of ``jid`` to the cluster's history, which keeps the jobs
        whose last run ended within ``keep_ms``, at most ``most_jobs`` of them; returns how
        many jobs left it."""
        k = self.keys
        reply = self._save_run(keys=[k.history, k.runs(jid)],
                               args=[jid, run, record, max(1, keep_ms), most_jobs,
                                     k.runs(JOB_ID)])
        return int(reply[1])

    @edge
    def recent_runs(self, jobs: int) -> list[bytes]:
        """The records of every run of the ``jobs`` jobs that last ended, in no order."""
        reply: Any = self.client.zrevrange(self.keys.history, 0, max(0, jobs - 1))
        pipe = self.client.pipeline(transaction=False)
        for jid in reply:
            pipe.hvals(self.keys.runs(jid.decode()))
        return [r for runs in (pipe.execute() if reply else []) for r in runs]

    @edge
    def job_runs(self, jid: str) -> list[bytes]:
        """The records of the runs of ``jid`` in the cluster's history, in no order."""
        reply: Any = self.client.hvals(self.keys.runs(jid))
        return list(reply)

    @edge
    def unregister_agent(self, aid: str) -> None:
        """``aid`` is gone: the workers it still renewed hold leases of their own, which lapse
        (``RETIRE``)."""
        k = self.keys
        self._retire(keys=[k.agents, k.agent(aid), k.leases, k.agent_workers(aid), k.orphans],
                     args=[aid])

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
        """Every registered worker, and what its agent published of it (its usage too)."""
        with self._translated():
            reply: Any = self.client.zrange(self.keys.workers, 0, -1)
            wids = [m.decode() for m in reply]
            infos = self._hashes([self.keys.worker(w) for w in wids])
            aids = sorted({info["agent"] for info in infos if info.get("agent")})
            pipe = self.client.pipeline(transaction=False)
            for aid in aids:
                pipe.get(self.keys.agent_usage(aid))
            usage: dict[str, dict[str, float]] = {}
            for raw in pipe.execute() if aids else []:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    usage.update({str(w): dict(v) for w, v in json.loads(raw).items()})
        for wid, info in zip(wids, infos, strict=True):
            info.update({k: str(v) for k, v in usage.get(wid, {}).items()})
        return list(zip(wids, infos, strict=True))

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
            k = self.keys
            reply: Any = self.client.zrange(k.agents, 0, -1)
            aids = {a.decode() for a in reply}
            reply = self.client.zrange(k.leases, 0, -1)
            aids |= {a.decode() for a in reply}
            self.client.delete(k.agents, k.workers, k.leases, k.orphans,
                               *(k.agent_workers(aid) for aid in sorted(aids)))

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

