"""Requirements: a job's (REQUIREMENTS, requirements.txt), hosts.ini's, the wheelhouse that
`up` builds from them, and the check `submit` makes against what agents report, before anything
is scattered. The same on namespace hosts, end to end: test_requirements_hosts.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import SAMPLES, run_cli
from packaging.requirements import Requirement
from tinypkg import make_project
from waiting import wait_for

from cluster import wheelhouse
from cluster.broker import Broker
from cluster.config import ConfigError, load
from cluster.credentials import Credentials
from cluster.errors import ExitCode, JobFileError, MissingRequirements, UsageError
from cluster.jobfile import load_job
from cluster.requirements import Installed, check_hosts, parse, read_txt, unmet

NEEDS_TINYDEP = str(SAMPLES / "needs_tinydep.py")
LINUX_311 = {"python_version": "3.11", "sys_platform": "linux"}


def host(name: str, packages: dict[str, str] | None, **markers: str) -> Installed:
    return Installed(name, packages, {**LINUX_311, **markers})


# -- parsing ------------------------------------------------------------------------------------


def test_a_bad_requirement_says_why_in_one_line():
    assert str(parse("scipy >= 1.11")) == "scipy>=1.11"
    with pytest.raises(ValueError) as exc:
        parse("scipy>=>1")
    assert "\n" not in str(exc.value)
    assert str(exc.value).startswith("'scipy>=>1' is not a requirement")


def test_requirements_txt_takes_requirements_and_comments(tmp_path: Path):
    txt = tmp_path / "requirements.txt"
    txt.write_text("# what the job needs\nscipy>=1.11  # for the fit\n\nTiny_Dep==1.0\n")
    assert [str(r) for r in read_txt(txt)] == ["scipy>=1.11", "Tiny_Dep==1.0"]


@pytest.mark.parametrize("line, words", [
    ("-r other.txt", "-r: pip options are not supported here"),
    ("--index-url https://example.org/simple", "--index-url: pip options"),
    ("./vendored/lib", "'./vendored/lib' is not a requirement"),
])
def test_requirements_txt_refuses_what_hosts_cannot_follow(tmp_path: Path, line: str,
                                                           words: str):
    txt = tmp_path / "requirements.txt"
    txt.write_text(f"numpy\n{line}\n")
    with pytest.raises(JobFileError) as exc:
        read_txt(txt)
    assert str(exc.value).startswith(f"{txt}:2: {words}")


def job_file(tmp_path: Path, requirements: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(f"REQUIREMENTS = {requirements}\n"
                    "def scatter(p): return []\ndef compute(u): return u\n"
                    "def gather(r, p): return r\n")
    return str(path)


def test_a_job_declares_requirements_in_its_file_and_beside_it(tmp_path: Path):
    path = job_file(tmp_path, "['scipy>=1.11', 'numpy']")
    (tmp_path / "requirements.txt").write_text("numpy\ntinydep>=1.0\n")
    job = load_job(path)
    assert [str(r) for r in job.requirements] == ["scipy>=1.11", "numpy", "tinydep>=1.0"]
    assert load_job(str(SAMPLES / "tiny.py")).requirements == ()


@pytest.mark.parametrize("value, words", [
    ("'scipy'", "REQUIREMENTS must be a list of str"),
    ("[1.11]", "REQUIREMENTS must be a list of str"),
    ("['scipy>=1.11', 'numpy=>2']", "REQUIREMENTS: 'numpy=>2' is not a requirement"),
])
def test_bad_requirements_name_the_job_file_and_the_entry(tmp_path: Path, value: str,
                                                          words: str):
    path = job_file(tmp_path, value)
    with pytest.raises(JobFileError) as exc:
        load_job(path)
    assert str(exc.value).startswith(f"{path}: {words}")


# -- checking against what hosts have -------------------------------------------------------------


def test_each_host_lacking_a_requirement_is_named_with_what_it_has():
    hosts = [host("node1", {"scipy": "1.11.4", "tiny-dep": "1.0"}),
             host("node2", {"scipy": "1.10.1"}),
             host("node3", {"tiny-dep": "0.9"})]
    wanted = [Requirement("scipy>=1.11"), Requirement("Tiny_Dep>=1.0"), Requirement("numpy")]
    assert unmet(wanted, hosts) == {
        "scipy>=1.11": {"node2": "1.10.1 installed", "node3": "not installed"},
        "Tiny_Dep>=1.0": {"node2": "not installed", "node3": "0.9 installed"},
        "numpy": {"node1": "not installed", "node2": "not installed",
                  "node3": "not installed"},
    }


def test_what_hosts_meet_passes():
    hosts = [host("node1", {"scipy": "1.12.0rc1", "numpy": "2.0"}),
             host("node2", {"scipy": "1.11.0", "numpy": "1.26"})]
    wanted = [Requirement("scipy>=1.11"), Requirement("numpy"),
              Requirement("numpy[extra] @ https://example.org/numpy.whl")]
    assert unmet(wanted, hosts) == {}
    check_hosts("job.py", wanted, hosts, "never said")


def test_markers_are_evaluated_with_each_hosts_values():
    wanted = [Requirement('tomli>=2; python_version < "3.11"')]
    old = host("old", {}, python_version="3.10")
    assert unmet(wanted, [host("new", {}), old]) == {
        'tomli>=2; python_version < "3.11"': {"old": "not installed"}}


def test_an_agent_that_reports_no_packages_is_named():
    found = unmet([Requirement("numpy")], [host("node1", None)])
    assert found == {"numpy": {"node1": "its agent reports no packages (an older cluster: run "
                                         "cluster up)"}}


def test_the_refusal_is_one_line_with_exit_code_2():
    with pytest.raises(MissingRequirements) as exc:
        check_hosts("jobs/fit.py", [Requirement("scipy>=1.11")],
                    [host("node2", {"scipy": "1.10.1"}), host("node3", {})],
                    "list it in requirements in hosts.ini and run cluster up")
    assert str(exc.value) == ("jobs/fit.py needs scipy>=1.11 (node2: 1.10.1 installed, node3: "
                              "not installed): list it in requirements in hosts.ini and run "
                              "cluster up")
    assert exc.value.exit_code == ExitCode.USAGE == 2


def test_an_agents_report_travels_through_its_redis_fields():
    here = Installed.here("node1")
    assert here.version("pytest") is not None and here.version("PyTest") == here.version("pytest")
    back = Installed.from_agent({"host": "node1", **here.fields()})
    assert back == here
    assert Installed.from_agent({"host": "old"}).packages is None


# -- hosts.ini and the wheelhouse ------------------------------------------------------------------


INI = "[cluster]\nname = t\nredis = node1\n{}\n\n[host node1]\n"


def test_hosts_ini_lists_requirements_and_local_packages(tmp_path: Path):
    make_project(tmp_path / "pkgs" / "tiny")
    (tmp_path / "pkgs" / "other-1.0-py3-none-any.whl").write_bytes(b"a wheel")
    ini = tmp_path / "hosts.ini"
    ini.write_text(INI.format("requirements =\n    scipy >= 1.11   ; the fit\n    pkgs/tiny\n"
                              "    # a comment line\n    ./pkgs/other-1.0-py3-none-any.whl\n"))
    cfg = load(ini)
    assert cfg.requirements == ("scipy>=1.11",)
    assert cfg.packages == (tmp_path / "pkgs" / "tiny",
                            tmp_path / "pkgs" / "other-1.0-py3-none-any.whl")
    assert load(tmp_path / "hosts.ini").requirements == cfg.requirements
    ini.write_text(INI.format(""))
    assert (load(ini).requirements, load(ini).packages) == ((), ())


@pytest.mark.parametrize("value, words", [
    ("scipy, numpy", "'scipy, numpy' is not a requirement"),
    ("./nowhere", "./nowhere: no such wheel or directory"),
    ("/tmp", "/tmp: neither a wheel nor a project directory"),
])
def test_a_bad_requirement_in_hosts_ini_names_the_line(tmp_path: Path, value: str, words: str):
    ini = tmp_path / "hosts.ini"
    ini.write_text(INI.format(f"requirements =\n    numpy\n    {value}\n"))
    with pytest.raises(ConfigError) as exc:
        load(ini)
    assert str(exc.value).startswith(f"{ini}:4: [cluster] requirements: {words}")


def test_up_builds_local_packages_into_the_wheelhouse_offline(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    """No index: a local project is built here and resolved with cluster's wheels at hand;
    the result is cached by content, and a changed project is a new wheel."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    given = tmp_path / "given"
    make_project(tmp_path / "fake-cluster", name="cluster", version="0.1.0")
    assert wheelhouse._pip("wheel", "--no-deps", "--wheel-dir", str(given),
                           str(tmp_path / "fake-cluster")) is None
    tiny = make_project(tmp_path / "tiny")
    cache = tmp_path / "cache"
    house = wheelhouse.prepare(given, cache, packages=[tiny])
    assert house.installs == ("tinydep==1.0",)
    assert house.local == ("tinydep-1.0-py3-none-any.whl",)
    assert set(house.hashes) == {"cluster-0.1.0-py3-none-any.whl", *house.local}
    assert house.build == wheelhouse.prepare(given).build  # cluster's build, unchanged
    assert house.agent_build == f"{house.build}+{house.requirements_id}"
    again = wheelhouse.prepare(given, cache, packages=[tiny])
    assert again == house and len(list(cache.iterdir())) == 1  # cached
    (tiny / "tinydep.py").write_text("VALUE = 43\n")  # same version, other code
    changed = wheelhouse.prepare(given, cache, packages=[tiny])
    assert changed.path != house.path and changed.requirements_id != house.requirements_id
    assert changed.hashes[house.local[0]] != house.hashes[house.local[0]]
    assert json.loads((changed.path / "requirements.json").read_text())["installs"] \
        == ["tinydep==1.0"]


def test_a_requirement_that_cannot_be_built_fails_up_in_one_line(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    given = tmp_path / "given"
    make_project(tmp_path / "fake-cluster", name="cluster", version="0.1.0")
    wheelhouse._pip("wheel", "--no-deps", "--wheel-dir", str(given),
                    str(tmp_path / "fake-cluster"))
    with pytest.raises(UsageError) as exc:
        wheelhouse.prepare(given, tmp_path / "cache",
                           requirements=["cluster-test-no-such-package>=1"])
    assert str(exc.value).startswith("building the requirements of hosts.ini failed: ")
    assert "\n" not in str(exc.value)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-built is kept


# -- submit ---------------------------------------------------------------------------------------


def test_a_local_cluster_is_not_started_for_a_job_this_environment_cannot_run(tmp_path: Path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    marker = tmp_path / "scattered"
    r = run_cli("submit", NEEDS_TINYDEP, "--param", f"marker={marker}",
                env={"TMPDIR": str(tmp)}, timeout=60)
    assert r.returncode == ExitCode.USAGE, r.stderr
    assert r.stderr == (f"cluster: error: {NEEDS_TINYDEP} needs tinydep>=1.0 (this environment: "
                        f"not installed): install it for {sys.executable} (the local cluster "
                        "runs it)\n")
    assert not marker.exists() and list(tmp.iterdir()) == []  # no local cluster's directory


def test_a_running_cluster_is_checked_through_its_agents_reports(local_cluster: Path,
                                                                 tmp_path: Path):
    creds = Credentials.load(local_cluster)
    broker = Broker.of(creds)
    try:  # submit checks the agents there are: this one may still be starting
        wait_for(broker.live_agent_ids, 30, "the local cluster's agent to register")
    finally:
        broker.close()
    marker = tmp_path / "scattered"
    r = run_cli("submit", NEEDS_TINYDEP, "--credentials", str(local_cluster), "--param",
                f"marker={marker}", timeout=60)
    assert r.returncode == ExitCode.USAGE, r.stderr
    assert "needs tinydep>=1.0 (" in r.stderr and ": not installed): list it in requirements" \
        in r.stderr
    assert len(r.stderr.splitlines()) == 1 and not marker.exists()
    met = tmp_path / "met.py"
    met.write_text((SAMPLES / "tiny.py").read_text() + "REQUIREMENTS = ['numpy>=1.23']\n")
    r = run_cli("submit", str(met), "--credentials", str(local_cluster), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "12"


def test_what_an_agent_reports_installed_reads_as_the_full_metadata_parse_does():
    """``installed_here`` reads only the head of each metadata file; the answer is the one of
    ``importlib.metadata``'s full parse, for every distribution of this interpreter."""
    import importlib.metadata

    from packaging.utils import canonicalize_name

    from cluster.requirements import installed_here

    full: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        if dist.metadata is not None and dist.metadata["Name"]:
            full.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    assert installed_here() == full
    assert full["numpy"] and full["redis"]
