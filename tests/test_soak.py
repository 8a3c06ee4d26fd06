"""A randomized soak of the delivery guarantee: jobs run through a fault proxy that loses
replies (Redis ran the command, the client never hears of it), resets connections, delays
replies and black-holes clients, between a real redis-server and every client (coordinator,
agent, workers).

Each seed picks a fault rate, small results or large ones (through Redis as blobs, or, for
odd seeds, through the agent's spool and data server), ``gather`` or ``reduce``, and whether
the coordinator is SIGKILLed mid-run and resumed by the same command. The job's output proves
that every unit's result was taken exactly once (``tests/jobs/soak_*.py``). A run must end
with exit 0 and that exact output, leave nothing pending in Redis, and never hang: every
process has a hard deadline.

By default a few seeds run (CI); ``CLUSTER_SOAK=N`` runs seeds 0..N-1 instead.
``CLUSTER_SOAK_REPORT=FILE`` appends one JSON line per run (outcome, stats, faults injected).
``CLUSTER_SOAK_KEEP=DIR`` keeps the logs of a failed seed there (agent, both submits at INFO).
``CLUSTER_SOAK_FAULTS=running`` injects faults only once the job records results, to look past
startup; ``CLUSTER_SOAK_TIMEOUT`` is submit's ``--timeout`` (default 90 s; a run takes 2 to 10 s,
but each black hole costs the client it hits its 15 s socket timeout, and a busy machine more).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from conftest import ROOT, SAMPLES, AgentProcess, need, plain
from faultproxy import Fault, FaultProxy, Rates

from cluster.credentials import Credentials
from cluster.local import free_port

pytestmark = pytest.mark.slow

RATES = (0.002, 0.01, 0.03)
DEFAULT_SEEDS = (2, 5, 10, 13, 20, 23)  # both rates of 1% and 3%, kinds, folds; 3 kills
TIMEOUT_S = float(os.environ.get("CLUSTER_SOAK_TIMEOUT", "90"))  # --timeout of submit
GRACE_S = 20.0  # past --timeout, a submit that is still running is a hang
# "start": faults from the first connection on; "running": only once the job records results
# (past the agent's, workers' and coordinator's startup)
FAULTS_FROM = os.environ.get("CLUSTER_SOAK_FAULTS", "start")
BLOB_FLOATS = 65536  # 512 KB of float64: far above BLOB_THRESHOLD (32 KB)
SPOOLED_FLOATS = 131072  # 1 MB: above DIRECT_THRESHOLD, through the host's spool (``spool``)


@dataclass(frozen=True)
class Scenario:
    """What one seed runs; seeds 0..23 cover every combination once."""

    seed: int
    rate: float
    blobs: bool
    reduce: bool
    kill: bool

    @classmethod
    def of(cls, seed: int) -> Scenario:
        return cls(seed, RATES[seed % 3], seed // 3 % 2 == 1, seed // 6 % 2 == 1,
                   seed // 12 % 2 == 1)

    @property
    def name(self) -> str:
        size = "spooled" if self.spooled else "blob" if self.blobs else "small"
        return (f"seed{self.seed}-p{self.rate:g}-{size}-"
                f"{'reduce' if self.reduce else 'gather'}{'-kill' if self.kill else ''}")

    @property
    def spooled(self) -> bool:
        """Large results through the agent's data server: half of the blob seeds (odd)."""
        return self.blobs and self.seed % 2 == 1

    @property
    def units(self) -> int:
        return 40 if self.blobs else 300

    @property
    def job(self) -> Path:
        return SAMPLES / ("soak_reduce.py" if self.reduce else "soak_gather.py")

    def params(self) -> list[str]:
        floats, sleep = (BLOB_FLOATS, 0.02) if self.blobs else (1, 0.005)
        if self.spooled:
            floats = SPOOLED_FLOATS
        return ["--param", f"units={self.units}", "--param", f"floats={floats}",
                "--param", f"sleep={sleep}"]

    def rates(self) -> Rates:
        """Lost replies at the full rate; resets half as often; short black holes rarely."""
        p = self.rate
        return Rates(lose=p, reset=p / 2, delay=p, blackhole=p / 20, delay_ms=(1.0, 30.0),
                     blackhole_s=(0.2, 1.5))

    @property
    def expected(self) -> dict[str, Any]:
        return {"units": self.units, "bad": []}


def soak_seeds() -> list[int]:
    count = os.environ.get("CLUSTER_SOAK")
    return list(range(int(count))) if count else list(DEFAULT_SEEDS)


@dataclass
class Report:
    """What one run did; ``problems`` is empty when it kept the guarantee."""

    scenario: str
    seconds: float = 0.0
    exits: list[int | None] = field(default_factory=list)  # None: a hang, killed
    error: str = ""  # the last `cluster: error:` line
    summary: str = ""  # the summary line of the run that finished
    output: Any = None
    killed_after: int | None = None  # units recorded when the coordinator was SIGKILLed
    pending: int = 0
    leftover: list[str] = field(default_factory=list)
    agent_alive: bool = True
    agent_error: str = ""  # the agent's last error line, if any
    faults: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        verdict = "ok" if not self.problems else "FAILED: " + "; ".join(self.problems)
        counts = {k: v for k, v in self.faults.items() if k != "by_role"}
        harmful = [f"{what} x{n}" for what, n in self.faults.get("by_role", {}).items()
                   if " delay " not in what]
        return (f"{self.scenario}: {verdict} | exits {self.exits} in {self.seconds:.1f} s | "
                f"{self.summary or self.error} | faults {counts} | {', '.join(harmful[:12])}")


class PrivateRedis:
    """A redis-server of the test's own: loopback, a password, no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        conf = workdir / "redis.conf"
        conf.write_text(f"bind 127.0.0.1\nport {self.port}\nrequirepass {self.password}\n"
                        f"save \"\"\nappendonly no\ndir {workdir}\n"
                        f"logfile {workdir / 'redis.log'}\n")
        self.proc = subprocess.Popen([need("redis-server"), str(conf)])
        self.direct = redis.Redis(port=self.port, password=self.password, socket_timeout=10,
                                  decode_responses=True)
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            return bool(self.direct.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        self.direct.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def worktree_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Subprocesses (agent, workers, submit) import this checkout's ``cluster``."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("CLUSTER_LOG_LEVEL", "INFO")  # the coordinator's story, kept on failure
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + path if path else ""))
    monkeypatch.setenv("CLUSTER_JOURNAL", str(tmp_path / "journal.jsonl"))
    return dict(os.environ)


class Roles:
    """Which process a faulted connection belonged to (coordinator, agent or worker): the
    client's address is looked up among the sockets of the processes this test started, at
    the moment of the fault, while the connection is still open."""

    def __init__(self) -> None:
        self.pids: dict[int, str] = {}
        self.counts: Counter[str] = Counter()

    def add(self, pid: int, role: str) -> None:
        self.pids[pid] = role

    def note(self, fault: Fault) -> None:
        """``FaultProxy.on_fault``: count the fault by role, kind and command."""
        self.counts[f"{self.role_of(fault.peer)} {fault.kind} {fault.command}"] += 1

    def role_of(self, peer: str) -> str:
        port = int(peer.rpartition(":")[2] or 0)
        for pid, role in self.candidates():
            try:
                sockets = psutil.Process(pid).net_connections("tcp")
            except psutil.Error:
                continue
            if any(s.laddr and s.laddr.port == port for s in sockets):
                return role
        return "?"

    def candidates(self) -> Iterator[tuple[int, str]]:
        for pid, role in list(self.pids.items()):
            yield pid, role
            if role == "agent":
                with contextlib.suppress(psutil.Error):
                    yield from ((c.pid, "worker")  # its fork server's children
                                for c in psutil.Process(pid).children(recursive=True))


@dataclass(frozen=True)
class Rig:
    """One run's private setup: Redis, the proxy in front of it, the clients' credentials,
    and who is who among the clients."""

    server: PrivateRedis
    proxy: FaultProxy
    creds: Path
    prefix: str
    env: dict[str, str]
    roles: Roles
    submits: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def kill_submits(self) -> None:
        """Leave no coordinator behind, whatever happened to the test."""
        for proc in self.submits:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.parametrize("seed", soak_seeds(), ids=lambda s: Scenario.of(s).name)
def test_soak(seed: int, private_redis: PrivateRedis, worktree_env: dict[str, str],
              tmp_path: Path) -> None:
    scenario = Scenario.of(seed)
    report = Report(scenario.name)
    started = time.monotonic()
    rates = scenario.rates() if FAULTS_FROM == "start" else Rates()
    roles = Roles()
    with FaultProxy(("127.0.0.1", private_redis.port), seed=seed, rates=rates,
                    on_fault=roles.note) as proxy:
        rig = Rig(private_redis, proxy, tmp_path / "credentials.json",
                  f"soak{seed}-{uuid.uuid4().hex[:6]}:", worktree_env, roles)
        Credentials(proxy.url, private_redis.password, secrets.token_bytes(32),
                    rig.prefix).dump(rig.creds)
        data = ("--data-address", "127.0.0.1") if scenario.spooled else ()
        agent = AgentProcess(rig.creds, cores=2, extra=("--redis-grace", "60", *data))
        roles.add(agent.proc.pid, "agent")
        try:
            run_job(scenario, rig, report)
        finally:
            rig.kill_submits()
            proxy.set_rates(Rates())
            report.agent_alive = agent.proc.poll() is None
            report.agent_error = last_error(agent.stop())
        check_redis(private_redis.direct, rig.prefix, report)
        report.faults = fault_counts(proxy, roles)
    report.seconds = time.monotonic() - started
    judge(scenario, report)
    publish(report)
    if report.problems:
        keep(tmp_path, scenario)
    assert not report.problems, report.line()


# -- running the job -------------------------------------------------------------------------


def run_job(scenario: Scenario, rig: Rig, report: Report) -> None:
    """Submit; for a kill scenario, SIGKILL the coordinator once a quarter of the units are
    recorded, then run the same command again (it resumes the job)."""
    out = rig.creds.parent / "out.json"
    command = [sys.executable, "-m", "cluster", "submit", str(scenario.job),
               "--credentials", str(rig.creds), "--timeout", f"{TIMEOUT_S:g}",
               "--redis-grace", "60", "--progress", "none", "--output", str(out),
               *scenario.params()]
    err = rig.creds.parent / "submit-1.err"
    proc = start(command, err, rig)
    if FAULTS_FROM == "running" and wait_recorded(rig, 1, proc) is not None:
        rig.proxy.set_rates(scenario.rates())
    if scenario.kill:
        report.killed_after = wait_recorded(rig, scenario.units // 4, proc)
        if report.killed_after is not None:
            proc.kill()
            report.exits.append(finish(proc))
            err = rig.creds.parent / "submit-2.err"
            proc = start(command, err, rig)
    report.exits.append(finish(proc))
    report.error, report.summary = last_lines(err)
    if out.exists():
        report.output = json.loads(out.read_text())


def start(command: list[str], err: Path, rig: Rig) -> subprocess.Popen[bytes]:
    """A submit (a coordinator) in its own session, its stderr to ``err``."""
    with err.open("wb") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT,
                                env=rig.env, stdin=subprocess.DEVNULL, start_new_session=True)
    rig.roles.add(proc.pid, "coordinator")
    rig.submits.append(proc)
    return proc


def finish(proc: subprocess.Popen[bytes]) -> int | None:
    """The exit code, or None when it ran past its own --timeout by ``GRACE_S`` (killed)."""
    try:
        return proc.wait(TIMEOUT_S + GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def wait_recorded(rig: Rig, count: int, proc: subprocess.Popen[bytes]) -> int | None:
    """Wait (reading Redis directly, past the proxy) until the job has ``count`` units
    recorded; how many it had then, or None when the submit ended first."""
    direct, prefix = rig.server.direct, rig.prefix
    deadline = time.monotonic() + TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        for jid in direct.smembers(f"{prefix}jobs"):
            recorded = int(direct.hget(f"{prefix}job:{str(jid)}:stats", "recorded") or 0)
            if recorded >= count:
                return recorded
        time.sleep(0.01)
    return None


def last_lines(err: Path) -> tuple[str, str]:
    """(the last ``cluster: error:`` line, the summary line) of a submit's stderr."""
    lines = plain(err.read_text(errors="replace")).splitlines() if err.exists() else []
    errors = [line for line in lines if line.startswith("cluster: error:")]
    summaries = [line for line in lines if " units on " in line and " reissued" in line]
    return (errors[-1] if errors else ""), (summaries[-1] if summaries else "")


def last_error(log: str) -> str:
    """The last line of an agent's log that reports an error."""
    errors = [line for line in log.splitlines() if " ERROR " in line or "error:" in line]
    return errors[-1] if errors else ""


# -- checking --------------------------------------------------------------------------------


def check_redis(direct: redis.Redis, prefix: str, report: Report) -> None:
    """Nothing left pending in the units stream, and no key of the job left behind."""
    try:
        report.pending = int(direct.xpending(f"{prefix}units", "workers")["pending"])
    except redis.ResponseError:  # no stream or group at all: nothing pending
        report.pending = 0
    report.leftover = sorted(str(k) for pattern in ("job:*", "resume:*", "jobs")
                             for k in direct.keys(f"{prefix}{pattern}"))


def judge(scenario: Scenario, report: Report) -> None:
    problems = report.problems
    final = report.exits[-1]
    if final is None:
        problems.append(f"hang: still running {TIMEOUT_S + GRACE_S:g} s after start")
    elif final != 0:
        problems.append(f"exit {final}: {report.error or '(no error line)'}")
    elif report.output != scenario.expected:
        problems.append(f"wrong result: {str(report.output)[:300]}")
    if scenario.kill and report.killed_after is None and final == 0:
        problems.append("the coordinator was not killed: the job ended before a quarter of "
                        "its units were recorded")
    if report.pending:
        problems.append(f"{report.pending} entries left pending")
    if report.leftover:
        problems.append(f"keys left: {', '.join(report.leftover[:5])}")
    if not report.agent_alive:
        problems.append(f"the agent died: {report.agent_error or '(no error line)'}")


def fault_counts(proxy: FaultProxy, roles: Roles) -> dict[str, Any]:
    c = proxy.counters
    return {"lost": c.lost, "resets": c.resets, "delays": c.delays,
            "blackholes": c.blackholes, "replies": c.replies,
            "by_role": dict(roles.counts.most_common())}


def keep(tmp_path: Path, scenario: Scenario) -> None:
    """Copy a failed run's logs (the agent's, each submit's stderr) to ``CLUSTER_SOAK_KEEP``."""
    where = os.environ.get("CLUSTER_SOAK_KEEP")
    if not where:
        return
    dest = Path(where) / f"{scenario.name}-{uuid.uuid4().hex[:6]}"
    dest.mkdir(parents=True)
    for log in [*tmp_path.glob("*.err"), *tmp_path.glob("agent-*.log"), *tmp_path.glob("*.jsonl")]:
        shutil.copy(log, dest / log.name)
    print(f"logs kept in {dest}")


def publish(report: Report) -> None:
    """Print the run's line; append it as JSON to ``CLUSTER_SOAK_REPORT`` when set."""
    print(report.line())
    path = os.environ.get("CLUSTER_SOAK_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(asdict(report), default=str) + "\n")
