"""What compute writes is captured per unit (print, fds 1 and 2, C stdio, child processes,
logging), kept per job in Redis and shown by `cluster logs`; stdout of submit is the result's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLES, AgentProcess, run_cli
from waiting import wait_for

from cluster.broker import Broker
from cluster.capture import truncated
from cluster.entries import LogRecord
from cluster.errors import ExitCode
from cluster.joblogs import Follower

TALKY = str(SAMPLES / "talky.py")
WAYS = ["print of unit {i}", "fd1 of unit {i}", "C printf of unit {i}", "child of unit {i}",
        "stderr: fd2 of unit {i}", "stderr: stderr print of unit {i}",
        "log: WARNING talky: logging of unit {i}"]


def job_id(stderr: str) -> str:
    found = re.search(r"cluster logs ([0-9a-f]+)", stderr)
    assert found, stderr
    return found.group(1)


def lines_of(stdout: str, unit: int) -> list[str]:
    return [line.split("] ", 1)[1] for line in stdout.splitlines()
            if re.match(rf"\[\S+ unit {unit}( attempt \d+)?\]", line)]


@pytest.fixture
def log_dir(tmp_path: Path) -> dict[str, str]:
    return {"CLUSTER_LOG_DIR": str(tmp_path / "logs")}


def test_every_way_of_writing_is_captured_per_unit_and_stdout_is_the_result(
        log_dir: dict[str, str]) -> None:
    r = run_cli("submit", TALKY, "--progress", "none", env=log_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "6"  # 0 + 1 + 2 + 3, and nothing else
    assert "scatter says hello" in r.stderr and "gather says hello" in r.stderr
    assert "importing talky" in r.stderr  # the submitting process imports the job too
    logs = run_cli("logs", job_id(r.stderr), env=log_dir)  # a local run's, kept locally
    assert logs.returncode == 0, logs.stderr
    for i in range(4):
        assert set(lines_of(logs.stdout, i)) - {"import: importing talky"} == \
            {w.format(i=i) for w in WAYS}
    # once per worker process that ran units (a local cluster here has two), not per unit
    assert 1 <= logs.stdout.count("import: importing talky") <= 2
    one = run_cli("logs", job_id(r.stderr), "--unit", "2", env=log_dir)
    assert one.stdout and all(" unit 2]" in line for line in one.stdout.splitlines())


def test_a_failed_unit_shows_what_it_wrote_next_to_its_traceback(log_dir: dict[str, str]
                                                                 ) -> None:
    r = run_cli("submit", TALKY, "--param", "fail=2", "--max-attempts", "1", "--progress",
                "none", env=log_dir)
    assert r.returncode == ExitCode.JOB_FAILED
    assert r.stdout == ""
    # (an "import" block comes first when unit 2 was its worker's first)
    after = r.stderr.split("ValueError: unit 2 fails on purpose\n--- what it wrote (")[1]
    assert "print of unit 2" in after and "fd2 of unit 2" in after
    assert "WARNING talky: logging of unit 2" in after


def test_one_unit_keeps_at_most_its_limit_with_a_marker() -> None:
    assert truncated(b"abcdef", 6, 4) == "abcd\n[... 2 more bytes not kept: the limit is 4 " \
                                         "per unit]\n"
    assert truncated(b"abc", 3, 4) == "abc"


def test_logs_on_a_running_cluster(creds_file: Path, broker: Broker, agent: AgentProcess,
                                   tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    submit = subprocess.Popen(
        [sys.executable, "-m", "cluster", "submit", TALKY, "--credentials", str(creds_file),
         "--progress", "none", "--param", f"gate={gate}", "--param", "big=1",
         "--param", "size=200000", "--logs", "--keep", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        jid = wait_for(lambda: next(iter(broker.client.smembers(broker.keys.jobs)), None), 30,
                       "the job to be registered").decode()
        wait_for(lambda: broker.logs_exist(jid), 30, "unit 0 to write its output")
        follow = subprocess.Popen(
            [sys.executable, "-m", "cluster", "logs", jid, "--follow", "--credentials",
             str(creds_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        gate.write_text("go")
        out, err = submit.communicate(timeout=60)
        followed, _ = follow.communicate(timeout=60)
    finally:
        submit.kill()
    assert submit.returncode == 0, err
    assert out.strip() == "6"
    for i in range(4):  # --logs streamed them, prefixed; --follow saw all of them and ended
        assert f"unit {i}] print of unit {i}" in err
        assert f"unit {i}] print of unit {i}" in followed
    assert follow.returncode == 0
    big = [line for line in lines_of(followed, 1) if line.startswith("xxx")]
    assert len(big) == 1 and len(big[0]) == 64 * 1024 - len("print of unit 1\nfd1 of unit 1\n"
                                                            "C printf of unit 1\nchild of unit "
                                                            "1\n")
    assert "more bytes not kept: the limit is 65536 per unit" in followed
    ttl = broker.client.pttl(broker.keys.logs(jid))
    assert 0 < ttl <= 1800_000  # kept --keep hours after the job ended, its other keys gone
    assert not broker.job_exists(jid)
    host = lines_of(followed, 0) and followed.split("[")[1].split()[0]
    by_host = run_cli("logs", jid, "--host", host, "--credentials", str(creds_file))
    assert by_host.stdout == followed
    assert run_cli("logs", jid, "--host", "elsewhere", "--credentials",
                   str(creds_file)).stdout == ""
    failed = run_cli("logs", jid, "--failed", "--credentials", str(creds_file))
    assert failed.returncode == 0 and failed.stdout == ""


def test_the_job_bound_drops_and_counts_what_is_over(creds_file: Path, agent: AgentProcess
                                                     ) -> None:
    r = run_cli("submit", TALKY, "--credentials", str(creds_file), "--progress", "none",
                "--param", "units=8", "--max-log-size", "0.0015")
    assert r.returncode == 0, r.stderr
    dropped = re.search(r"(\d+) log records dropped \(over --max-log-size\)", r.stderr)
    assert dropped and 0 < int(dropped.group(1)) < 8, r.stderr


def test_a_record_written_twice_by_a_retried_commit_is_read_once(broker: Broker) -> None:
    jid = "retried"
    broker.create_job(jid, {"owner": "o"})
    record = LogRecord(3, 1, "h/1/cpu0.1", 1.0, "ok", {"stdout": "once\n"}).to_json()
    for _ in range(2):  # what a commit retried after a lost reply writes
        broker._log(keys=[broker.keys.job(jid), broker.keys.stats(jid), broker.keys.logs(jid)],
                    args=[1000, record])
    assert [r.streams for r in Follower(broker, jid).poll()] == [{"stdout": "once\n"}]


def test_logs_of_an_unknown_job_are_a_one_line_error(log_dir: dict[str, str],
                                                     creds_file: Path) -> None:
    r = run_cli("logs", "0123456789ab", env=log_dir)
    assert r.returncode == ExitCode.USAGE and r.stderr.count("\n") == 1
    assert "no logs of a local run on this machine" in r.stderr
    r = run_cli("logs", "0123456789ab", "--credentials", str(creds_file))
    assert r.returncode == ExitCode.USAGE and "no logs in Redis" in r.stderr
