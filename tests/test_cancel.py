"""`cluster cancel JOB_ID`: from any machine that reaches the cluster's Redis, the coordinator
stops within a second with exit code 8, queued units are dropped, workers abandon the job's
running units without an attempt charged, and nothing of the job is left in Redis but its logs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import SAMPLES, AgentProcess, run_cli
from waiting import wait_for

from cluster.broker import Broker
from cluster.errors import ExitCode


def start_sleepy(creds_file: Path, log: Path, units: int = 20, sleep: float = 60.0
                 ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cluster", "submit", str(SAMPLES / "sleepy.py"), "--credentials",
         str(creds_file), "--progress", "none", "--param", f"units={units}", "--param",
         f"sleep={sleep}", "--param", f"log={log}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def the_job(broker: Broker) -> str:
    jid = wait_for(lambda: next(iter(broker.client.smembers(broker.keys.jobs)), None), 30,
                   "the job to be registered")
    return bytes(jid).decode()


def started(log: Path) -> int:
    return log.read_text().count("start") if log.exists() else 0


def nothing_left(broker: Broker, jid: str) -> None:
    keys = {k.decode() for k in broker.client.keys(f"{broker.keys.prefix}job:{jid}*")}
    assert keys <= {broker.keys.logs(jid)}, keys
    assert broker.client.xlen(broker.keys.units) == 0
    assert broker.client.xpending(broker.keys.units, "workers")["pending"] == 0
    assert not broker.client.smembers(broker.keys.jobs)


def test_a_running_job_is_cancelled_from_another_process(creds_file: Path, broker: Broker,
                                                         agent: AgentProcess,
                                                         tmp_path: Path) -> None:
    log = tmp_path / "units.log"
    submit = start_sleepy(creds_file, log)
    try:
        jid = the_job(broker)
        wait_for(lambda: started(log) >= 2, 30, "both workers to compute a unit")
        r = run_cli("cancel", jid, "--credentials", str(creds_file))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"job {jid} cancelled: stopped by its coordinator"
        out, err = submit.communicate(timeout=30)
    finally:
        os.killpg(submit.pid, signal.SIGKILL) if submit.poll() is None else None
    assert submit.returncode == ExitCode.CANCELLED, err
    assert f"cluster: error: job {jid} was cancelled (cluster cancel on " in err
    assert out == ""
    nothing_left(broker, jid)
    # the workers computing its 60 s units were replaced: the next job runs at once
    r = run_cli("submit", str(SAMPLES / "tiny.py"), "--credentials", str(creds_file),
                "--progress", "none", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "0 reissued" in r.stderr
    assert "replaced: it computed a unit of a job that is gone" in agent.stop()
    shown = run_cli("show", jid, "--credentials", str(creds_file))
    assert "cancelled (exit 8)" in shown.stdout, shown.stdout  # in the cluster's history


def test_a_job_whose_coordinator_died_is_removed_by_cancel(creds_file: Path, broker: Broker,
                                                           agent: AgentProcess,
                                                           tmp_path: Path) -> None:
    log = tmp_path / "units.log"
    submit = start_sleepy(creds_file, log, units=6)
    try:
        jid = the_job(broker)
        wait_for(lambda: started(log) >= 1, 30, "a unit to start")
    finally:
        os.killpg(submit.pid, signal.SIGKILL)
        submit.communicate()
    broker.client.hset(broker.keys.job(jid), "beat", 0)  # its last beat: long ago
    r = run_cli("cancel", jid, "--credentials", str(creds_file))
    assert r.returncode == 0, r.stderr
    assert "removed (its coordinator was gone)" in r.stdout
    nothing_left(broker, jid)
    shown = run_cli("show", jid, "--credentials", str(creds_file))
    assert "cancelled (exit 8)" in shown.stdout, shown.stdout


def test_cancelling_what_is_not_running_is_a_one_line_error(creds_file: Path) -> None:
    r = run_cli("cancel", "0123456789ab", "--credentials", str(creds_file))
    assert r.returncode == ExitCode.USAGE and r.stderr.count("\n") == 1
    assert "job 0123456789ab is not running" in r.stderr
    r = run_cli("cancel", "0123456789ab")
    assert r.returncode == ExitCode.USAGE and "needs --hosts" in r.stderr


def test_a_timed_out_job_leaves_nothing_and_frees_its_workers(creds_file: Path, broker: Broker,
                                                              agent: AgentProcess,
                                                              tmp_path: Path) -> None:
    log = tmp_path / "units.log"
    r = run_cli("submit", str(SAMPLES / "sleepy.py"), "--credentials", str(creds_file),
                "--progress", "none", "--param", "units=6", "--param", "sleep=60", "--param",
                f"log={log}", "--timeout", "3", "-o", str(tmp_path / "out.json"))
    assert r.returncode == ExitCode.TIMEOUT, r.stderr
    assert not (tmp_path / "out.json").exists() and started(log) >= 1
    assert not broker.client.smembers(broker.keys.jobs)
    assert broker.client.xpending(broker.keys.units, "workers")["pending"] == 0
    assert broker.client.xlen(broker.keys.units) == 0
    r = run_cli("submit", str(SAMPLES / "tiny.py"), "--credentials", str(creds_file),
                "--progress", "none", timeout=60)  # its workers were replaced, not waited for
    assert r.returncode == 0, r.stderr
    assert "replaced: it computed a unit of a job that is gone" in agent.stop()
