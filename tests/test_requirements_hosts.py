"""A job's requirements on real hosts (namespace hosts, tests/netns.py): `submit` refuses a job
that a host cannot run before anything is scattered, naming the host; hosts.ini's
``requirements`` and `up` install it, from a package the test builds itself (no index).

The tests of this module run in order on one set of hosts: node1 (Redis) and node2.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SAMPLES, need_root_network, run_cli
from netns import NsHost, NsNetwork, NsSite, hosts_ini
from tinypkg import make_project

from cluster.errors import ExitCode

pytestmark = pytest.mark.slow

JOB = str(SAMPLES / "needs_tinydep.py")


class Site(NsSite):

    def write_ini(self, hosts: list[NsHost], requirements: str = "") -> Path:
        cluster: dict[str, object] = {"requirements": requirements} if requirements else {}
        self.ini.write_text(hosts_ini(self.net.client_key, hosts, name="reqs", state=self.state,
                                      cluster=cluster))
        return self.ini

    def up(self, hosts: list[NsHost], requirements: str = "") -> dict[str, str]:
        """`cluster up` on ``hosts``; each host's row."""
        self.write_ini(hosts, requirements)
        r = run_cli("up", str(self.ini), "--accept-new-host-keys", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line.strip()}

    def submit(self, *params: str) -> tuple[int, str, str]:
        r = run_cli("submit", JOB, "--hosts", str(self.ini), "--progress", "none",
                    *(arg for p in params for arg in ("--param", p)), timeout=120)
        return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    need_root_network()
    work = tmp_path_factory.mktemp("reqs")
    net = NsNetwork(work / "net").open()
    try:
        net.add_host()
        net.add_host()
        make_project(work / "tiny")  # tinydep 1.0, VALUE = 42
        s = Site(net, work)
        yield s
        run_cli("down", str(s.ini), timeout=120)
    finally:
        net.close()


def site_packages(host: NsHost) -> Path:
    return next((host.install_dir / "venv" / "lib").glob("python3*/site-packages"))


def test_a_job_a_host_cannot_run_is_refused_before_anything_runs(site: Site):
    node1, node2 = site.net.hosts
    rows = site.up([node1], requirements="./tiny")  # relative to hosts.ini
    assert "started, with tinydep 1.0" in rows["node1"]
    site.up([node1, node2])  # node2 joins without it; node1 keeps what it has
    marker = site.work / "scattered"
    code, _, stderr = site.submit(f"marker={marker}")
    assert code == ExitCode.USAGE, stderr
    assert stderr == (f"cluster: error: {JOB} needs tinydep>=1.0 (node2: not installed): list "
                      "it in requirements in hosts.ini and run cluster up\n")
    assert not marker.exists()


def test_after_requirements_in_hosts_ini_and_up_it_runs(site: Site):
    node1, node2 = site.net.hosts
    numpy_before = {h.name: next(site_packages(h).glob("numpy-*.dist-info")).stat().st_ino
                    for h in (node1, node2)}
    rows = site.up([node1, node2], requirements="./tiny")
    assert all("restarted, with tinydep 1.0" in rows[h] for h in ("node1", "node2")), rows
    assert (site_packages(node2) / "tinydep.py").is_file()
    numpy_after = {h.name: next(site_packages(h).glob("numpy-*.dist-info")).stat().st_ino
                   for h in (node1, node2)}
    assert numpy_after == numpy_before  # only what was missing was installed
    code, stdout, stderr = site.submit("units=40", "sleep=0.05")
    assert code == 0, stderr
    assert int(stdout) == sum(range(40)) * 42
    assert "node1" in stderr.split("units per host:")[1] and "node2" in stderr


def test_a_local_package_that_changed_is_installed_again(site: Site):
    node1, node2 = site.net.hosts
    (site.work / "tiny" / "tinydep.py").write_text("VALUE = 43\n")  # the same version
    rows = site.up([node1, node2], requirements="./tiny")
    assert all("restarted, with tinydep 1.0" in row for row in rows.values()), rows
    code, stdout, stderr = site.submit("units=8")
    assert code == 0, stderr
    assert int(stdout) == sum(range(8)) * 43
