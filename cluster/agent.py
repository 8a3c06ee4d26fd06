"""The agent: one per host. Starts one worker per CPU (forked by its fork server,
``forkserver.py``, or spawned), pins it, restarts it when it dies, and renews the heartbeat
and the workers' leases in Redis. It never runs job code, so a worker busy
in numpy for minutes keeps its lease, while a stopped (SIGSTOP) or dead one loses it.

Signals (deploy/ follows these):
- SIGTERM or SIGINT: graceful stop. Workers finish the batch they hold (up to ``stop_grace_s``,
  then they are killed and what they held is reissued); the agent unregisters and exits 0.
- a second SIGTERM or SIGINT: immediate stop; workers are killed, their units reissued.
- the ``shutdown`` key in Redis (``cluster down``): graceful stop.
- Redis unreachable (or refusing writes: a full disk under its AOF, out of memory) for longer
  than ``redis_grace_s``: workers are stopped and the agent exits 3, so a torn-down cluster
  leaves nothing running. Any shorter trouble, with Redis or with starting a worker, is ridden
  out: a worker that cannot start is retried with a backoff that resets after a healthy period.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis

from .broker import Broker
from .credentials import Credentials
from .datapath import DataPath
from .errors import ExitCode, RedisUnavailable, UsageError
from .forkserver import Forked, ForkServer, WorkerProcess
from .forkserver import available as can_fork
from .proc import RECYCLE
from .requirements import Installed
from .settings import renewal_interval
from .signing import Keyring, WorkerKeys
from .spawn import (
    WorkerUser,
    describe_exit,
    is_running,
    spawn_worker,
    start_fork_server,
    worker_env,
)
from .spool import machine_id
from .version import __version__

log = logging.getLogger("cluster.agent")

@dataclass(frozen=True)
class AgentSettings:
    cpus: tuple[int, ...]
    host: str = field(default_factory=socket.gethostname)
    threads: int = 1
    heartbeat_s: float = 0.5
    redis_grace_s: float = 60.0
    stop_grace_s: float = 10.0
    log_level: str = "INFO"
    pidfile: str | None = None
    cache_dir: str | None = None  # unpacked job directories (default: ~/.cache/cluster)
    pin: bool = True  # False: workers share the CPUs (other local clusters pinned theirs)
    worker_user: str | None = None  # an agent run as root starts its workers as this user
    data_address: str | None = None  # where coordinators reach this host: serve large results
    spool_dir: str | None = None  # where its workers put them (default: in /dev/shm)
    spares: bool = True  # keep a started worker process per CPU, to replace one at once
    fork_server: bool = True  # fork workers from a process that imported them (``forkserver``)
    fork_server_fd: int | None = None  # the socket of one started for us (``LocalCluster``)


@dataclass
class Slot:
    """One CPU and the worker process that currently runs on it."""

    cpu: int
    gen: int = 0
    wid: str = ""
    proc: WorkerProcess | None = None
    # a worker process started ahead (imported, waiting for its configuration on stdin): the
    # next worker of this CPU, so a worker recycled after its job is replaced at once
    spare: WorkerProcess | None = None
    usage: psutil.Process | None = None  # for CPU load and memory in `cluster status`
    kill_at: float | None = None  # asked to stop: killed if still there by then
    abandoned: bool = False  # killed because its job is gone: no attempt is charged
    restart_at: float = 0.0
    deaths: int = 0  # in a row: reset once a worker has stayed up for HEALTHY_S
    started_at: float = 0.0


HEALTHY_S = 30.0  # a worker up this long resets its slot's restart backoff
SPARE_AFTER_S = 1.0  # a spare starts once its CPU's worker is this old
EXIT_POLL_S = 0.05  # between heartbeats, how often the agent looks for workers that exited
JOBS_CHECK_S = 30.0  # how often workers of a job that is gone are looked for, whether or not
# a job ended (a job's keys may also expire)


def worker_keys(creds: Credentials) -> WorkerKeys:
    """The workers' keys: as `up` ships them to hosts (no cluster key there), or derived from
    the cluster key (a local cluster, an agent given the key by hand)."""
    if creds.worker_keys:
        return WorkerKeys.from_json(creds.worker_keys)
    if not creds.key:
        raise UsageError("the credentials hold neither the cluster key nor workers' keys")
    return Keyring(creds.key).for_workers()


class Agent:
    def __init__(self, broker: Broker, creds: Credentials, settings: AgentSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.broker = broker
        self.creds = creds
        self.worker_keys = worker_keys(creds)
        self.settings = settings
        self.user = WorkerUser.prepare(settings.worker_user, settings.cache_dir) \
            if settings.worker_user else None
        self.clock = clock
        self.aid = f"{settings.host}/{os.getpid()}"
        self.slots = [Slot(cpu) for cpu in settings.cpus]
        self.stopping = False
        self.immediate = False
        self.redis_down_since: float | None = None
        self.registered = False
        self.ended = ""  # the count of ended jobs last seen (``Renewal.ended``)
        self.listed: list[str] | None = None  # the workers its last renewal listed
        self.interval = settings.heartbeat_s  # between renewals (``renewal_interval``)
        self.next_jobs_check = 0.0
        self.data = DataPath.start(settings, self.worker_keys.message, self.user) \
            if settings.data_address else None
        # as root, spares start at idle priority (taking no CPU from the workers) and are
        # raised to normal as they become workers; any other user could not raise them again
        self.idle_spares = os.geteuid() == 0 and hasattr(os, "SCHED_IDLE")
        self.forks: ForkServer | None = None  # started by ``serve``

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self) -> int:
        if self.settings.pidfile:
            Path(self.settings.pidfile).write_text(f"{os.getpid()}\n")
        try:
            return self.serve()
        finally:
            if self.forks is not None:
                self.forks.close()
            if self.data is not None:
                self.data.stop()
            if self.settings.pidfile:
                Path(self.settings.pidfile).unlink(missing_ok=True)

    def serve(self) -> int:
        log.info("agent %s up: %d workers on CPUs %s", self.aid, len(self.slots),
                 ",".join(map(str, self.settings.cpus)))
        self.forks = self.start_forks()
        for slot in self.slots:  # their Python and imports run while the agent registers
            try:
                slot.spare = self.spawn(slot)
            except OSError as exc:
                log.error("could not start worker on CPU %d: %s", slot.cpu, exc)
        code = ExitCode.OK
        beats = 0
        while not self.stopping:
            if not self.step():
                code = ExitCode.INFRA
                break
            beats += 1
            if beats % max(1, int(2 / self.interval)) == 0:
                self.publish_usage()
            if self.data is not None and beats % max(1, int(10 / self.interval)) == 0:
                self.data.sweep(self.broker)
            self.wait_for_next_beat()
        self.stop_workers()
        return int(code)

    def wait_for_next_beat(self) -> None:
        """Sleep until the next heartbeat, or less: a worker that exits is handled at once
        (its units reissued, or a recycled worker replaced) instead of at the next beat."""
        deadline = self.clock() + self.interval
        while not self.stopping:
            left = deadline - self.clock()
            if left <= 0:
                return
            time.sleep(min(left, EXIT_POLL_S))
            if any(slot.proc is not None and slot.proc.poll() is not None
                   for slot in self.slots):
                return

    def register(self) -> None:
        self.broker.register_agent(self.aid, {
            "host": self.settings.host, "pid": os.getpid(), "version": __version__,
            "cpus": ",".join(map(str, self.settings.cpus)),
            "key": self.worker_keys.fingerprint(),
            **({"data": self.data.spool.where, "spool": str(self.data.spool.dir),
                "machine": machine_id()} if self.data is not None else {}),
            "started": self.broker.server_time_ms(),
            **Installed.here(self.settings.host).fields(),  # checked by cluster submit
        })
        for old in self.broker.retire_replaced_agents(self.aid, self.settings.host):
            log.info("agent %s replaces %s, silent beyond its lease", self.aid, old)

    def step(self) -> bool:
        """One heartbeat. False when Redis has been unreachable for too long."""
        try:
            if not self.registered:
                self.register()
                self.broker.renew(self.aid, [])
                self.registered = True
            self.check_workers()
            self.renew()
            self.redis_down_since = None
        except (redis.RedisError, RedisUnavailable) as exc:
            now = self.clock()
            self.redis_down_since = self.redis_down_since or now
            down = now - self.redis_down_since
            log.warning("Redis unreachable for %.0fs: %s", down, exc)
            if down > self.settings.redis_grace_s:
                log.error("Redis unreachable for longer than %.0fs: stopping",
                          self.settings.redis_grace_s)
                self.immediate = True
                return False
        return True

    def request_stop(self, signum: int = 0, frame: object = None) -> None:
        if self.stopping:
            self.immediate = True
            self.kill_all()
        self.stopping = True

    # -- workers ------------------------------------------------------------------------------

    def check_workers(self) -> None:
        for slot in self.slots:
            if slot.kill_at is not None and slot.proc is not None and self.clock() > slot.kill_at \
                    and slot.proc.poll() is None:
                slot.proc.kill()
            if slot.proc is not None and (code := slot.proc.poll()) is not None:
                self.worker_died(slot, describe_exit(code))
            if slot.proc is None and self.clock() >= slot.restart_at and not self.stopping:
                self.try_start(slot)
        for slot in self.slots:  # once every worker runs: starting a process takes a while
            self.keep_spare(slot)

    def keep_spare(self, slot: Slot) -> None:
        """Start the slot's spare once its worker is past its own start (the two would share
        the CPU), and again if the spare died."""
        if not self.settings.spares or self.stopping or slot.proc is None:
            return
        if slot.spare is not None and (code := slot.spare.poll()) is not None:
            log.warning("spare worker process on CPU %d %s", slot.cpu, describe_exit(code))
            slot.spare = None
        if slot.spare is None and self.clock() - slot.started_at >= SPARE_AFTER_S:
            try:
                slot.spare = self.spawn(slot, idle=self.idle_spares)
            except OSError as exc:
                log.warning("could not start a spare worker on CPU %d: %s", slot.cpu, exc)

    def try_start(self, slot: Slot) -> None:
        try:
            self.start_worker(slot)
            slot.started_at = self.clock()
        except OSError as exc:
            log.error("could not start worker on CPU %d: %s", slot.cpu, exc)
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()
            slot.proc = None
            self.back_off(slot)

    def worker_died(self, slot: Slot, how: str) -> None:
        recycled = slot.proc is not None and slot.proc.returncode == RECYCLE
        moved = self.broker.reissue(slot.wid, charge=not (recycled or slot.abandoned),
                                    reason=f"worker {slot.wid} {how}")
        if recycled or slot.abandoned:
            log.info("worker %s %s", slot.wid, "recycled after its job finished" if recycled
                     else "replaced: it computed a unit of a job that is gone")
        else:
            log.warning("worker %s %s; %d units reissued", slot.wid, how, moved)
        slot.proc = None
        slot.kill_at = None
        if recycled or slot.abandoned:
            slot.restart_at = self.clock()
        else:
            self.back_off(slot)
        slot.abandoned = False

    def back_off(self, slot: Slot) -> None:
        if self.clock() - slot.started_at > HEALTHY_S:
            slot.deaths = 0
        slot.deaths += 1
        slot.restart_at = self.clock() + min(0.05 * 2 ** min(slot.deaths, 7), 5.0)

    def start_worker(self, slot: Slot) -> None:
        slot.gen += 1
        slot.wid = f"{self.aid}/cpu{slot.cpu}.{slot.gen}"
        self.broker.register_worker(slot.wid, self.aid, {"host": self.settings.host,
                                                         "cpu": slot.cpu})
        proc, slot.spare = slot.spare, None
        if proc is not None and not self.promote(proc):
            proc.kill()
            proc.wait()
        if proc is None or proc.poll() is not None:
            proc = self.spawn(slot)
        parent = proc.parent if isinstance(proc, Forked) else os.getpid()
        config = {"wid": slot.wid, "agent_pid": parent, "log_level": self.settings.log_level,
                  # never the cluster key: a worker's own keys (``signing``), on stdin
                  "credentials": json.loads(dataclasses.replace(self.creds, key=b"").to_json()),
                  "keys": self.worker_keys.to_json(),
                  "cache_dir": self.settings.cache_dir,
                  "spool": self.data.spool.to_json() if self.data is not None else None}
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
        self.broker.describe_worker(slot.wid, {"pid": proc.pid})
        slot.proc = proc
        slot.usage = psutil.Process(proc.pid)
        log.info("worker %s started (pid %d, CPU %d)", slot.wid, proc.pid, slot.cpu)

    def start_forks(self) -> ForkServer | None:
        if not (self.settings.fork_server and can_fork()):
            return None
        if self.settings.fork_server_fd is not None:
            return ForkServer.adopt(self.settings.fork_server_fd)
        try:
            return start_fork_server(worker_env(self.settings.threads, self.user), self.user)
        except OSError as exc:
            log.warning("cannot start a fork server (%s): each worker starts a Python", exc)
            return None

    def spawn(self, slot: Slot, idle: bool = False) -> WorkerProcess:
        """A worker process for ``slot``, pinned, that waits for its configuration on stdin
        (``start_worker`` sends it); with ``idle``, at idle priority (``promote``). Forked by
        the fork server; started as a process of its own where there is none (or it failed)."""
        if self.forks is not None:
            try:
                proc, pinned = self.forks.fork(slot.cpu if self.settings.pin else None, idle)
                if not pinned:
                    log.warning("cannot pin a worker to CPU %d: it runs unpinned", slot.cpu)
                return proc
            except OSError as exc:
                log.warning("%s: each worker starts a Python from now on", exc)
                self.forks.close()
                self.forks = None
        return spawn_worker(worker_env(self.settings.threads, self.user), slot.cpu, self.user,
                            idle, pinned=self.settings.pin)

    def promote(self, proc: WorkerProcess) -> bool:
        """A spare about to become a worker runs at normal priority. False if it cannot."""
        if not self.idle_spares:
            return True
        try:
            os.sched_setscheduler(proc.pid, os.SCHED_OTHER, os.sched_param(0))
        except OSError as exc:
            log.warning("could not raise spare worker %d to normal priority: %s", proc.pid, exc)
            return False
        return True

    def publish_usage(self) -> None:
        """CPU load (% of one core) and resident memory of each worker, for `cluster status`."""
        usage: dict[str, dict[str, float]] = {}
        for slot in self.slots:
            if slot.usage is None or slot.proc is None:
                continue
            try:
                usage[slot.wid] = {"load": slot.usage.cpu_percent(None),
                                   "rss": slot.usage.memory_info().rss}
            except psutil.Error:
                continue
        try:
            self.broker.publish_usage(self.aid, usage)
        except (redis.RedisError, RedisUnavailable) as exc:
            log.debug("could not publish usage: %s", exc)

    def renew(self) -> None:
        live = [s.wid for s in self.slots if s.proc is not None and is_running(s.proc.pid)]
        if self.clock() >= self.next_jobs_check:
            self.next_jobs_check = self.clock() + JOBS_CHECK_S
            self.ended = ""
        renewal = self.broker.renew(self.aid, live, self.ended, same=live == self.listed)
        self.ended = renewal.ended
        self.interval = renewal_interval(self.settings.heartbeat_s, renewal.agents)
        self.listed = live if renewal.registered and not renewal.refused else None
        if not renewal.registered:
            log.warning("agent %s was unknown to Redis (restarted empty?): registering again",
                        self.aid)
            self.register()
            self.broker.ensure_group()
        for slot in self.slots:
            if slot.wid in renewal.abandoned and slot.proc is not None and not slot.abandoned:
                log.info("worker %s computes a unit of a job that is gone (cancelled?): "
                         "replacing it", slot.wid)
                slot.abandoned = True
                slot.proc.kill()
            elif slot.wid in renewal.refused and slot.proc is not None and slot.kill_at is None:
                # its units went to others: let it commit what it holds (discarded as stale,
                # compared with the recorded result), then it is replaced
                log.warning("worker %s lost its lease; replacing it", slot.wid)
                slot.proc.terminate()
                slot.kill_at = self.clock() + self.settings.stop_grace_s
        if renewal.shutdown and not self.stopping:
            log.info("shutdown requested through Redis")
            self.stopping = True

    def stop_workers(self) -> None:
        for slot in self.slots:
            if slot.spare is not None:  # never configured: nothing of a job in it
                slot.spare.kill()
                slot.spare.wait()
                slot.spare = None
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGKILL if self.immediate else signal.SIGTERM)
        deadline = self.clock() + self.settings.stop_grace_s
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(timeout=max(0.0, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                slot.proc.wait()
        self.unregister()

    def unregister(self) -> None:
        try:
            for slot in self.slots:
                if slot.wid:
                    self.broker.reissue(slot.wid, charge=False, reason=f"agent {self.aid} stopped")
            self.broker.unregister_agent(self.aid)
        except (redis.RedisError, RedisUnavailable) as exc:
            log.warning("could not unregister from Redis: %s", exc)
        log.info("agent %s stopped", self.aid)

    def kill_all(self) -> None:
        for slot in self.slots:
            for proc in (slot.proc, slot.spare):
                if proc is not None and proc.poll() is None:
                    proc.kill()
