"""Bad input, end to end: each case runs ``python -m cluster submit`` as a user would and checks
the exit code, a one-line ``cluster: error: ...`` message naming the culprit, and that no
traceback of our own code reaches the user (a job's own traceback is shown on purpose when its
code fails).

Sample job files live in ``tests/jobs/``. Tests that need a working cluster submit to the
session's ``local_cluster``; tests that need their own key prefix use ``agent`` + ``creds_file``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import pytest
from conftest import JOBS, SAMPLES, run_cli, tagged_processes

import cluster
from cluster.broker import Broker
from cluster.credentials import Credentials
from cluster.errors import ExitCode
from cluster.local import free_port

PACKAGE = Path(cluster.__file__).resolve().parent
TRACEBACK = "Traceback (most recent call last)"
FRAME = re.compile(r'^\s*File "([^"]+)", line \d+', re.MULTILINE)


def job(name: str) -> str:
    return str(SAMPLES / f"{name}.py")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever the developer's shell exports, these tests name Redis themselves, and the key
    file is never ~/.config/cluster/key."""
    for name in ("CLUSTER_REDIS_URL", "CLUSTER_REDIS_PASSWORD", "CLUSTER_PREFIX",
                 "CLUSTER_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLUSTER_KEY_FILE", str(tmp_path / "key"))


# -- checks ---------------------------------------------------------------------------------


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``cluster: error:`` line of stderr."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("cluster: error:")]
    assert len(lines) == 1, f"expected one error line in stderr:\n{result.stderr}"
    return lines[0]


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert TRACEBACK not in result.stderr, result.stderr
    assert not FRAME.search(result.stderr), result.stderr


def assert_only_job_traceback(result: subprocess.CompletedProcess[str], job_file: str) -> None:
    """Exactly one traceback, and every frame in it is the job file's, none of ours."""
    stderr = result.stderr
    assert stderr.count(TRACEBACK) == 1, stderr
    frames = FRAME.findall(stderr)
    assert frames, stderr
    for frame in frames:
        assert Path(frame).name == Path(job_file).name, f"frame {frame} in:\n{stderr}"
        assert PACKAGE not in Path(frame).resolve().parents, f"our frame {frame} in:\n{stderr}"


def failed(result: subprocess.CompletedProcess[str], code: ExitCode) -> str:
    """Assert the exit code and return the error line."""
    assert result.returncode == code, (
        f"exit {result.returncode}, expected {int(code)}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}")
    return error_line(result)


# -- the job file ---------------------------------------------------------------------------


def test_missing_job_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "no_such_job.py")
    result = run_cli("submit", missing)
    line = failed(result, ExitCode.USAGE)
    assert missing in line and "no such job file" in line
    assert_no_traceback(result)


def test_job_file_with_a_syntax_error() -> None:
    result = run_cli("submit", job("syntax_error"))
    line = failed(result, ExitCode.USAGE)
    assert f"{job('syntax_error')}:6:" in line and "syntax error" in line
    assert_no_traceback(result)


def test_job_file_with_an_import_error() -> None:
    result = run_cli("submit", job("import_error"))
    line = failed(result, ExitCode.USAGE)
    assert job("import_error") in line and "no_such_module_xyz" in line
    # the job's own import line is shown, nothing of ours
    assert_only_job_traceback(result, job("import_error"))
    assert "import no_such_module_xyz" in result.stderr


@pytest.mark.parametrize("missing", ["scatter", "compute", "gather"])
def test_job_file_missing_a_function(missing: str) -> None:
    path = job(f"missing_{missing}")
    result = run_cli("submit", path)
    line = failed(result, ExitCode.USAGE)
    assert path in line and f"{missing}()" in line
    for present in {"scatter", "compute", "gather"} - {missing}:
        assert f"{present}()" not in line
    assert_no_traceback(result)


# -- the job's code fails -------------------------------------------------------------------


def test_compute_raising_on_one_unit(local_cluster: Path, tmp_path: Path) -> None:
    # Submitted from another directory through a relative path, as from another host: the
    # workers' current directory has no such file, yet the traceback must show the job's line.
    shutil.copy(job("compute_raises"), tmp_path / "compute_raises.py")
    attempts = tmp_path / "attempts.log"
    result = run_cli("submit", "compute_raises.py", "--credentials", str(local_cluster),
                     "--param", f"log={attempts}", "--param", "fail=3", "--max-attempts", "2",
                     cwd=tmp_path)
    line = failed(result, ExitCode.JOB_FAILED)
    assert "unit 3 " in line and "2 attempt(s)" in line and "ValueError" in line
    assert_only_job_traceback(result, "compute_raises.py")
    assert "in compute" in result.stderr
    assert "raise ValueError(f\"unit {unit['i']} is bad on purpose\")" in result.stderr
    tries = Counter(int(text) for text in attempts.read_text().split())
    assert tries[3] == 2, tries


@pytest.mark.parametrize("kind, named", [("set", "set"), ("object", "dtype object"),
                                         ("intkey", "dict key 7 (int) at ['counts']")])
def test_result_that_cannot_be_encoded(local_cluster: Path, kind: str, named: str) -> None:
    result = run_cli("submit", job("unencodable"), "--credentials", str(local_cluster),
                     "--param", f"kind={kind}", "--param", "bad=2")
    line = failed(result, ExitCode.JOB_FAILED)
    assert "unit 2 " in line and "compute() returned" in line and named in line
    assert_no_traceback(result)


@pytest.mark.parametrize("where, function", [("scatter", "scatter"),
                                             ("scatter-lazy", "_lazy_units"),
                                             ("gather", "gather")])
def test_scatter_or_gather_raising(local_cluster: Path, where: str, function: str) -> None:
    result = run_cli("submit", job("job_raises"), "--credentials", str(local_cluster),
                     "--param", f"where={where}")
    line = failed(result, ExitCode.JOB_FAILED)
    stage = "gather()" if where == "gather" else "scatter()"
    assert f"{stage} raised ValueError" in line
    assert_only_job_traceback(result, job("job_raises"))
    assert f"in {function}" in result.stderr
    assert result.stdout == ""


# -- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize("param, named", [
    ("units", "expected key=value"),
    ("=4", "expected key=value"),
    ("nosuch=1", "no parameter 'nosuch'"),
])
def test_bad_param(param: str, named: str) -> None:
    # Nothing is listening there: a bad --param must be refused before any connection.
    result = run_cli("submit", job("tiny"), "--param", param,
                     "--redis", f"redis://127.0.0.1:{free_port()}/0")
    line = failed(result, ExitCode.USAGE)
    assert f"--param {param!r}" in line and named in line
    assert_no_traceback(result)


@pytest.mark.parametrize("flag, value, accepted", [
    ("--timeout", "0", "a number of seconds above 0"),
    ("--timeout", "inf", "a number of seconds above 0"),
    ("--worker-timeout", "0", "a number of seconds from 0.1 to"),
    ("--max-attempts", "0", "a whole number from 1 to 1000"),
    ("--max-attempts", "2.5", "a whole number from 1 to 1000"),
    ("--max-failed", "-1", "a whole number of at least 0"),
    ("--lease", "0", "a number of seconds from 0.1 to 3600"),
    ("--redis-grace", "-5", "a number of seconds from 0 to"),
    ("--keep", "0", "a number of hours from 0.001 to"),
    ("--keep", "nan", "a number of hours from 0.001 to"),
    ("--cores", "0", "a whole number from 1 to"),
    ("--seed", "-1", "a whole number of at least 0"),
    ("--max-result-size", "0", "a number of MB above 0 and at most 512"),
    ("--max-result-size", "600", "a number of MB above 0 and at most 512"),
])
def test_submit_numbers_out_of_range(flag: str, value: str, accepted: str) -> None:
    # Nothing is listening there: a bad number must be refused before any connection.
    result = run_cli("submit", job("tiny"), flag, value,
                     "--redis", f"redis://127.0.0.1:{free_port()}/0", timeout=20)
    line = failed(result, ExitCode.USAGE)
    assert f"argument {flag}: " in line and value in line and f" is not {accepted}" in line
    assert_no_traceback(result)


@pytest.mark.parametrize("flag, value, accepted", [
    ("--heartbeat", "0", "a number of seconds from 0.01 to 60"),
    ("--redis-grace", "-1", "a number of seconds from 0 to"),
    ("--threads", "0", "a whole number from 1 to 1024"),
    ("--cores", "-2", "a whole number from 1 to"),
])
def test_agent_numbers_out_of_range(flag: str, value: str, accepted: str) -> None:
    result = run_cli("agent", flag, value, "--redis", f"redis://127.0.0.1:{free_port()}/0",
                     timeout=20)
    line = failed(result, ExitCode.USAGE)
    assert f"argument {flag}: {value} is not {accepted}" in line
    assert_no_traceback(result)


def test_a_lease_of_two_heartbeats_or_less_is_refused(tmp_path: Path) -> None:
    # on a local cluster, whose agent beats every 0.5 s
    result = run_cli("submit", job("tiny"), "--lease", "1", timeout=20)
    line = failed(result, ExitCode.USAGE)
    assert "--lease 1 must be more than twice the heartbeat (0.5 s)" in line
    # on a cluster of hosts.ini, whose heartbeat is known (no credentials needed to refuse it)
    ini = tmp_path / "hosts.ini"
    ini.write_text("[cluster]\nredis = a\nheartbeat = 2\nlease = 5\n"
                   f"state_dir = {tmp_path}\n[host a]\n")
    unused = Credentials(f"redis://127.0.0.1:{free_port()}/0", "pw", b"k")
    unused.dump(tmp_path / "credentials.json")  # as up leaves it; nothing listens there
    result = run_cli("submit", job("tiny"), "--hosts", str(ini), "--lease", "4", timeout=20)
    line = failed(result, ExitCode.USAGE)
    assert "--lease 4 must be more than twice the heartbeat (2 s)" in line
    assert f"(heartbeat of {ini})" in line


def test_cores_beyond_this_machine_or_on_a_running_cluster(local_cluster: Path) -> None:
    result = run_cli("submit", job("tiny"), "--cores", "4096", timeout=20)
    assert "--cores 4096: this host has" in failed(result, ExitCode.USAGE)
    result = run_cli("submit", job("tiny"), "--cores", "1", "--credentials",
                     str(local_cluster), timeout=20)
    assert "--cores 1: only for a private local cluster" in failed(result, ExitCode.USAGE)


def test_a_bad_number_in_hosts_ini_names_file_line_and_key(tmp_path: Path) -> None:
    ini = tmp_path / "hosts.ini"
    ini.write_text("[cluster]\nredis = a\nconnect_timeout = 0\n[host a]\n")
    for command in ("up", "doctor", "down", "status"):
        result = run_cli(command, str(ini), timeout=20)
        line = failed(result, ExitCode.USAGE)
        assert f"{ini}:3: [cluster] connect_timeout: 0 is not a number of seconds" in line


def test_output_with_an_unknown_extension(local_cluster: Path, tmp_path: Path) -> None:
    marker = tmp_path / "scatter-ran"
    out = tmp_path / "result.txt"
    result = run_cli("submit", job("tiny"), "--credentials", str(local_cluster),
                     "--param", f"marker={marker}", "--output", str(out))
    line = failed(result, ExitCode.USAGE)
    assert f"--output {out}" in line and ".txt" in line
    assert_no_traceback(result)
    assert not marker.exists(), "the job ran before --output was checked"
    assert not out.exists() and not Path(f"{out}.json").exists()


# -- the infrastructure ---------------------------------------------------------------------


def test_redis_unreachable() -> None:
    port = free_port()
    result = run_cli("submit", job("tiny"), "--redis", f"redis://127.0.0.1:{port}/0",
                     "--redis-grace", "1")
    line = failed(result, ExitCode.INFRA)
    assert f"127.0.0.1:{port}" in line and "unreachable" in line
    assert_no_traceback(result)


def test_wrong_redis_password(redis_server: tuple[str, str]) -> None:
    url, password = redis_server
    wrong = "wrong-7f3a9c"
    result = run_cli("submit", job("tiny"), "--redis", url,
                     env={"CLUSTER_REDIS_PASSWORD": wrong})
    line = failed(result, ExitCode.INFRA)
    host_port = url.removeprefix("redis://").split("/")[0]
    assert host_port in line and "password" in line
    assert wrong not in result.stderr and password not in result.stderr  # never echo one
    assert_no_traceback(result)


def test_a_bad_redis_url_is_named_without_its_password() -> None:
    result = run_cli("submit", job("tiny"), "--redis", "http://:S3cret-9d@example:6379/0")
    line = failed(result, ExitCode.USAGE)
    assert "bad Redis URL 'http://example:6379/0'" in line
    assert "S3cret" not in result.stderr


def test_no_worker_appears(redis_server: tuple[str, str]) -> None:
    url, password = redis_server
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    result = run_cli("submit", job("tiny"), "--redis", url, "--worker-timeout", "1",
                     env={"CLUSTER_REDIS_PASSWORD": password, "CLUSTER_PREFIX": prefix})
    line = failed(result, ExitCode.INFRA)
    assert "no worker" in line and "1 s" in line
    assert_no_traceback(result)
    broker = Broker.connect(url, password, prefix=prefix)
    try:
        assert broker.client.keys(f"{prefix}job*") == []  # the abandoned job was removed
    finally:
        broker.close()


def test_timeout_with_an_agent(agent: object, creds_file: Path, broker: Broker) -> None:
    result = run_cli("submit", job("sleepy"), "--credentials", str(creds_file),
                     "--timeout", "1", "--param", "sleep=4", "--param", "units=6")
    line = failed(result, ExitCode.TIMEOUT)
    assert "did not finish within 1 s" in line
    assert_no_traceback(result)
    # nothing of the job is left to run: its keys are gone and no unit is queued
    client, keys = broker.client, broker.keys
    assert client.smembers(keys.jobs) == set()
    assert client.keys(f"{keys.prefix}job*") == []
    assert client.xlen(keys.units) == 0


def run_tagged(*args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the CLI on the local default; return its result and the processes it left behind."""
    tag = uuid.uuid4().hex
    result = run_cli(*args, env={"CLUSTER_TEST_TAG": tag})
    return result, tagged_processes(tag)


def test_timeout_on_the_local_default_leaves_nothing_running() -> None:
    result, left = run_tagged("submit", job("sleepy"), "--timeout", "1", "--cores", "2",
                              "--param", "sleep=3")
    line = failed(result, ExitCode.TIMEOUT)
    assert "did not finish within 1 s" in line
    assert_no_traceback(result)
    assert left == []


def test_timeout_on_the_local_default_abandons_running_units(tmp_path: Path) -> None:
    # The timeout counts from the submit's start, so it includes starting a fresh local cluster
    # (Redis, an agent, workers importing numpy), which takes seconds on a busy 2-core machine;
    # every unit outlasts the timeout by far, so none can end before it.
    log = tmp_path / "units.log"
    result, left = run_tagged("submit", job("sleepy"), "--timeout", "10", "--cores", "2",
                              "--param", "sleep=60", "--param", f"log={log}")
    assert result.returncode == ExitCode.TIMEOUT, result.stderr
    assert left == []
    events = log.read_text().split("\n") if log.exists() else []
    assert any(e.startswith("start") for e in events), "no unit started within 10 s"
    finished = [e for e in events if e.startswith("end")]
    assert finished == [], f"units ran on to completion after the job was abandoned: {finished}"


# -- and when all is well -------------------------------------------------------------------


def test_monte_carlo_pi_on_the_local_default() -> None:
    result, left = run_tagged("submit", str(JOBS / "monte_carlo_pi.py"))
    assert result.returncode == ExitCode.OK, result.stderr
    assert abs(float(result.stdout.strip()) - 3.141592653589793) < 0.01, result.stdout
    assert TRACEBACK not in result.stderr
    assert left == []
