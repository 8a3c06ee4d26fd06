"""`up` and `doctor` details on real hosts (namespace hosts, tests/netns.py): the Redis that
`up` sizes to the cluster, a host whose sshd has no SFTP, wheels that changed but kept their size,
virtualenvs without pip, and a host that lost power and came back.

The tests of this module run in order on one set of hosts: node1 (Redis) and node2, brought up
by the first test; node3, whose sshd has no SFTP subsystem, is only in ``no-sftp.ini``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need_root_network, run_cli
from netns import NsHost, NsNetwork, NsSite, hosts_ini

from cluster import config, credentials
from cluster.broker import Broker
from cluster.errors import ExitCode
from cluster.launcher import Launcher
from cluster.redisconf import Limits
from cluster.wheelhouse import Wheelhouse, hashes

pytestmark = pytest.mark.slow

MAXMEMORY = 300 * 2**20  # hosts.ini: redis_maxmemory = 300mb


class Site(NsSite):

    def write_ini(self, hosts: list[NsHost], path: Path, **cluster: object) -> Path:
        path.write_text(hosts_ini(self.net.client_key, hosts, name="launch", state=self.state,
                                  cluster={"connect_timeout": 0.5, **cluster}))
        return path

    def broker(self) -> Broker:
        creds = credentials.for_cluster(config.load(self.ini), create=False)
        return Broker.of(creds.as_role("admin"))  # it reads Redis's config

    def agents(self) -> list[dict[str, object]]:
        r = run_cli("status", str(self.ini), "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        return list(json.loads(r.stdout))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    need_root_network()
    work = tmp_path_factory.mktemp("launch")
    net = NsNetwork(work / "net").open()
    try:
        node1, node2 = net.add_host(), net.add_host()
        node3 = net.add_host(sftp=False)
        s = Site(net, work)
        s.write_ini([node1, node2], s.ini, redis_maxmemory="300mb")
        s.write_ini([node1, node2, node3], work / "no-sftp.ini", redis_maxmemory="300mb")
        yield s
        run_cli("down", str(s.ini), timeout=120)
    finally:
        net.close()


def rows(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.splitlines()[1:] if line.strip()}


def test_up_sizes_redis_and_says_what_it_accepted(site: Site):
    # connect_timeout = 0.5 in hosts.ini: a fraction of a second is a timeout, not zero
    r = run_cli("up", str(site.ini), "--accept-new-host-keys", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    table = rows(r.stdout)
    assert "started" in table["node1"] and "started" in table["node2"]
    assert "redis started (maxclients 10000, maxmemory 300.0 MB, noeviction)" in table["node1"]
    broker = site.broker()
    try:
        assert Limits.of(broker) == Limits(10_000, MAXMEMORY, "noeviction")
    finally:
        broker.close()
    conf = (site.net.hosts[0].install_dir / "redis" / "redis.conf").read_text()
    assert {"maxclients 10000", f"maxmemory {MAXMEMORY}", "maxmemory-policy noeviction",
            "appendonly yes"} <= set(conf.splitlines())
    redis_pid = (site.net.hosts[0].install_dir / "redis" / "redis.pid").read_text().strip()
    limits = Path(f"/proc/{redis_pid}/limits").read_text()
    files = re.search(r"Max open files\s+(\d+)", limits)
    assert files is not None and int(files[1]) >= 10_032  # room for every client it accepts


def test_doctor_warns_near_maxclients_and_up_raises_it(site: Site):
    broker = site.broker()
    try:
        broker.client.config_set("maxclients", 50)  # as a Redis started by hand might have
        r = run_cli("doctor", str(site.ini), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert ("ok: near the limit: Redis accepts 50 clients, and 2 workers and 2 agents "
                "need up to 108") in rows(r.stdout)["node1"]
        r = run_cli("up", str(site.ini), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "redis running (maxclients 10000," in rows(r.stdout)["node1"]
        assert Limits.of(broker).maxclients == 10_000
    finally:
        broker.client.config_set("maxclients", 10_000)
        broker.close()


def test_maxmemory_defaults_to_half_the_hosts_ram(site: Site, tmp_path: Path):
    ini = site.write_ini(site.net.hosts[:2], tmp_path / "default.ini")
    cfg = config.load(ini)
    launcher = Launcher(cfg, credentials.for_cluster(cfg, create=False))
    remote = launcher.remote(cfg.host("node2"))
    with remote.conn:
        maxmemory = launcher.redis_maxmemory(remote)
    mem_kb = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    assert mem_kb is not None and maxmemory == int(mem_kb[1]) * 1024 // 2


def test_up_on_a_host_without_sftp_names_it_and_exits_3(site: Site):
    r = run_cli("up", str(site.work / "no-sftp.ini"), "--accept-new-host-keys", timeout=300)
    assert r.returncode == ExitCode.INFRA, r.stdout + r.stderr
    table = rows(r.stdout)
    assert "FAILED" in table["node3"] and "no SFTP" in table["node3"]
    assert "unchanged" in table["node1"] and "unchanged" in table["node2"]
    assert "internal error" not in r.stderr and "node3" in r.stderr


def test_doctor_checks_sftp_and_names_the_host(site: Site):
    # node3's host key was accepted by the up above: SSH works, SFTP does not
    r = run_cli("doctor", str(site.work / "no-sftp.ini"), timeout=120)
    assert r.returncode == ExitCode.INFRA, r.stdout + r.stderr
    table = rows(r.stdout)
    assert "no SFTP" in table["node3"] and "Subsystem sftp" in table["node3"]
    assert table["node1"].split()[1] == "ok" and table["node2"].split()[1] == "ok"
    assert r.stderr.strip() == "cluster: error: problems on node3"


def test_redis_on_a_host_without_sftp_names_it_and_exits_3(site: Site, tmp_path: Path):
    ini = tmp_path / "redis-no-sftp.ini"
    ini.write_text(hosts_ini(site.net.client_key, [site.net.hosts[2]], name="nosftp",
                             state=tmp_path / "state", cluster={"redis": "node3"}))
    r = run_cli("up", str(ini), "--accept-new-host-keys", timeout=120)
    assert r.returncode == ExitCode.INFRA, r.stdout + r.stderr
    assert "no SFTP" in rows(r.stdout)["node3"]
    assert "internal error" not in r.stderr


def test_a_wheel_that_kept_its_size_is_shipped_again(site: Site, tmp_path: Path):
    cfg = config.load(site.ini)
    host = cfg.host("node2")
    launcher = Launcher(cfg, credentials.for_cluster(cfg, create=False))
    house = tmp_path / "house"
    house.mkdir()
    wheel = house / "same-1.0-py3-none-any.whl"
    shipped = site.net.hosts[1].install_dir / "wheels" / wheel.name
    remote = launcher.remote(host)
    with remote.conn:
        wheel.write_bytes(b"A" * 4096)
        assert Launcher.ship_wheels(remote, Wheelhouse(house, "a", hashes(house))) \
            == [wheel.name]
        assert Launcher.ship_wheels(remote, Wheelhouse(house, "a", hashes(house))) == []
        wheel.write_bytes(b"B" * 4096)  # an edit that keeps the size
        assert Launcher.ship_wheels(remote, Wheelhouse(house, "b", hashes(house))) \
            == [wheel.name]
    assert shipped.read_bytes() == b"B" * 4096
    shipped.unlink()


def test_hosts_run_pip_from_its_wheel_and_a_wheelhouse_without_pip_still_installs(
        site: Site, tmp_path: Path):
    install = site.net.hosts[1].install_dir
    venv = install / "venv"
    assert list((install / "wheels").glob("pip-*.whl"))  # shipped with the project's wheels
    assert not list(venv.glob("lib/python*/site-packages/pip"))  # the venv was made without
    # a given wheelhouse without pip's wheel: the venv gets pip of its own, then installs
    cfg = config.load(site.ini)
    launcher = Launcher(cfg, credentials.for_cluster(cfg, create=False))
    house = tmp_path / "house"
    house.mkdir()
    kept = {name: (install / name).read_text() for name in ("BUILD", "REQUIREMENTS")}
    remote = launcher.remote(cfg.host("node2"))
    try:
        with remote.conn:
            launcher.ship(remote, Wheelhouse(house, "nopip", {}), new_build=False)
    finally:
        for name, text in kept.items():  # what up installed stays what the host records
            (install / name).write_text(text)
    assert list(venv.glob("lib/python*/site-packages/pip"))


def test_after_a_power_cut_the_new_agent_replaces_the_lost_one(site: Site):
    node2 = site.net.hosts[1]
    old = f"node2/{(node2.install_dir / 'agent.pid').read_text().strip()}"
    site.net.kill_host(node2)  # sshd, agent and worker: the power is cut
    deadline = time.monotonic() + 30
    while {a["id"]: a["state"] for a in site.agents()}.get(old) != "lost":
        assert time.monotonic() < deadline, "the dead agent is never shown as lost"
        time.sleep(0.5)
    assert node2.sshd is not None
    node2.sshd.wait(10)
    site.net.start_sshd(node2)  # the host is back, with a new host key
    known = site.state / "known_hosts"
    known.write_text("".join(f"{line}\n" for line in known.read_text().splitlines()
                             if not line.startswith(f"{node2.address} ")))
    r = run_cli("up", str(site.ini), "--accept-new-host-keys", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "started" in rows(r.stdout)["node2"]
    node2_agents = [a for a in site.agents() if a["host"] == "node2"]
    assert [a["state"] for a in node2_agents] == ["alive"], node2_agents
    assert node2_agents[0]["id"] != old
