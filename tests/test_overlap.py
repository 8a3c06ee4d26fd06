"""--overlap: what a run does when the same job already runs on the cluster (cron firing while
the last run overran). The lock is the live coordinator's heartbeat, so a run whose coordinator
died is resumed, not blocked."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import SAMPLES, AgentProcess
from waiting import wait_for

from cluster.broker import Broker
from cluster.coordinator import Coordinator, RunOptions
from cluster.credentials import Credentials
from cluster.errors import ExitCode, Fenced
from cluster.jobfile import load_job
from cluster.resume import Limits, open_job
from cluster.signing import Keyring

GATED = str(SAMPLES / "gated.py")
STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def no_run_left_behind() -> Iterator[None]:
    """A failing test must not leave its runs (and their local clusters) running."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


class Run:
    """A `cluster submit` of the gated job, as cron would start it."""

    def __init__(self, creds_file: Path, tmp_path: Path, name: str, *extra: str) -> None:
        self.out = tmp_path / f"{name}.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster", "submit", GATED, "--credentials", str(creds_file),
             "--progress", "none", "--param", f"gate={tmp_path / 'gate'}", "--param",
             f"log={tmp_path / 'units.log'}", "-o", str(self.out), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        STARTED.append(self.proc)

    def wait(self) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=90)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode, err


def running(broker: Broker, count: int = 1) -> list[str]:
    def jobs() -> list[str]:
        found = sorted(j.decode() for j in broker.client.smembers(broker.keys.jobs))
        return found if len(found) == count else []
    return wait_for(jobs, 30, f"{count} job(s) running")


def units_started(tmp_path: Path) -> int:
    log = tmp_path / "units.log"
    return len(log.read_text().split()) if log.exists() else 0


def test_forbid_refuses_a_second_run_naming_the_first(creds_file: Path, broker: Broker,
                                                      agent: AgentProcess, tmp_path: Path):
    first = Run(creds_file, tmp_path, "first")
    [jid] = running(broker)
    second = Run(creds_file, tmp_path, "second")
    rc, err = second.wait()
    assert rc == ExitCode.ALREADY_RUNNING, err
    line = err.strip().splitlines()[-1]
    assert re.search(rf"job {jid} \(gated\) is already running on this cluster: started "
                     r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ on \S+ \(pid \d+\)", line), line
    (tmp_path / "gate").touch()
    rc, err = first.wait()
    assert rc == 0, err
    assert json.loads(first.out.read_text()) == 6 and not second.out.exists()


def test_wait_runs_after_the_first_has_finished(creds_file: Path, broker: Broker,
                                                agent: AgentProcess, tmp_path: Path):
    first = Run(creds_file, tmp_path, "first")
    [jid] = running(broker)
    second = Run(creds_file, tmp_path, "second", "--overlap", "wait")
    wait_for(lambda: units_started(tmp_path) >= 2, 30, "the first run's units to start")
    (tmp_path / "gate").touch()
    assert first.wait()[0] == 0
    rc, err = second.wait()
    assert rc == 0, err
    assert json.loads(second.out.read_text()) == 6
    assert units_started(tmp_path) == 8  # the second ran its own job, after the first


def test_replace_cancels_the_first_and_runs(creds_file: Path, broker: Broker,
                                            agent: AgentProcess, tmp_path: Path):
    first = Run(creds_file, tmp_path, "first")
    [jid] = running(broker)
    second = Run(creds_file, tmp_path, "second", "--overlap", "replace")
    rc, err = first.wait()
    assert rc == ExitCode.CANCELLED, err
    assert "replaced by a newer run on" in err and not first.out.exists()
    (tmp_path / "gate").touch()
    rc, err = second.wait()
    assert rc == 0, err
    assert json.loads(second.out.read_text()) == 6


def test_a_run_whose_coordinator_died_is_resumed_not_blocked(creds_file: Path, broker: Broker,
                                                             agent: AgentProcess,
                                                             tmp_path: Path):
    first = Run(creds_file, tmp_path, "first")
    [jid] = running(broker)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.wait()
    (tmp_path / "gate").touch()
    second = Run(creds_file, tmp_path, "second")
    rc, err = second.wait()
    assert rc == 0, err
    assert json.loads(second.out.read_text()) == 6
    assert not broker.client.smembers(broker.keys.jobs)


def test_allow_runs_both_and_a_name_joins_other_params(creds_file: Path, broker: Broker,
                                                       agent: AgentProcess, tmp_path: Path):
    first = Run(creds_file, tmp_path, "first", "--name", "nightly")
    running(broker)
    other = Run(creds_file, tmp_path, "other", "--name", "nightly", "--param", "units=5")
    rc, err = other.wait()  # other params, the same name: the same job for --overlap
    assert rc == ExitCode.ALREADY_RUNNING, err
    both = Run(creds_file, tmp_path, "both", "--name", "nightly", "--overlap", "allow")
    running(broker, 2)
    (tmp_path / "gate").touch()
    assert first.wait()[0] == 0 and both.wait()[0] == 0
    assert json.loads(first.out.read_text()) == json.loads(both.out.read_text()) == 6


# -- private local clusters on one machine ---------------------------------------------------


class LocalRun(Run):
    """A `cluster submit` on the default private local cluster."""

    def __init__(self, tmp_path: Path, name: str, *extra: str) -> None:
        self.out = tmp_path / f"{name}.json"
        (tmp_path / "tmp").mkdir(exist_ok=True)  # local clusters here see these runs' alone
        env = {**os.environ, "CLUSTER_STATE_DIR": str(tmp_path / "state"),
               "TMPDIR": str(tmp_path / "tmp")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster", "submit", GATED, "--progress", "none",
             "--param", f"gate={tmp_path / 'gate'}", "--param", f"log={tmp_path / 'units.log'}",
             "-o", str(self.out), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=env)
        STARTED.append(self.proc)


def test_local_runs_of_one_job_see_each_other(tmp_path: Path):
    first = LocalRun(tmp_path, "first", "--cores", "1")
    wait_for(lambda: units_started(tmp_path) >= 1, 60, "the first run's units to start")
    second = LocalRun(tmp_path, "second")
    rc, err = second.wait()
    assert rc == ExitCode.ALREADY_RUNNING, err
    assert f"runs on this machine's private local cluster: pid {first.proc.pid}" in err
    replacing = LocalRun(tmp_path, "replacing", "--overlap", "replace")
    rc, err = first.wait()
    assert rc == ExitCode.CANCELLED, err
    assert "replaced by a newer run of the same job on this machine" in err
    (tmp_path / "gate").touch()
    rc, err = replacing.wait()
    assert rc == 0, err
    assert json.loads(replacing.out.read_text()) == 6 and not first.out.exists()
    # pinned to the CPU the first run's cluster had held: it was free again
    assert "taken by another private local cluster" not in err


def test_a_second_local_cluster_does_not_pin_onto_taken_cpus(tmp_path: Path):
    cpus = len(os.sched_getaffinity(0))
    first = LocalRun(tmp_path, "first", "--cores", "1")
    wait_for(lambda: units_started(tmp_path) >= 1, 60, "the first run's units to start")
    other = LocalRun(tmp_path, "other", "--overlap", "allow", "--param", "units=2")
    wait_for(lambda: units_started(tmp_path) >= 2, 60, "the other run's units to start")
    (tmp_path / "gate").touch()
    assert first.wait()[0] == 0
    rc, err = other.wait()
    assert rc == 0, err
    first_cpu = "0"
    if cpus > 1:
        assert f"CPUs {first_cpu} are taken by another private local cluster (pid " \
               f"{first.proc.pid}): this one uses CPUs " in err, err
    else:
        assert "every CPU is taken by other private local clusters" in err, err


def test_fresh_removes_a_dead_runs_job_and_still_refuses_a_live_one(creds_file: Path,
                                                                    broker: Broker,
                                                                    agent: AgentProcess,
                                                                    tmp_path: Path):
    first = Run(creds_file, tmp_path, "first")
    [old] = running(broker)
    refused = Run(creds_file, tmp_path, "refused", "--fresh")
    assert refused.wait()[0] == ExitCode.ALREADY_RUNNING
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.wait()
    (tmp_path / "gate").touch()
    second = Run(creds_file, tmp_path, "second", "--fresh")
    rc, err = second.wait()
    assert rc == 0, err
    assert json.loads(second.out.read_text()) == 6
    assert not broker.job_exists(old) and not broker.client.smembers(broker.keys.jobs)


def test_a_retried_takeover_resumes_the_job_it_took(broker: Broker, creds: Credentials,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path):
    """A resuming coordinator takes the job over, and the reply to its first heartbeat on it
    is lost (Redis ran it): its retry must resume that job again, not refuse it as a live run
    nor register a new job over it (what stalled the soak: the old results were then read
    as naming units never scattered, and dropped)."""
    job = load_job(str(SAMPLES / "gated.py"))
    first = open_job(broker, job, {}, 0, jid="aaaaaaaaaaaa", owner="owner-dead",
                     keyring=Keyring(creds.key), limits=Limits(), resume=None, auto=True)
    broker.describe_job(first.jid, {"host": socket.gethostname(), "pid": 2 ** 22 + 1,
                                    "beat": 0})  # its coordinator is gone
    coordinator = Coordinator(broker, job, {}, creds.key, RunOptions(auto_resume=True))
    real_beat, lost = broker.beat, []

    def beat_losing_its_first_reply(jid: str, owner: str) -> str:
        answer = real_beat(jid, owner)
        if not lost:
            lost.append(jid)
            raise redis.ConnectionError("reply lost")
        return answer

    monkeypatch.setattr(broker, "beat", beat_losing_its_first_reply)
    journal = tmp_path / "journal.jsonl"
    monkeypatch.setenv("CLUSTER_JOURNAL", str(journal))
    coordinator.guarded(coordinator.open)
    events = [json.loads(line)["event"] for line in journal.read_text().splitlines()]
    assert events == ["resumed"]  # noted once, when the open went through
    assert lost == [first.jid]
    assert coordinator.jid == first.jid and coordinator.snapshot is not None  # resumed
    assert broker.job_fields(first.jid)["owner"] == coordinator.owner
    assert sorted(j.decode() for j in broker.client.smembers(broker.keys.jobs)) == [first.jid]
    with pytest.raises(Fenced):  # and no job is ever registered over another owner's
        broker.create_job(first.jid, {"owner": "someone-else"})
