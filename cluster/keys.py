"""Every Redis key ``cluster`` uses. No key name is formatted anywhere else.

All keys start with the cluster's prefix (default ``cluster:``), so several clusters or test runs
can share one Redis. Times are Redis server time in milliseconds (``TIME``), never a host's clock.

=============================  ======  =====================================================
key                            type    meaning
=============================  ======  =====================================================
{p}units                       STREAM  work messages, consumer group ``workers``; one entry is
                                       a batch: ``j`` job id, ``a`` attempt, then one field per
                                       unit: ``<index>`` -> encoded unit (signed), or, packed,
                                       ``p`` -> all its units encoded and signed together and
                                       ``<index>`` -> empty (``packing.py``). An entry stays
                                       pending (XPENDING) until its results are recorded. A unit
                                       past its last attempt also has ``r``, why its last worker
                                       died: the worker that reads it records the failure; a
                                       packed entry whose worker died has ``s``: the worker
                                       that reads it splits it, one unit per entry; ``n``: its
                                       results go through Redis (their host lost one once)
{p}workers                     ZSET    worker id -> when it registered (ms): the workers that
                                       hold a lease. A worker's lease is its agent's (below):
                                       one renewal per agent, whatever its number of workers
{p}leases                      ZSET    agent id -> its last renewal (ms), while it holds the
                                       lease of a worker: the coordinator's lease check is a
                                       range query over these (``EXPIRED``)
{p}agent:{aid}:workers         ZSET    the workers whose lease agent ``aid`` renews -> when
                                       they became its
{p}agent:{aid}:usage           STRING  JSON: worker id -> its CPU load and memory, published by
                                       its agent every 2 s (expires after 30 s)
{p}orphans                     ZSET    worker id -> its last renewal (ms), for workers whose
                                       agent renews them no more (stopped, exited, or the agent
                                       was replaced): their own lease; listed again in time, a
                                       worker is its agent's again
{p}ended                       HASH    ``jobs``: a count of the jobs that ended (``PURGE``):
                                       an agent checks which of its workers compute a unit of a
                                       job that is gone when it changed (and every 30 s)
{p}worker:{wid}                HASH    host, agent, pid, cpu of one worker; ``job``, ``unit``,
                                       ``entry`` while it computes an entry (a death is charged
                                       to that entry only); ``committed``: the entry it last
                                       committed (a retried commit is recognised)
{p}agents                      ZSET    agent id -> last heartbeat (ms)
{p}agent:{aid}                 HASH    host, pid, version, cpus, key fingerprint, started;
                                       ``leased``: how many workers it renews;
                                       ``packages``: JSON, every distribution installed where
                                       it runs -> its version; ``environment``: JSON, the values
                                       of PEP 508 markers there (``cluster submit`` checks a
                                       job's requirements against both)
{p}shutdown                    STRING  present: every agent stops (``cluster down``)
{p}jobs                        SET     ids of the jobs being run
{p}resume:{identity}           STRING  id of the unfinished job with this identity (hash of job
                                       code, directory, params and seed; or ``name:<--name>``),
                                       so a re-run resumes it, or waits for it, or is refused
                                       while it runs (``--overlap``; taken by ``CLAIM``)
{p}job:{jid}                   HASH    name, path, code, seed, params, max_attempts,
                                       max_result, max_log, redis_grace, workdir_sha,
                                       workdir_job, expires (server ms), signed together with
                                       the job id by the coordinator (``sig``, Ed25519:
                                       ``signing.py``); identity, owner (the coordinator's
                                       fencing token), scattered (units added), total (once
                                       scatter is done),
                                       started, host, pid and beat (server ms, every second:
                                       ``heartbeat.py``) of its coordinator; cancel (who asked
                                       it to stop)
{p}job:{jid}:recorded          STRING  bitmap: bit i is set once unit i's result (or its final
                                       failure) is recorded. First one wins.
{p}job:{jid}:results           STREAM  what was recorded, in recording order: ``w`` worker,
                                       ``t`` compute seconds, ``<index>`` -> encoded result;
                                       or a failure: ``f`` index, ``e`` JSON error; or the
                                       digests of results not recorded (duplicates, stale):
                                       ``d`` worker, ``<index>`` -> digest. Trimmed as the
                                       coordinator gathers it (which compares the digests).
                                       Every result, error and digest here, like every unit
                                       in ``units``, ends with a tag (``signing.Sealer``)
{p}job:{jid}:stats             HASH    recorded, failed, duplicates, stale, reissued, retried
{p}job:{jid}:blobs             HASH    ``<msgid>:<index>:<attempt>`` -> a large encoded result,
                                       which the results entry names as ``R<field>`` (large
                                       values stay out of Lua, which would copy them twice);
                                       ``attempt`` is unique to one commit attempt. Deleted as
                                       the coordinator gathers it
{p}job:{jid}:workdir           STRING  the job's directory: a gzip'd tar, its digest signed
                                       in the job hash (``workdir_sha``, ``workdir_job``);
                                       a host's workers fetch it once (``workdir.Cache``)
{p}job:{jid}:logs              STREAM  what job code wrote, one entry per unit attempt that
                                       wrote something or failed: ``r`` -> a JSON record
                                       (``entries.LogRecord``); bounded in bytes (stats
                                       ``log_bytes``, ``log_dropped``). Outlives the job: kept
                                       ``--keep`` hours after it ended, for ``cluster logs``
{p}job:{jid}:final             STRING  the value gather returned (``codec.encode``d), kept
                                       while ``--output`` is written: when the write fails the
                                       job stays, and a re-run writes this without computing
{p}history                     ZSET    job id -> when a run of it last ended (server ms): the
                                       cluster's run history; trimmed to ``history_days`` and
                                       ``history.REDIS_JOBS`` jobs whenever a run is added
{p}history:{jid}               HASH    run id -> the record of one run of the job, JSON
                                       (``history.RunRecord``); expires ``history_days`` after
                                       the job's last run
=============================  ======  =====================================================

Every ``job:{jid}*`` key expires with the job: the coordinator refreshes the expiry, and a
script that creates one of them gives it the job hash's remaining time.

The Lua scripts in ``scripts.py`` receive key names from here (``JOB_TEMPLATES``) and fill in the
job id with ``string.gsub``, so the layout above stays the only one.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"
JOB_ID = "{jid}"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix."""

    prefix: str = "cluster:"

    @property
    def units(self) -> str:
        return f"{self.prefix}units"

    @property
    def workers(self) -> str:
        return f"{self.prefix}workers"

    def worker(self, wid: str) -> str:
        return f"{self.prefix}worker:{wid}"

    def worker_template(self) -> str:
        """The worker key with ``{wid}`` left in, for Lua."""
        return self.worker("{wid}")

    @property
    def agents(self) -> str:
        return f"{self.prefix}agents"

    def agent(self, aid: str) -> str:
        return f"{self.prefix}agent:{aid}"

    def agent_workers(self, aid: str) -> str:
        return f"{self.prefix}agent:{aid}:workers"

    def agent_usage(self, aid: str) -> str:
        return f"{self.prefix}agent:{aid}:usage"

    def agent_workers_template(self) -> str:
        """The agent's workers key with ``{aid}`` left in, for Lua."""
        return self.agent_workers("{aid}")

    @property
    def leases(self) -> str:
        return f"{self.prefix}leases"

    @property
    def orphans(self) -> str:
        return f"{self.prefix}orphans"

    @property
    def ended(self) -> str:
        return f"{self.prefix}ended"

    @property
    def shutdown(self) -> str:
        return f"{self.prefix}shutdown"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}jobs"

    def job(self, jid: str) -> str:
        return f"{self.prefix}job:{jid}"

    def recorded(self, jid: str) -> str:
        return f"{self.prefix}job:{jid}:recorded"

    def results(self, jid: str) -> str:
        return f"{self.prefix}job:{jid}:results"

    def stats(self, jid: str) -> str:
        return f"{self.prefix}job:{jid}:stats"

    def blobs(self, jid: str) -> str:
        return f"{self.prefix}job:{jid}:blobs"

    def workdir(self, jid: str) -> str:
        return f"{self.prefix}job:{jid}:workdir"

    def logs(self, jid: str) -> str:
        return f"{self.prefix}job:{jid}:logs"

    def final(self, jid: str) -> str:
        return f"{self.prefix}job:{jid}:final"

    @property
    def history(self) -> str:
        return f"{self.prefix}history"

    def runs(self, jid: str) -> str:
        return f"{self.prefix}history:{jid}"

    def resume(self, identity: str) -> str:
        return f"{self.prefix}resume:{identity}"

    def job_keys(self, jid: str) -> list[str]:
        """Every key that belongs to one job (deleted together when it ends)."""
        return [self.job(jid), self.recorded(jid), self.results(jid), self.stats(jid),
                self.blobs(jid), self.workdir(jid), self.final(jid)]

    def job_templates(self) -> list[str]:
        """Per-job key names with ``{jid}`` left in, for Lua: job, recorded, results, stats,
        blobs, workdir, final."""
        return self.job_keys(JOB_ID)
