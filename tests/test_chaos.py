"""Chaos on real hosts: workers, agents and whole hosts are killed, stopped or cut off the
network while a job runs on three namespace hosts (tests/netns.py), bootstrapped once over real
SSH by `cluster up`; node1's Redis is restarted or flushed under a job; a coordinator is
SIGKILLed and resumed, or taken over by a second one.

Every test checks the same invariants at the end:
- the exit code;
- the output is the fault-free one: every unit once, in scatter order, with its value;
- nothing of the job is left in Redis: no pending or queued unit, no ``<prefix>job:*`` key;
- no stray process: each host's namespace holds sshd (and node1's Redis), one agent, its one
  worker and its data server, alive and healthy, as `cluster status` also says, before the
  next test starts.

Victims are picked deterministically: the first unit to start on a given host is made slow
(tests/jobs/chaos_units.py), so it is surely mid-unit when the fault hits; or one unit is held
until the test releases it (its ``hold_index``), so the job surely runs until then. No assertion
is about time; subprocess timeouts only stop a hang.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from conftest import ROOT, SAMPLES, need_root_network, run_cli
from netns import NsHost, NsNetwork, NsSite, hosts_ini
from waiting import wait_for

from cluster.accounts import BECOME
from cluster.credentials import Credentials
from cluster.errors import ExitCode
from cluster.executor import Executor
from cluster.spool import memory_dir

pytestmark = pytest.mark.slow

JOB = SAMPLES / "chaos_units.py"
LEASE = 2  # seconds: small, so that lost units come back quickly
REDIS_GRACE = 30  # agents ride out a network cut much shorter than this


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A test's directory, shared with the chaos job's workers: they write their logs there,
    and they run as a user of their own (``accounts``), which pytest's private one shuts out."""
    path = Path(tempfile.mkdtemp(prefix="cluster-chaos-"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- processes in a host's namespace ------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str  # R, S, D, T (stopped), Z (zombie)...
    cmd: str

    @property
    def kind(self) -> str:
        if "sshd" in self.cmd:
            return "sshd"
        if "redis-server" in self.cmd:
            return "redis"
        if "cluster agent" in self.cmd:
            return "agent"
        if "cluster.worker" in self.cmd:
            return "worker"
        if "cluster.dataserver" in self.cmd:
            return "dataserver"
        if "cluster.forkserver" in self.cmd:
            return "forkserver"
        return "other"


def processes(host: NsHost) -> list[Proc]:
    found = []
    for pid in host.pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        found.append(Proc(pid, int(fields[1]), fields[0], cmd.strip()))
    # a child the agent is starting (a worker or a spare, between fork and exec) still has the
    # agent's command line: it is not a second agent
    agents = {p.pid for p in found if p.kind == "agent"}
    forks = {p.pid for p in found if p.kind == "forkserver"}  # the same of a worker it forks
    return [p for p in found if not (p.kind == "agent" and p.ppid in agents)
            and not (p.kind == "forkserver" and p.ppid in forks)]


def of_kind(host: NsHost, kind: str) -> list[Proc]:
    return [p for p in processes(host) if p.kind == kind]


# -- the site: three hosts, their hosts.ini, their Redis ----------------------------------------


class Site(NsSite):

    def write_ini(self) -> None:
        self.ini.write_text(hosts_ini(self.net.client_key, self.net.hosts, name="chaos",
                                      state=self.state, cluster={"redis_grace": REDIS_GRACE}))

    def host(self, name: str) -> NsHost:
        return next(h for h in self.net.hosts if h.name == name)

    def hosts_param(self) -> str:
        """Namespace inode -> host name, for the job to say where each unit ran."""
        return json.dumps({str(os.stat(f"/run/netns/{h.netns}").st_ino): h.name
                           for h in self.net.hosts}, separators=(",", ":"))

    def credentials(self) -> dict[str, str]:
        return json.loads((self.state / "credentials.json").read_text())

    def redis(self) -> redis.Redis:
        """A client as Redis's admin user (the test flushes Redis, restarts it...)."""
        admin = Credentials.load(self.state / "credentials.json").as_role("admin")
        return redis.Redis.from_url(admin.redis_url, username=admin.username,
                                    password=admin.password, socket_timeout=10,
                                    ssl_ca_certs=admin.tls_ca, ssl_cert_reqs="required")

    @property
    def prefix(self) -> str:
        return self.credentials()["prefix"]

    def up(self) -> dict[str, str]:
        r = run_cli("up", str(self.ini), "--accept-new-host-keys", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return rows(r.stdout)


def rows(stdout: str) -> dict[str, str]:
    """Host -> its row, from a per-host table."""
    return {line.split()[0]: line for line in stdout.splitlines()[1:] if line.strip()}


def status(site: Site) -> list[dict]:
    r = run_cli("status", str(site.ini), "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def health_problems(site: Site) -> list[str]:
    """What keeps the site from being healthy: one live agent per host with its one live,
    running worker and its data server, the agent and worker seen alive by `cluster status`,
    and nothing else in the namespace but sshd (and node1's Redis)."""
    try:
        agents = status(site)
    except (AssertionError, json.JSONDecodeError, subprocess.TimeoutExpired) as exc:
        return [f"cluster status failed: {exc}"]
    problems = []
    for h in site.net.hosts:
        procs = processes(h)
        allowed = {"sshd", "agent", "worker", "dataserver", "forkserver"} | (
            {"redis"} if h.name == "node1" else set())
        problems += [f"{h.name}: stray process {p}" for p in procs if p.kind not in allowed]
        problems += [f"{h.name}: not running: {p}" for p in procs if p.state in "TtZX"]
        if not any(p.kind == "sshd" for p in procs):
            problems.append(f"{h.name}: no sshd")
        mine = [p for p in procs if p.kind == "agent"]
        workers = [p for p in procs if p.kind == "worker"]  # its worker, and maybe its spare
        if len(mine) != 1 or len(workers) not in (1, 2):
            problems.append(f"{h.name}: {len(mine)} agents and {len(workers)} worker "
                            f"processes: {procs}")
            continue
        agent = mine[0]
        forks = [p for p in procs if p.kind == "forkserver"]
        if [p.ppid for p in forks] != [agent.pid]:
            problems.append(f"{h.name}: fork servers {forks}, not one of agent {agent}")
        problems += [f"{h.name}: worker {w} is not a child of agent {agent}'s fork server"
                     for w in workers if w.ppid not in [f.pid for f in forks]]
        servers = [p for p in procs if p.kind == "dataserver"]
        if [p.ppid for p in servers] != [agent.pid]:
            problems.append(f"{h.name}: data servers {servers}, not one of agent {agent}")
        alive = [a for a in agents if a["host"] == h.name and a["state"] == "alive"]
        if [a["pid"] for a in alive] != [agent.pid]:
            problems.append(f"{h.name}: status shows live agents {[a['id'] for a in alive]}, "
                            f"but the agent running is pid {agent.pid}")
        elif len(alive[0]["workers"]) != 1 or alive[0]["workers"][0]["pid"] not in [
                w.pid for w in workers]:
            problems.append(f"{h.name}: status shows workers {alive[0]['workers']}, but the "
                            f"worker processes running are {[w.pid for w in workers]}")
    return problems


def wait_healthy(site: Site, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        problems = health_problems(site)
        if not problems:
            return
        if time.monotonic() > deadline:
            raise AssertionError("the site did not become healthy:\n" + "\n".join(problems))
        time.sleep(0.3)


def restore_sshd(site: Site, host: NsHost) -> None:
    """A fresh sshd (with a new host key: netns regenerates it) for a host whose processes were
    all killed; its old key is forgotten, so that `up --accept-new-host-keys` records the new
    one."""
    if host.sshd is not None:
        if host.sshd.poll() is None:
            host.sshd.kill()
        host.sshd.wait(10)
    for suffix in ("", ".pub"):
        Path(f"{host.host_key}{suffix}").unlink(missing_ok=True)
    site.net.start_sshd(host)
    known = site.state / "known_hosts"
    if known.exists():
        kept = [line for line in known.read_text().splitlines()
                if line.split()[:1] != [host.address]]
        known.write_text("".join(f"{line}\n" for line in kept))


def heal(site: Site) -> None:
    """Bring the site back after a test that failed half-way: links up, stopped processes
    continued, dead sshds restarted, agents (re)started by `up`."""
    try:
        wait_healthy(site, timeout=10)
        return
    except AssertionError:
        pass
    for h in site.net.hosts:
        h.link(up=True)
        for p in processes(h):
            if p.state in "Tt":
                os.kill(p.pid, signal.SIGCONT)
        if h.sshd is None or h.sshd.poll() is not None:
            restore_sshd(site, h)
    site.up()
    wait_healthy(site)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    need_root_network()
    work = tmp_path_factory.mktemp("chaos")
    net = NsNetwork(work / "net").open()
    s = Site(net, work)
    try:
        for _ in range(3):
            net.add_host()
        s.write_ini()
        s.up()
        wait_healthy(s)
        yield s
    finally:
        try:
            if (s.state / "credentials.json").exists():
                run_cli("down", str(s.ini), timeout=120)
        finally:
            net.close()


@pytest.fixture(autouse=True)
def healthy(site: Site) -> Iterator[None]:
    """Each test starts on a healthy site, whatever the previous one left."""
    heal(site)
    yield


# -- a job run ------------------------------------------------------------------------------------


@dataclass
class Start:
    index: int
    pid: int
    host: str
    slow: bool


@dataclass
class Run:
    units: int
    log: Path
    out: Path
    command: list[str]
    env: dict[str, str] | None = None
    proc: subprocess.Popen[str] = field(init=False)
    stdout: str = ""
    stderr: str = ""

    def __post_init__(self) -> None:
        self.proc = self.start()

    def start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, cwd=ROOT, env=self.env)

    def lines(self, kind: str) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split()[1:] for line in self.log.read_text().splitlines()
                if line.startswith(kind + " ")]

    def starts(self) -> list[Start]:
        return [Start(int(f[0]), int(f[1]), f[2], f[3:] == ["slow"]) for f in self.lines("start")]

    def ends(self) -> list[tuple[int, int, str]]:
        return [(int(f[0]), int(f[1]), f[2]) for f in self.lines("end")]

    def victim(self, host: str) -> Start:
        """The slow unit on ``host``, once it has started: its worker is mid-unit."""
        wait_for(lambda: any(s.slow and s.host == host for s in self.starts()), 60,
                 f"the first unit on {host} to start")
        return next(s for s in self.starts() if s.slow and s.host == host)

    def held(self) -> Start:
        """The held unit (``hold_index``), once it has started: the job cannot end until it is
        released."""
        wait_for(lambda: any(s.slow for s in self.starts()), 60, "the held unit to start")
        return next(s for s in self.starts() if s.slow)

    def counts(self) -> Counter[int]:
        """How many times each unit started."""
        return Counter(s.index for s in self.starts())

    def rerun_elsewhere(self, victim: Start) -> bool:
        return any(s.index == victim.index and s.host != victim.host for s in self.starts())

    def finished(self, victim: Start) -> bool:
        """Whether the victim's worker got to the end of the unit."""
        return (victim.index, victim.pid, victim.host) in self.ends()

    def wait(self, timeout: float = 120) -> int:
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stdout, self.stderr = self.proc.communicate()
            raise AssertionError(f"submit did not return within {timeout:g} s: {self.stderr}"
                                 ) from None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the coordinator (the `cluster submit` process)."""
        self.proc.kill()
        self.stdout, self.stderr = self.proc.communicate(timeout=30)

    def resumed(self, jid: str, out: Path | None = None) -> Run:
        """The same command with ``--resume JOB_ID`` (and maybe another output), started."""
        command = [*self.command, "--resume", jid]
        if out is not None:
            command[command.index("--output") + 1] = str(out)
        return Run(self.units, self.log, out or self.out, command, self.env)

    def again(self) -> int:
        """The very same command again (same job, parameters and seed)."""
        self.proc = self.start()
        return self.wait()

    def output(self) -> object:
        return json.loads(self.out.read_text())

    def summary(self, what: str) -> int:
        found = re.search(rf"(\d+) {what}", self.stderr)
        assert found, f"no '{what}' in the summary: {self.stderr}"
        return int(found.group(1))


def submit(site: Site, where: Path, units: int, sleep: float, *args: str,
           journal: Path | None = None, **params: object) -> Run:
    """`cluster submit` of chaos_units.py on the site, in the background; with
    ``journal``, its local journal (CLUSTER_JOURNAL) goes there."""
    where.mkdir(parents=True, exist_ok=True)
    where.chmod(0o777)  # the workers' own user writes the log (``tmp_path`` above)
    log, out = where / "units.log", where / "out.json"
    given = {"units": units, "sleep": sleep, "log": str(log), "hosts": site.hosts_param(),
             **params}
    command = [sys.executable, "-m", "cluster", "submit", str(JOB), "--hosts", str(site.ini),
               "--lease", str(LEASE), "--output", str(out), "--progress", "none", *args]
    for key, value in given.items():
        text = json.dumps(value) if isinstance(value, bool) else str(value)
        command += ["--param", f"{key}={text}"]
    env = None if journal is None else {**os.environ, "CLUSTER_JOURNAL": str(journal)}
    return Run(units, log, out, command, env)


def journal_events(journal: Path, jid: str | None = None) -> list[tuple[str, str]]:
    """(event, job id) of each line of a local journal, maybe only those of one job."""
    if not journal.exists():
        return []
    lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    return [(e["event"], e["job"]) for e in lines if jid is None or e["job"] == jid]


def started_job(journal: Path) -> str:
    """The id of the job that the first coordinator journalled as started."""
    wait_for(lambda: journal_events(journal), 30, f"a job id in {journal}")
    event, jid = journal_events(journal)[0]
    assert event == "started", journal.read_text()
    return jid


def recorded_units(site: Site, jid: str) -> set[int]:
    """The units whose result Redis has recorded for a job (its ``recorded`` bitmap)."""
    bits = site.redis().get(f"{site.prefix}job:{jid}:recorded") or b""
    return {8 * i + b for i, byte in enumerate(bits) for b in range(8) if byte & (0x80 >> b)}


def expected(units: int, failed: tuple[int, ...] = ()) -> list[list[int] | None]:
    return [None if i in failed else [i, i * i] for i in range(units)]


def job_keys(site: Site) -> list[str]:
    """Keys of jobs left in Redis, but their logs (which outlive a job, with an expiry)."""
    client = site.redis()
    keys = sorted(k.decode() for k in client.scan_iter(f"{site.prefix}job:*"))
    assert all(client.ttl(k) > 0 for k in keys if k.endswith(":logs"))
    return [k for k in keys if not k.endswith(":logs")]


def assert_nothing_left_in_redis(site: Site) -> None:
    client, prefix = site.redis(), site.prefix
    units = f"{prefix}units"
    assert client.xpending(units, "workers")["pending"] == 0, \
        client.xpending_range(units, "workers", "-", "+", 100)
    assert client.xrange(units) == [], "units still queued after the job"
    assert job_keys(site) == []
    assert client.smembers(f"{prefix}jobs") == set()
    assert list(client.scan_iter(f"{prefix}resume:*")) == [], "a finished job is resumable"


def assert_completed(site: Site, run: Run, rc: int) -> None:
    """Exit 0, the fault-free output, nothing left in Redis."""
    assert rc == 0, run.stderr
    assert run.output() == expected(run.units), run.stderr
    assert_nothing_left_in_redis(site)


def assert_worker_of(host: NsHost, pid: int) -> None:
    assert pid in [p.pid for p in of_kind(host, "worker")], f"{pid} is no worker on {host.name}"


# -- the scenarios --------------------------------------------------------------------------------


def test_sigkill_a_worker_mid_unit(site: Site, tmp_path: Path):
    run = submit(site, tmp_path, 30, 0.2, slow_host="node2", slow_sleep=3)
    victim = run.victim("node2")
    assert_worker_of(site.host("node2"), victim.pid)
    os.kill(victim.pid, signal.SIGKILL)
    rc = run.wait()

    assert_completed(site, run, rc)
    assert run.summary("reissued") >= 1
    assert [s.index for s in run.starts()].count(victim.index) >= 2  # it ran again
    assert not run.finished(victim)
    wait_healthy(site)  # the agent restarted its worker


def test_sigkill_an_agent_and_with_it_its_worker(site: Site, tmp_path: Path):
    node2 = site.host("node2")
    run = submit(site, tmp_path, 30, 0.2, slow_host="node2", slow_sleep=3)
    victim = run.victim("node2")
    assert_worker_of(node2, victim.pid)
    [agent] = of_kind(node2, "agent")
    assert int((node2.install_dir / "agent.pid").read_text()) == agent.pid
    os.kill(agent.pid, signal.SIGKILL)
    rc = run.wait()

    assert_completed(site, run, rc)  # on node1 and node3, once node2's lease lapsed
    assert run.summary("reissued") >= 1
    assert run.rerun_elsewhere(victim)
    wait_for(lambda: not of_kind(node2, "agent") + of_kind(node2, "worker"), 30,
             "node2's worker to go with its agent")

    table = rows(run_cli("up", str(site.ini), timeout=300).stdout)
    assert "started" in table["node2"], table
    wait_healthy(site)
    [back] = of_kind(node2, "agent")
    assert back.pid != agent.pid




def test_a_sigkilled_agents_busy_worker_dies_with_it(site: Site, tmp_path: Path):
    node2 = site.host("node2")
    run = submit(site, tmp_path, 30, 0.2, slow_host="node2", slow_sleep=4)
    victim = run.victim("node2")
    [agent] = of_kind(node2, "agent")
    os.kill(agent.pid, signal.SIGKILL)
    try:
        rc = run.wait()
        wait_for(lambda: not of_kind(node2, "agent") + of_kind(node2, "worker"), 30,
                 "node2's worker to go with its agent")
    finally:
        assert "started" in site.up()["node2"]
        wait_healthy(site)
    assert_completed(site, run, rc)
    assert not run.finished(victim), (
        f"worker {victim.pid} outlived its SIGKILLed agent and finished unit {victim.index}")


def test_kill_a_whole_host(site: Site, tmp_path: Path):
    node3 = site.host("node3")
    run = submit(site, tmp_path, 30, 0.2, slow_host="node3", slow_sleep=3)
    victim = run.victim("node3")
    site.net.kill_host(node3)  # sshd, agent and worker, all SIGKILLed
    rc = run.wait()

    assert_completed(site, run, rc)
    assert run.summary("reissued") >= 1
    assert run.rerun_elsewhere(victim) and not run.finished(victim)
    wait_for(lambda: not node3.pids(), 10, "every process of node3 to be gone")

    restore_sshd(site, node3)
    table = site.up()
    assert "started" in table["node3"], table
    wait_healthy(site)


def test_kill_a_host_between_record_and_fetch(site: Site, tmp_path: Path):
    """Large results stay on their worker's host until the coordinator takes them: a host that
    dies after Redis recorded its results and before they were fetched has those units
    computed again elsewhere. The coordinator is held (SIGSTOP) until node3 has results
    recorded and not fetched, then node3 is killed and the coordinator let go."""
    node3 = site.host("node3")
    run = submit(site, tmp_path, 24, 0.1, "--summary-json", str(tmp_path / "summary.json"),
                 pad=1 << 17, slow_host="node3", slow_sleep=1)
    run.victim("node3")
    jid = running_job(site)
    client, blobs = site.redis(), f"{site.prefix}job:{jid}:blobs"

    def on_node3() -> int:  # recorded, not fetched: in node3's spool, named in Redis
        return sum(1 for f, v in client.hgetall(blobs).items()
                   if f.startswith(b"U") and v.startswith(b"D" + node3.address.encode() + b":"))

    os.kill(run.proc.pid, signal.SIGSTOP)
    try:
        wait_for(on_node3, 60, "a result recorded in node3's spool")
        site.net.kill_host(node3)  # sshd, agent, data server and worker, all SIGKILLed
        # and its memory lost, as in a power cut (the test hosts share this machine's /dev/shm,
        # which a coordinator on the same machine would otherwise read directly)
        for path in memory_dir().glob("cluster-spool-node3-*/*"):
            path.unlink()
        held = on_node3()
    finally:
        os.kill(run.proc.pid, signal.SIGCONT)
    rc = run.wait()

    assert_completed(site, run, rc)
    lost = json.loads((tmp_path / "summary.json").read_text())["units"]["lost_results"]
    assert lost >= held >= 1, run.stderr
    assert run.summary("recorded results lost with their host") == lost
    wait_for(lambda: not node3.pids(), 10, "every process of node3 to be gone")

    restore_sshd(site, node3)
    table = site.up()
    assert "started" in table["node3"], table
    wait_healthy(site)


def test_cut_a_host_off_the_network_longer_than_the_lease(site: Site, tmp_path: Path):
    node2 = site.host("node2")
    [agent] = of_kind(node2, "agent")
    # The victim outlives the cut, so that its result arrives after it was reissued, over a
    # connection that stayed idle through the cut; its agent's renewal, sent into the cut, is
    # retransmitted later still (TCP backs off), so the stale commit arrives first.
    run = submit(site, tmp_path, 50, 0.3, slow_host="node2", slow_sleep=5)
    victim = run.victim("node2")
    node2.link(up=False)
    cut = time.monotonic()
    try:
        wait_for(lambda: run.rerun_elsewhere(victim), 30, "the cut-off unit to be reissued")
        time.sleep(max(0.0, 2 * LEASE - (time.monotonic() - cut)))  # a cut of two leases
    finally:
        node2.link(up=True)
    rc = run.wait()

    assert_completed(site, run, rc)
    assert run.summary("reissued") >= 1
    assert run.finished(victim)  # it did compute its result ...
    assert run.summary("duplicates discarded") >= 1  # ... which was discarded
    assert [a.pid for a in of_kind(node2, "agent")] == [agent.pid]  # the agent rode it out
    wait_healthy(site)


def test_sigstop_a_worker_beyond_its_lease(site: Site, tmp_path: Path):
    node3 = site.host("node3")
    [agent] = of_kind(node3, "agent")
    client = site.redis()
    run = submit(site, tmp_path, 40, 0.3, slow_host="node3", slow_sleep=1)
    victim = run.victim("node3")
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: run.rerun_elsewhere(victim), 30, "the stopped worker's unit to be "
                 "reissued")
        # Continue it just after its agent's heartbeat: the worker, whose unit is over by now,
        # commits before the agent's next renewal finds its lease gone and replaces it.
        beat = client.zscore(f"{site.prefix}agents", f"node3/{agent.pid}")
        wait_for(lambda: client.zscore(f"{site.prefix}agents", f"node3/{agent.pid}") != beat,
                 10, "node3's agent's heartbeat")
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    rc = run.wait()

    assert_completed(site, run, rc)
    assert run.summary("reissued") >= 1
    assert run.finished(victim)  # its late result ...
    assert run.summary("duplicates discarded") >= 1  # ... was discarded
    wait_healthy(site)


def test_a_unit_much_longer_than_the_lease_is_not_reissued(site: Site, tmp_path: Path):
    # 4 leases of numpy on node2, while the other two workers stay busy for longer than that
    # (so the long unit is never the last one left, which a speculative copy could duplicate).
    run = submit(site, tmp_path, 40, 0.5, slow_host="node2", slow_sleep=4 * LEASE, busy=True)
    victim = run.victim("node2")
    rc = run.wait()

    assert_completed(site, run, rc)
    assert run.summary("reissued") == 0
    assert run.summary("duplicates discarded") == 0
    assert [s.index for s in run.starts()].count(victim.index) == 1  # it ran exactly once
    assert run.finished(victim)
    wait_healthy(site)


def test_poison_units(site: Site, tmp_path: Path):
    # A unit that raises on every attempt fails the job, named, after --max-attempts.
    raises = submit(site, tmp_path / "raises", 12, 0.05, "--max-attempts", "2", raise_index=3)
    assert raises.wait() == ExitCode.JOB_FAILED, raises.stderr
    assert re.search(r"cluster: error: unit 3\b", raises.stderr), raises.stderr
    assert "unit 3 is poison" in raises.stderr
    assert [s.index for s in raises.starts()].count(3) == 2
    assert not raises.out.exists()
    assert_nothing_left_in_redis(site)
    wait_healthy(site)

    # A unit that kills its worker on every attempt: the same, rather than looping forever.
    dies = submit(site, tmp_path / "dies", 12, 0.05, "--max-attempts", "2", die_index=5)
    assert dies.wait() == ExitCode.JOB_FAILED, dies.stderr
    assert re.search(r"cluster: error: unit 5\b", dies.stderr), dies.stderr
    assert [s.index for s in dies.starts()].count(5) == 2
    assert not dies.out.exists()
    assert_nothing_left_in_redis(site)
    wait_healthy(site)

    # Both, within --max-failed 2: the job completes, the poison gathered as None, and it says
    # so with exit 5 (PARTIAL, as the README's exit codes have it).
    both = submit(site, tmp_path / "both", 12, 0.05, "--max-attempts", "2", "--max-failed",
                  "2", raise_index=3, die_index=5)
    rc = both.wait()
    assert rc == ExitCode.PARTIAL, both.stderr
    assert both.output() == expected(12, failed=(3, 5)), both.stderr
    assert re.search(r"\b2 failed", both.stderr), both.stderr
    assert_nothing_left_in_redis(site)
    wait_healthy(site)


def test_all_hosts_lost(site: Site, tmp_path: Path):
    run = submit(site, tmp_path, 30, 0.3, "--worker-timeout", "3")
    wait_for(lambda: len(run.starts()) >= 3, 60, "three units to start")
    for h in site.net.hosts:  # every agent and worker; Redis (on node1) and sshd stay
        for p in of_kind(h, "agent") + of_kind(h, "worker"):
            os.kill(p.pid, signal.SIGKILL)
    rc = run.wait(timeout=30)  # lease, then --worker-timeout: well within this

    assert rc == ExitCode.INFRA, run.stderr
    assert "cluster: error: no live worker" in run.stderr, run.stderr
    assert "hosts lost: node1, node2, node3" in run.stderr, run.stderr
    assert not run.out.exists()
    for h in site.net.hosts:
        assert not of_kind(h, "agent") + of_kind(h, "worker"), h.name
    left = job_keys(site)  # removed, or kept for a resume and then said so, with its id
    assert all(k.split(":job:")[1].split(":")[0] in run.stderr for k in left), (left, run.stderr)

    table = site.up()
    assert all("started" in table[h.name] for h in site.net.hosts), table
    wait_healthy(site)
    rc = run.again()  # the same command completes, fresh or resumed
    assert_completed(site, run, rc)
    wait_healthy(site)


# -- Redis restarted or flushed, coordinators killed or taken over -------------------------------


def redis_answers(site: Site) -> bool:
    try:
        return bool(site.redis().ping())
    except redis.RedisError:
        return False


def running_job(site: Site) -> str:
    """The id of the one job on the site."""
    wait_for(lambda: site.redis().smembers(f"{site.prefix}jobs"), 30, "a job in Redis")
    [jid] = site.redis().smembers(f"{site.prefix}jobs")
    return jid.decode()


def test_redis_restarted_mid_job_with_aof(site: Site, tmp_path: Path):
    node1, release = site.host("node1"), tmp_path / "release"
    home = node1.install_dir / "redis"  # as `up` made it: redis.conf with AOF, daemonized
    conf, pidfile = home / "redis.conf", home / "redis.pid"
    [old] = of_kind(node1, "redis")
    assert int(pidfile.read_text()) == old.pid
    run = submit(site, tmp_path, 40, 0.1, hold_index=0, release=release)
    try:
        run.held()  # the job cannot end before the test releases this unit
        jid = running_job(site)
        wait_for(lambda: len(recorded_units(site, jid)) >= 3, 60, "three results recorded")
        before = recorded_units(site, jid)
        os.kill(old.pid, signal.SIGTERM)  # a clean shutdown: the AOF is written
        wait_for(lambda: not of_kind(node1, "redis"), 30, "node1's redis-server to exit")
        assert not redis_answers(site)
        time.sleep(1.0)
        binary = shutil.which("redis-server")
        assert binary is not None
        # exactly as `up` starts it, as its own user (``accounts``); it daemonizes
        node1.exec(sys.executable, "-c", BECOME, "cluster-redis", binary, str(conf))
        wait_for(lambda: redis_answers(site), 30, "node1's Redis to answer again")
    finally:
        release.touch()
    rc = run.wait()

    assert_completed(site, run, rc)
    assert "Redis unavailable" in run.stderr, run.stderr  # it did ride out the restart ...
    assert "gone from Redis" not in run.stderr, run.stderr  # ... and AOF lost nothing ...
    counts = run.counts()
    assert all(counts[i] == 1 for i in before), (before, counts)  # ... nor computed again
    [new] = of_kind(node1, "redis")
    assert new.pid != old.pid and int(pidfile.read_text()) == new.pid
    wait_healthy(site)


def assert_agents_registered_again(site: Site) -> None:
    wait_healthy(site)  # each agent registered again by itself, with its (new) worker
    alive = [a for a in status(site) if a["state"] == "alive"]
    assert sorted(a["host"] for a in alive) == ["node1", "node2", "node3"], alive
    assert all(len(a["workers"]) == 1 for a in alive), alive


def test_redis_flushed_mid_job_is_noticed(site: Site, tmp_path: Path):
    # Flushed once scatter is done, so that the coordinator has no unit left to add when the job
    # vanishes (a flush while it still adds units: the test below).
    release = tmp_path / "release"
    run = submit(site, tmp_path, 30, 0.1, "--no-speculate", hold_index=0,
                 release=release)
    try:
        held = run.held()  # the job cannot end before the test releases this unit
        jid = running_job(site)
        client = site.redis()
        wait_for(lambda: client.hexists(f"{site.prefix}job:{jid}", "total"), 60,
                 "scatter to finish")
        client.flushall()
    finally:
        release.touch()
    rc = run.wait()

    assert_completed(site, run, rc)
    assert "gone from Redis" in run.stderr, run.stderr
    assert run.counts()[held.index] >= 2  # its result went with the flush: it ran again
    assert_agents_registered_again(site)


def test_redis_flushed_while_the_coordinator_scatters(site: Site, tmp_path: Path):
    run = submit(site, tmp_path, 60, 0.1)
    jid = running_job(site)
    client = site.redis()
    results = f"{site.prefix}job:{jid}:results"
    wait_for(lambda: len(recorded_units(site, jid)) >= 3, 60, "three results recorded")
    # just after a result is recorded: the coordinator collects it, then adds a unit to refill
    client.xread({results: "$"}, block=30_000)
    client.flushall()
    rc = run.wait()

    assert rc == 0, run.stderr
    assert_completed(site, run, rc)
    assert "gone from Redis" in run.stderr, run.stderr
    assert_agents_registered_again(site)


def test_coordinator_killed_mid_scatter_then_resumed(site: Site, tmp_path: Path):
    journal = tmp_path / "journal.jsonl"
    units = 60
    run = submit(site, tmp_path, units, 0.2, "--no-speculate", journal=journal)
    wait_for(lambda: len(run.starts()) >= 10, 60, "ten units to start")
    run.kill()
    jid = started_job(journal)
    fields = site.redis().hgetall(f"{site.prefix}job:{jid}")
    assert b"total" not in fields, fields  # scatter was not finished ...
    assert 0 < int(fields[b"scattered"]) < units, fields  # ... but under way
    before = recorded_units(site, jid)
    assert before, "no unit was recorded before the kill"
    assert not run.out.exists()

    resumed = run.resumed(jid)
    rc = resumed.wait()
    assert_completed(site, resumed, rc)
    # every unit started once, except units whose results the dead coordinator had gathered
    # (they left Redis with it): those started twice; none queued by the dead coordinator was
    # queued again
    counts = run.counts()
    assert set(counts) == set(range(units)) and max(counts.values()) <= 2, counts
    assert {i for i, n in counts.items() if n == 2} <= before, counts
    assert journal_events(journal) == [("started", jid), ("resumed", jid), ("finished", jid)]
    wait_healthy(site)


def test_a_second_coordinator_fences_the_first(site: Site, tmp_path: Path):
    journal, release = tmp_path / "journal.jsonl", tmp_path / "release"
    units = 40
    first = submit(site, tmp_path, units, 0.1, "--no-speculate", journal=journal,
                   hold_index=0, release=release)
    try:
        first.held()  # the first cannot finish until the test releases this unit
        jid = started_job(journal)
        second = first.resumed(jid, out=tmp_path / "second.json")
        wait_for(lambda: ("resumed", jid) in journal_events(journal), 60,
                 "the second coordinator to take the job over")
        rc = first.wait(timeout=30)  # it notices by itself, while the held unit still runs
    finally:
        release.touch()

    assert rc == ExitCode.INFRA, first.stderr
    assert "taken over by another coordinator" in first.stderr, first.stderr
    assert not first.out.exists()
    assert_completed(site, second, second.wait())
    counts = first.counts()  # queued once; gathered by the fenced one: computed again
    assert set(counts) == set(range(units)) and max(counts.values()) <= 2, counts
    # the fenced coordinator journals how it ended, before the second finishes
    assert journal_events(journal) == [("started", jid), ("resumed", jid), ("fenced", jid),
                                       ("finished", jid)]
    wait_healthy(site)


def test_an_executor_on_the_hosts_gives_what_process_pool_gives(site: Site, tmp_path: Path):
    """cluster.Executor on the namespace hosts (the coordinator here, workers there), with
    the worker computing call 0 of a map SIGKILLed: the same results as ProcessPoolExecutor."""
    from concurrent.futures import ProcessPoolExecutor

    sys.path.insert(0, str(SAMPLES))
    import calls  # shipped with its directory

    marks, gate = tmp_path / "marks", tmp_path / "gate"
    marks.mkdir(mode=0o777)
    os.chmod(marks, 0o777)  # the workers run as a user of their own
    n = 30

    def program(ex, directory: str, gate: str | None) -> list[object]:
        out: list[object] = list(ex.map(calls.noisy_stats, range(n), [100] * n))
        return out + list(ex.map(calls.marked, range(n), [directory] * n,
                                 [gate] + [None] * (n - 1)))

    with ProcessPoolExecutor(2) as pool:
        expected = program(pool, str(tmp_path), None)
    with Executor(hosts=str(site.ini), directory=SAMPLES) as ex:
        running: dict[str, object] = {}
        thread = threading.Thread(target=lambda: running.update(
            got=program(ex, str(marks), str(gate))))
        thread.start()
        first = wait_for(lambda: [m for m in marks.iterdir() if m.name.startswith("0.")], 120,
                         "call 0 to start on a host")
        victim = int(first[0].name.split(".")[1])
        host = next(h for h in site.net.hosts if victim in [p.pid for p in of_kind(h, "worker")])
        os.kill(victim, signal.SIGKILL)
        gate.touch()
        thread.join(300)
    assert calls.same(running["got"], expected), host.name
    assert len([m for m in marks.iterdir() if m.name.startswith("0.")]) == 2  # run twice
    wait_healthy(site)
