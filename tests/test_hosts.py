"""`cluster up/status/submit/down/doctor` across real hosts: Linux network namespaces on this
machine, each with its own sshd, bootstrapped over real SSH exactly as real machines would be.

The tests of this module run in order on one set of hosts: up, re-up, add a host, submit, down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import JOBS, SAMPLES, need_root_network, run_cli
from netns import NsHost, NsNetwork, NsSite, hosts_ini
from test_cron import cron
from test_workdir import expected_total, make_project
from waiting import wait_for

from cluster.credentials import Credentials
from cluster.redisconf import LOCKED
from cluster.signing import Keyring
from cluster.workdir import pack

pytestmark = pytest.mark.slow


class Site(NsSite):

    def write_ini(self, hosts: list[NsHost], name: str = "t", state: Path | None = None,
                  path: Path | None = None, cluster: dict[str, object] | None = None) -> Path:
        target = path or self.ini
        target.write_text(hosts_ini(self.net.client_key, hosts, name=name,
                                    state=state or self.state, cluster=cluster))
        return target

    def hosts_ini_with_unreachable(self) -> Path:
        text = self.ini.read_text() + (f"[host ghost]\naddress = {self.net.subnet}.99\n"
                                       f"install_dir = {self.work / 'ghost'}\n")
        path = self.work / "with-ghost.ini"
        path.write_text(text)
        return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    need_root_network()
    work = tmp_path_factory.mktemp("site")
    net = NsNetwork(work / "net").open()
    try:
        hosts = [net.add_host() for _ in range(3)]
        s = Site(net, work)
        s.write_ini(hosts)
        yield s
        run_cli("down", str(s.ini), timeout=120)
    finally:
        net.close()


def rows(stdout: str) -> dict[str, str]:
    """Host -> its row, from a per-host table."""
    return {line.split()[0]: line for line in stdout.splitlines()[1:] if line.strip()}


def ours(host: NsHost) -> list[str]:
    """Processes of cluster in the host's namespace (sshd is the fixture's)."""
    found = []
    for pid in host.pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "sshd" not in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def test_an_unknown_host_key_is_refused(site: Site):
    r = run_cli("up", str(site.ini), timeout=120)
    assert r.returncode == 3
    table = rows(r.stdout)
    assert "unknown host key" in table["node1"] and "FAILED" in table["node2"]
    assert not (site.state / "known_hosts").exists()
    assert all(ours(h) == [] for h in site.net.hosts)


def test_up_on_three_hosts(site: Site):
    r = run_cli("up", str(site.ini), "--accept-new-host-keys", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    table = rows(r.stdout)
    assert set(table) == {"node1", "node2", "node3"}
    assert all("started" in row for row in table.values())
    assert (site.state / "credentials.json").stat().st_mode & 0o777 == 0o600
    for h in site.net.hosts:
        creds = h.install_dir / "credentials.json"
        assert creds.stat().st_mode & 0o777 == 0o600
        assert any("cluster agent" in p for p in ours(h))
    known = (site.state / "known_hosts").read_text()
    assert all(h.public_host_key() in known for h in site.net.hosts)


def test_redis_speaks_tls_only_and_is_verified(site: Site):
    """The Redis that up started: TLS only, its certificate from the cluster's own CA; the
    hosts hold the agents' Redis user only, and the CA."""
    creds = Credentials.load(site.state / "credentials.json")
    assert creds.redis_url.startswith("rediss://") and creds.tls_ca
    conf = (site.net.hosts[0].install_dir / "redis" / "redis.conf").read_text()
    assert "\nport 0\n" in conf and "tls-port 6379" in conf and "requirepass" not in conf
    assert all(f"\n{line}\n" in conf for line in LOCKED)  # no CONFIG SET dir, MODULE, DEBUG
    on_host = Credentials.load(site.net.hosts[1].install_dir / "credentials.json")
    assert (on_host.username, on_host.users, on_host.redis_url) == ("agent", None,
                                                                     creds.redis_url)
    assert on_host.tls_ca and Path(on_host.tls_ca).read_text() == Path(creds.tls_ca).read_text()
    # no cluster key on hosts: the workers' keys verify jobs and seal messages, sign no code
    assert on_host.key == b"" and on_host.worker_keys == Keyring(creds.key).for_workers().to_json()
    as_coordinator = {"CLUSTER_REDIS_PASSWORD": creds.password or "",
                      "CLUSTER_REDIS_USER": creds.username or "", "CLUSTER_PREFIX": creds.prefix}
    plain = run_cli("status", "--redis", creds.redis_url.replace("rediss://", "redis://"),
                    env=as_coordinator)
    assert plain.returncode == 3 and "a TLS-only Redis?" in plain.stderr, plain.stderr
    untrusted = run_cli("status", "--redis", creds.redis_url, env=as_coordinator)
    assert untrusted.returncode == 3 and "certificate verify failed" in untrusted.stderr, \
        untrusted.stderr
    trusted = run_cli("status", "--redis", creds.redis_url, "--tls-ca", creds.tls_ca,
                      env=as_coordinator)
    assert trusted.returncode == 0, trusted.stderr
    assert {"node1", "node2", "node3"} <= set(rows(trusted.stdout))


def test_secrets_are_not_on_command_lines(site: Site):
    password = json.loads((site.state / "credentials.json").read_text())["password"]
    for h in site.net.hosts:
        for proc in ours(h):
            assert password not in proc


def test_status_shows_every_host_and_worker(site: Site):
    r = run_cli("status", str(site.ini), "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    agents = json.loads(r.stdout)
    assert sorted(a["host"] for a in agents) == ["node1", "node2", "node3"]
    assert all(a["state"] == "alive" and len(a["workers"]) == 1 for a in agents)
    assert all(a["workers"][0]["cpu"] == 0 for a in agents)


def test_re_up_is_a_no_op(site: Site):
    before = {h.name: sorted(ours(h)) for h in site.net.hosts}
    r = run_cli("up", str(site.ini), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all("running (unchanged)" in row for row in rows(r.stdout).values())
    assert {h.name: sorted(ours(h)) for h in site.net.hosts} == before


def test_adding_a_host(site: Site):
    site.net.add_host()
    site.write_ini(site.net.hosts)
    r = run_cli("up", str(site.ini), "--accept-new-host-keys", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    table = rows(r.stdout)
    assert "started" in table["node4"]
    assert all("unchanged" in table[n] for n in ("node1", "node2", "node3"))


def test_re_up_restarts_only_what_is_dead_or_outdated(site: Site):
    node2, node3 = site.net.hosts[1], site.net.hosts[2]
    os.kill(int((node2.install_dir / "agent.pid").read_text()), signal.SIGKILL)
    (node3.install_dir / "agent.build").write_text("an-older-build\n")
    r = run_cli("up", str(site.ini), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    table = rows(r.stdout)
    assert "started" in table["node2"] and "restarted" in table["node3"]
    assert "unchanged" in table["node1"] and "unchanged" in table["node4"]


def test_re_up_restarts_agents_whose_settings_changed(site: Site):
    """A setting of hosts.ini that an agent runs with (here data_path) restarts it at the next
    up, with the new setting; back to the default, again. (One host, Redis's, is enough: a
    hosts.ini that lists fewer hosts leaves the others alone.)"""
    def agent_command(host: NsHost) -> str:
        pid = int((host.install_dir / "agent.pid").read_text())
        return " ".join(psutil.Process(pid).cmdline())

    node1 = site.net.hosts[0]
    one = site.write_ini([node1], path=site.work / "one.ini", cluster={"data_path": "no"})
    r = run_cli("up", str(one), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(rows(r.stdout)) == ["node1"] and "restarted" in rows(r.stdout)["node1"], r.stdout
    assert "--data-address" not in agent_command(node1)
    assert all("--data-address" in agent_command(h) for h in site.net.hosts[1:])
    r = run_cli("up", str(site.ini), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    table = rows(r.stdout)
    assert "restarted" in table["node1"], r.stdout
    assert all("unchanged" in table[h.name] for h in site.net.hosts[1:]), r.stdout
    assert all(f"--data-address {h.address}" in agent_command(h) for h in site.net.hosts)


def test_status_shows_a_host_whose_heartbeat_stopped_as_lost(site: Site):
    node4 = site.net.hosts[3]
    agent = int((node4.install_dir / "agent.pid").read_text())
    os.kill(agent, signal.SIGSTOP)
    try:
        wait_for(lambda: node4_agent(site).get("state") == "lost", 30,
                 "node4 to be shown as lost")
        assert "lost" in run_cli("status", str(site.ini)).stdout
    finally:
        os.kill(agent, signal.SIGCONT)
    wait_for(lambda: node4_agent(site).get("state") == "alive" and node4_agent(site)["workers"],
             30, "node4 to be shown alive with its worker again")


def node4_agent(site: Site) -> dict[str, Any]:
    """node4's agent as `cluster status --json` shows it, or {}."""
    agents = json.loads(run_cli("status", str(site.ini), "--json").stdout)
    return next((a for a in agents if a["host"] == "node4"), {})


def test_a_job_runs_on_every_host(site: Site):
    r = run_cli("submit", str(JOBS / "monte_carlo_pi.py"), "--hosts", str(site.ini),
                "--param", "units=48", "--param", "samples=200000", "--progress", "none",
                timeout=120)
    assert r.returncode == 0, r.stderr
    assert abs(float(r.stdout) - 3.14159) < 0.02
    per_host = r.stderr.split("units per host:")[1].strip().split(", ")
    counts = {item.split()[0]: int(item.split()[1]) for item in per_host}
    assert set(counts) == {"node1", "node2", "node3", "node4"}
    assert all(n > 0 for n in counts.values()) and sum(counts.values()) == 48


PROBE = """\
import os, pwd, sys
from pathlib import Path

def scatter(params):
    for i in range(int(params.get("units", 8))):
        yield {"i": i}

def agent_pid():
    pid = os.getppid()  # the fork server that forked this worker, whose parent is the agent
    if b"cluster.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return pid

def compute(unit):
    install = Path(sys.executable).parent.parent.parent  # install_dir/venv/bin/python
    refused = []
    agent = agent_pid()
    for path in (install / "credentials.json", install / "redis" / "redis.conf",
                 Path(f"/proc/{agent}/environ"), Path(f"/proc/{agent}/mem")):
        try:
            path.read_bytes()[:1]
        except FileNotFoundError:
            continue
        except PermissionError:
            refused.append(path.name)
    return {"user": pwd.getpwuid(os.geteuid()).pw_name, "groups": os.getgroups(),
            "refused": sorted(set(refused))}

def gather(results, params):
    return results
"""


def test_job_code_runs_as_a_user_that_cannot_read_the_secrets(site: Site, tmp_path: Path):
    """up connected as root: workers run as worker_user and Redis as redis_user, so job code
    cannot read the agent's credentials file or memory, nor Redis's config (every user's
    password); the agent stays root."""
    job = tmp_path / "probe.py"
    job.write_text(PROBE)
    r = run_cli("submit", str(job), "--hosts", str(site.ini), "--progress", "none",
                timeout=120)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert len(results) == 8
    for result in results:
        assert (result["user"], result["groups"]) == ("cluster-worker", []), result
        assert {"credentials.json", "environ", "mem"} <= set(result["refused"]), result
    def started_by_the_agent(pid: int) -> bool:
        """A child the agent is starting (between fork and exec) still has its command line."""
        parent = psutil.Process(pid).parent()
        return parent is not None and "cluster agent" in " ".join(parent.cmdline())

    users = {kind: {psutil.Process(pid).username() for pid in h.pids()
                    if kind in " ".join(psutil.Process(pid).cmdline())
                    and not (kind == "cluster agent" and started_by_the_agent(pid))}
             for h in site.net.hosts[:1] for kind in ("redis-server", "cluster agent",
                                                       "cluster.forkserver", "cluster.worker")}
    assert users == {"redis-server": {"cluster-redis"}, "cluster agent": {"root"},
                     "cluster.forkserver": {"cluster-worker"},
                     "cluster.worker": {"cluster-worker"}}, users
    home = site.net.hosts[0].install_dir
    assert (home / "redis").stat().st_mode & 0o777 == 0o700
    assert (home / "redis" / "redis.conf").stat().st_uid == psutil.Process(
        next(p for p in site.net.hosts[0].pids()
             if "redis-server" in " ".join(psutil.Process(p).cmdline()))).uids().real


def test_a_job_directory_runs_on_every_host_and_is_unpacked_once_per_host(site: Site,
                                                                         tmp_path: Path):
    job = make_project(tmp_path / "project", marker="hosts")
    digest = pack(job).digest
    hosts = ["node1", "node2", "node3", "node4"]

    def run(units: int) -> dict[str, int]:
        r = run_cli("submit", str(job), "--hosts", str(site.ini), "--param", f"units={units}",
                    "--param", "pause=0.2", "--progress", "none", "-o",
                    str(tmp_path / "out.json"), timeout=120)
        assert r.returncode == 0, r.stderr
        value = json.loads((tmp_path / "out.json").read_text())
        assert value["total"] == expected_total(units) and value["same"], value
        copies = {h.name: h.install_dir / "cache" / "workdirs" / digest
                  for h in site.net.hosts}
        assert set(value["cwds"]) <= {str(p) for p in copies.values()}, value
        # 0.2 s units: enough work for the job to spread, even while a busy machine delays
        # some hosts' fresh workers (a job run on one host only names no hosts)
        assert "units per host:" in r.stderr, r.stderr
        ran = {h for h in hosts if f"{h} " in r.stderr.split("units per host:")[1]}
        return {h: (path / "helper_mod.py").stat().st_ino for h, path in copies.items()
                if h in ran and path.is_dir()}

    first = run(24)
    assert len(first) >= 2, first  # every host that ran a unit has its copy
    second = run(25)
    assert {h: second[h] for h in first if h in second} == {h: first[h] for h in second
                                                           if h in first}  # not unpacked again


def test_what_compute_writes_on_hosts_is_in_cluster_logs(site: Site):
    r = run_cli("submit", str(SAMPLES / "talky.py"), "--hosts", str(site.ini), "--param",
                "units=12", "--progress", "none", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == sum(range(12))  # stdout holds the result only
    jid = r.stderr.split("cluster logs ")[1].split()[0]
    logs = run_cli("logs", jid, "--hosts", str(site.ini))
    assert logs.returncode == 0, logs.stderr
    hosts = set()
    for i in range(12):
        tagged = [line for line in logs.stdout.splitlines() if f" unit {i}] " in line]
        text = "\n".join(tagged)
        for way in (f"print of unit {i}", f"fd1 of unit {i}", f"C printf of unit {i}",
                    f"stderr: fd2 of unit {i}", f"log: WARNING talky: logging of unit {i}"):
            assert way in text, logs.stdout
        hosts.add(tagged[0][1:].split()[0])
    assert hosts <= {h.name for h in site.net.hosts}
    one = sorted(hosts)[0]
    only = run_cli("logs", jid, "--hosts", str(site.ini), "--host", one).stdout
    assert only and all(line.startswith(f"[{one} unit ") for line in only.splitlines())


def test_a_cron_run_on_the_hosts(site: Site, tmp_path: Path):
    (tmp_path / "home").mkdir()
    r = cron(tmp_path, str(SAMPLES / "gated.py"), "--hosts", str(site.ini), "--param",
             "units=12", "--output", "out-{date}.json", "--summary-json", "summary-{id}.json")
    assert r.returncode == 0, r.stderr
    [written] = tmp_path.glob("out-*.json")
    assert json.loads(written.read_text()) == sum(range(12))
    [summary] = tmp_path.glob("summary-*.json")
    record = json.loads(summary.read_text())
    assert record["state"] == "finished" and summary.name == f"summary-{record['job']}.json"
    assert sum(record["hosts"].values()) == 12


def test_rotate_key_gives_every_host_a_new_key(site: Site, tmp_path: Path):
    creds = site.state / "credentials.json"
    old = Credentials.load(creds)
    r = run_cli("rotate-key", str(site.ini), timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(rows(r.stdout)) == 4 and all("restarted with the new key" in row
                                            for row in rows(r.stdout).values()), r.stdout
    new = Credentials.load(creds)
    assert new.key != old.key and (new.password, new.redis_url) == (old.password, old.redis_url)
    assert creds.stat().st_mode & 0o777 == 0o600
    for h in site.net.hosts:
        on_host = Credentials.load(h.install_dir / "credentials.json")
        assert on_host.worker_keys == Keyring(new.key).for_workers().to_json(), h.name
    ok = run_cli("submit", str(JOBS / "monte_carlo_pi.py"), "--hosts", str(site.ini),
                 "--param", "units=8", "--progress", "none", timeout=120)
    assert ok.returncode == 0, ok.stderr
    stale = tmp_path / "old.json"
    old.dump(stale)  # a coordinator still holding the old key is refused at once
    refused = run_cli("submit", str(JOBS / "monte_carlo_pi.py"), "--credentials", str(stale),
                      "--progress", "none", timeout=120)
    assert refused.returncode == 3 and "has a different cluster key" in refused.stderr, \
        refused.stderr


def test_an_unreachable_host_is_reported_while_the_others_come_up(site: Site):
    ini = site.hosts_ini_with_unreachable()
    r = run_cli("up", str(ini), timeout=300)
    assert r.returncode == 3
    table = rows(r.stdout)
    assert "unreachable" in table["ghost"]
    assert all("running" in table[h.name] for h in site.net.hosts), r.stdout
    assert run_cli("up", str(ini), "--allow-partial", timeout=300).returncode == 0


def test_doctor_reports_each_problem(site: Site):
    ini = site.hosts_ini_with_unreachable()
    missing = "[host node2]\npython = /nonexistent/python3\n"
    stranger = site.work / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True)
    wrong_key = f"[host node3]\nidentity_file = {stranger}\n"
    ini.write_text(ini.read_text().replace("[host node2]\n", missing)
                   .replace("[host node3]\n", wrong_key))
    r = run_cli("doctor", str(ini), timeout=120)
    assert r.returncode == 3
    table = rows(r.stdout)
    assert "unreachable" in table["ghost"]
    assert "no python at '/nonexistent/python3'" in table["node2"]
    assert "authentication as root failed" in table["node3"]
    assert table["node1"].split()[1] == "ok" and table["node4"].split()[1] == "ok"
    assert "cluster: error: problems on" in r.stderr
    assert all(name in r.stderr for name in ("ghost", "node2", "node3"))


def test_a_changed_host_key_is_refused_even_with_accept_new(site: Site):
    h = site.net.hosts[2]
    known = site.state / "known_hosts"
    saved = known.read_text()
    forged = saved.replace(h.public_host_key().split()[1],
                           site.net.hosts[0].public_host_key().split()[1])
    known.write_text(forged)
    try:
        r = run_cli("doctor", str(site.ini), timeout=120)
        assert "CHANGED" in rows(r.stdout)["node3"]
        r = run_cli("up", str(site.ini), "--accept-new-host-keys", timeout=300)
        assert r.returncode == 3 and "CHANGED" in rows(r.stdout)["node3"]
    finally:
        known.write_text(saved)


def test_bad_hosts_ini_names_the_line(site: Site, tmp_path: Path):
    bad = tmp_path / "bad.ini"
    bad.write_text("[cluster]\nname = t\nredis = node1\n\n[host node1]\ncores = many\n")
    r = run_cli("up", str(bad), timeout=60)
    assert r.returncode == 2
    assert f"{bad}:6: [host node1] cores: 'many' is not a whole number" in r.stderr


def test_down_leaves_nothing_in_any_namespace(site: Site):
    r = run_cli("down", str(site.ini), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "redis stopped" in rows(r.stdout)["node1"]
    for h in site.net.hosts:
        assert ours(h) == [], h.name  # agents, workers and node1's Redis are all gone


def test_agents_stop_on_their_own_when_redis_is_gone(site: Site):
    ini = site.write_ini(site.net.hosts[:2], name="orphans", path=site.work / "orphans.ini",
                         state=site.work / "orphans-state", cluster={"redis_grace": 2})
    r = run_cli("up", str(ini), "--accept-new-host-keys", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    node1 = site.net.hosts[0]
    redis_pid = int((node1.install_dir / "redis" / "redis.pid").read_text())
    os.kill(redis_pid, signal.SIGKILL)  # Redis gone, and nobody runs `cluster down`
    wait_for(lambda: not any(ours(h) for h in site.net.hosts[:2]), 30,
             "the agents and workers on node1 and node2 to stop on their own")
