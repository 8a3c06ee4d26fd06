"""Fixtures: a real redis-server per test session, a key prefix per test, real agents.

A missing redis-server is a skip on a laptop and a failure under CI=true.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from netns import sshd_binary
from waiting import wait_for

from cluster.broker import Broker
from cluster.console import unstamped
from cluster.credentials import Credentials
from cluster.local import LocalCluster, free_port

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
SAMPLES = Path(__file__).resolve().parent / "jobs"
IN_CI = os.environ.get("CI", "").lower() == "true"


def _subprocesses_import_this_checkout() -> None:
    """Agents, workers and `python -m cluster` started by the tests import the package of this
    checkout whatever their working directory, not another checkout installed in editable mode
    (a worktree's tests would otherwise run main's code in their subprocesses)."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


_subprocesses_import_this_checkout()


def _private_cache() -> None:
    """Job directories unpacked by the tests' workers go to a cache of this session, not to the
    user's ~/.cache/cluster."""
    cache = tempfile.mkdtemp(prefix="cluster-test-cache-")
    os.environ["XDG_CACHE_HOME"] = cache
    atexit.register(shutil.rmtree, cache, ignore_errors=True)


_private_cache()


def _private_history() -> None:
    """Runs submitted by the tests are recorded in a history file and a journal of this
    session, not in the user's ~/.local/state/cluster (a test may name its own)."""
    state = tempfile.mkdtemp(prefix="cluster-test-state-")
    os.environ["CLUSTER_HISTORY"] = str(Path(state) / "history.sqlite")
    os.environ.setdefault("CLUSTER_JOURNAL", str(Path(state) / "journal.jsonl"))
    atexit.register(shutil.rmtree, state, ignore_errors=True)


_private_history()


def plain(stderr: str) -> str:
    """stderr of ``cluster`` without the stamps its own lines start with off a terminal
    (``2026-11-28T09:30:00Z job=3f9a0c12d4e1 ``): what tests compare."""
    return unstamped(stderr)


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        if IN_CI:
            pytest.fail(f"{binary} is required under CI=true but is not on PATH")
        pytest.skip(f"{binary} not installed")
    return path


def need_root_network() -> None:
    """Namespace hosts need root, iproute2 and openssh-server: a skip on a laptop, a failure
    under CI=true."""
    problems = []
    if os.geteuid() != 0:
        problems.append("root")
    if sshd_binary() is None:
        problems.append("openssh-server")
    if problems:
        message = f"namespace hosts need {' and '.join(problems)}"
        if IN_CI:
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    need("ip")
    need("ssh-keygen")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A real redis-server on loopback with a password: (url, password)."""
    binary = need("redis-server")
    workdir = tmp_path_factory.mktemp("redis")
    password = secrets.token_urlsafe(16)
    port = free_port()
    conf = workdir / "redis.conf"
    conf.write_text(f"bind 127.0.0.1\nport {port}\nrequirepass {password}\nsave \"\"\n"
                    f"appendonly no\ndir {workdir}\nlogfile {workdir / 'redis.log'}\n")
    proc = subprocess.Popen([binary, str(conf)])
    try:
        wait_until_answering(proc, port, password)
        yield f"redis://127.0.0.1:{port}/0", password
    finally:
        proc.terminate()
        proc.wait(10)


def wait_until_answering(proc: subprocess.Popen[bytes], port: int, password: str) -> None:
    """Wait until the redis-server ``proc`` answers a PING on ``port``; fail if it exits."""
    def answers() -> bool:
        assert proc.poll() is None, f"redis-server exited with {proc.returncode}"
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    with redis.Redis(port=port, password=password, socket_connect_timeout=1) as client:
        wait_for(answers, 30, f"redis-server on port {port} to answer")


@pytest.fixture
def creds(redis_server: tuple[str, str], tmp_path: Path) -> Credentials:
    """Credentials for a fresh key prefix on the session's Redis."""
    url, password = redis_server
    return Credentials(url, password, secrets.token_bytes(32), prefix=f"t{uuid.uuid4().hex[:8]}:")


@pytest.fixture
def creds_file(creds: Credentials, tmp_path: Path) -> Path:
    path = tmp_path / "credentials.json"
    creds.dump(path)
    return path


@pytest.fixture
def broker(creds: Credentials) -> Iterator[Broker]:
    b = Broker.connect(creds.redis_url, creds.password, prefix=creds.prefix)
    yield b
    b.close()


class AgentProcess:
    """A real ``cluster agent`` process with small timeouts."""

    def __init__(self, creds_file: Path, cores: int = 2, extra: tuple[str, ...] = ()) -> None:
        self.log = creds_file.parent / f"agent-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cluster", "agent", "--credentials", str(creds_file),
                 "--cores", str(cores), "--heartbeat", "0.1", "--log-level", "INFO", *extra],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.log.read_text(errors="replace")


@pytest.fixture
def agent(creds_file: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(creds_file, cores=min(2, os.cpu_count() or 1))
    yield a
    a.stop()


def tagged_processes(tag: str) -> list[str]:
    """Live processes whose environment carries ``CLUSTER_TEST_TAG=tag`` (set on a command a
    test started, inherited by everything it spawned): what that command left behind."""
    left = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("CLUSTER_TEST_TAG") == tag:
                left.append(f"{proc.pid}: {' '.join(proc.cmdline())}")
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return left


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            cwd: Path = ROOT, raw: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cluster`` as a user would; a hang fails the test instead of CI. Its
    stderr comes without the stamps of its lines (``plain``) unless ``raw``."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, "-m", "cluster", *args], capture_output=True,
                            text=True, timeout=timeout, env=full_env, cwd=cwd,
                            stdin=subprocess.DEVNULL)
    if not raw:
        result.stderr = plain(result.stderr)
    return result


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[Path]:
    """One private local cluster (redis-server + agent) shared by tests that only submit;
    yields its credentials file, for ``cluster submit --credentials``."""
    need("redis-server")
    cluster = LocalCluster(log_level="WARNING", claim_cpus=False)  # the tests' own clusters
    # pin to the CPUs as if this one (long-lived, mostly idle) were not there
    with cluster:
        yield cluster.dir / "credentials.json"
