"""Recovery with real processes: Redis restarted (AOF) or flushed mid-job, the coordinator
SIGKILLed mid-scatter and mid-gather then resumed, two coordinators on one job, stragglers,
nondeterministic compute, units failing within a budget.

Every test checks the invariants: the output is the fault-free one, every unit was recorded
once, and nothing of the job is left in Redis.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import ROOT, SAMPLES, AgentProcess, need

from cluster.credentials import Credentials
from cluster.local import free_port

pytestmark = pytest.mark.slow
JOB = str(SAMPLES / "recovery.py")


class AofRedis:
    """A redis-server with AOF persistence that a test may stop, restart or flush."""

    def __init__(self, workdir: Path) -> None:
        self.binary = need("redis-server")
        self.dir = workdir
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        self.conf = workdir / "redis.conf"
        self.conf.write_text(f"bind 127.0.0.1\nport {self.port}\nrequirepass {self.password}\n"
                             f"appendonly yes\nappendfsync always\ndir {workdir}\n"
                             f"logfile {workdir / 'redis.log'}\nsave \"\"\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password)

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, str(self.conf)])
        for _ in range(200):
            try:
                self.client().ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def aof(tmp_path: Path) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def cluster(aof: AofRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[tuple[Path, AofRedis]]:
    """Credentials file for the AOF Redis, with a real agent (2 workers) on it."""
    path = tmp_path / "credentials.json"
    Credentials(f"redis://127.0.0.1:{aof.port}/0", aof.password, secrets.token_bytes(32),
                "r:").dump(path)
    monkeypatch.setenv("CLUSTER_JOURNAL", str(tmp_path / "journal.jsonl"))
    agent = AgentProcess(path, cores=min(2, os.cpu_count() or 1), extra=("--redis-grace", "60"))
    yield path, aof
    agent.stop()


def submit(creds: Path, tmp_path: Path, *args: str, name: str = "out") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cluster", "submit", JOB, "--credentials", str(creds),
         "--output", str(tmp_path / f"{name}.json"), "--progress", "none", "--lease", "2",
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ})


def finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def starts(log: Path) -> Counter[int]:
    if not log.exists():
        return Counter()
    return Counter(int(line.split()[0]) for line in log.read_text().splitlines() if line)


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def assert_clean(aof: AofRedis) -> None:
    client = aof.client()
    assert client.keys("r:job:*") == [] and client.keys("r:resume:*") == []
    assert client.xpending("r:units", "workers")["pending"] == 0


def output(tmp_path: Path, name: str = "out") -> list:
    return json.loads((tmp_path / f"{name}.json").read_text())


def params(log: Path, units: int = 40, sleep: float = 0.1) -> list[str]:
    return ["--param", f"units={units}", "--param", f"sleep={sleep}", "--param", f"log={log}"]


def test_redis_restarted_mid_job_with_aof(cluster, tmp_path):
    creds, aof = cluster
    log = tmp_path / "starts.log"
    proc = submit(creds, tmp_path, *params(log))
    wait_for(lambda: sum(starts(log).values()) >= 8)
    aof.stop()  # a clean restart: AOF written
    time.sleep(1.0)
    aof.start()
    code, err = finish(proc)
    assert code == 0, err
    assert output(tmp_path) == [i * i for i in range(40)]
    assert_clean(aof)


def test_redis_flushed_mid_job_is_noticed(cluster, tmp_path):
    creds, aof = cluster
    log = tmp_path / "starts.log"
    proc = submit(creds, tmp_path, *params(log))
    wait_for(lambda: sum(starts(log).values()) >= 10)
    aof.client().flushall()
    code, err = finish(proc)
    assert code == 0, err
    assert "gone from Redis" in err
    assert output(tmp_path) == [i * i for i in range(40)]
    assert_clean(aof)


def test_coordinator_killed_mid_scatter_then_resumed(cluster, tmp_path):
    creds, aof = cluster
    log = tmp_path / "starts.log"
    proc = submit(creds, tmp_path, *params(log, units=60), "--no-speculate")
    wait_for(lambda: sum(starts(log).values()) >= 10)
    proc.kill()
    proc.wait()
    jid = json.loads((tmp_path / "journal.jsonl").read_text().splitlines()[0])["job"]
    assert aof.client().hget(f"r:job:{jid}", "total") is None  # scatter was not finished
    code, err = finish(submit(creds, tmp_path, *params(log, units=60), "--no-speculate",
                              "--resume", jid))
    assert code == 0, err
    assert output(tmp_path) == [i * i for i in range(60)]
    # results leave Redis once gathered: those the killed coordinator had gathered died with
    # it and were computed once more; nothing else was
    assert set(starts(log).values()) <= {1, 2}
    assert_clean(aof)


def test_coordinator_killed_mid_gather_then_the_same_command_resumes(cluster, tmp_path):
    creds, aof = cluster
    log, marker = tmp_path / "starts.log", tmp_path / "gathering"
    args = [*params(log, units=20), "--param", f"gather_marker={marker}",
            "--param", "gather_sleep=3", "--no-speculate"]
    proc = submit(creds, tmp_path, *args)
    wait_for(marker.exists)  # every result is recorded; gather() is running
    proc.kill()
    proc.wait()
    code, err = finish(submit(creds, tmp_path, *args))  # the same command again (cron)
    assert code == 0, err
    assert output(tmp_path) == [i * i for i in range(20)]
    # every result had been gathered (and so had left Redis) by the killed coordinator
    assert set(starts(log).values()) == {2}
    events = [json.loads(line)["event"] for line in
              (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert events == ["started", "resumed", "finished"]
    assert_clean(aof)


def test_a_second_coordinator_fences_the_first(cluster, tmp_path):
    creds, aof = cluster
    log = tmp_path / "starts.log"
    first = submit(creds, tmp_path, *params(log, units=40, sleep=0.15), "--no-speculate",
                   name="first")
    wait_for(lambda: sum(starts(log).values()) >= 6)
    jid = json.loads((tmp_path / "journal.jsonl").read_text().splitlines()[0])["job"]
    second = submit(creds, tmp_path, *params(log, units=40, sleep=0.15), "--no-speculate",
                    "--resume", jid, name="second")
    code, err = finish(first)
    assert code == 3, err
    assert "taken over by another coordinator" in err
    code, err = finish(second)
    assert code == 0, err
    assert output(tmp_path, "second") == [i * i for i in range(40)]
    assert not (tmp_path / "first.json").exists()
    assert max(starts(log).values()) <= 2  # what the first had gathered is computed again
    assert_clean(aof)


def count(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in {text!r}"
    return int(found.group(1))


def test_a_paused_worker_is_reissued_and_its_late_result_discarded(cluster, tmp_path):
    creds, aof = cluster
    log = tmp_path / "starts.log"
    proc = submit(creds, tmp_path, *params(log, units=12, sleep=1.0), "--param",
                  "random=true", "--no-speculate")
    wait_for(lambda: len(starts(log)) >= 1)
    index, victim = map(int, log.read_text().splitlines()[0].split())
    os.kill(victim, signal.SIGSTOP)  # mid-unit
    time.sleep(4)  # well past the 2 s lease: its unit is reissued elsewhere
    os.kill(victim, signal.SIGCONT)
    code, err = finish(proc)
    assert code == 0, err
    summary = err.strip().splitlines()[-1]
    assert count(r"(\d+) reissued", summary) >= 1
    assert starts(log)[index] == 2  # ran again elsewhere
    assert count(r"(\d+) duplicates discarded", summary) >= 1  # the late commit
    assert count(r"(\d+) nondeterministic", summary) >= 1  # random: the late one differed
    assert len(output(tmp_path)) == 12
    assert_clean(aof)


def test_a_straggler_gets_a_speculative_copy(cluster, tmp_path):
    creds, aof = cluster
    log = tmp_path / "starts.log"
    proc = submit(creds, tmp_path, *params(log, units=10, sleep=0.05), "--param",
                  "straggler=9")
    code, err = finish(proc)
    assert code == 0, err
    assert "1 speculative copies" in err
    assert output(tmp_path) == [i * i for i in range(10)]
    assert starts(log)[9] == 2  # the slow original and its copy; the copy's result won
    assert_clean(aof)


def test_units_failing_within_the_budget(cluster, tmp_path):
    creds, aof = cluster
    log = tmp_path / "starts.log"
    code, err = finish(submit(creds, tmp_path, *params(log, units=8, sleep=0.01),
                              "--param", "fail=3", "--max-failed", "1", "--max-attempts", "2"))
    assert code == 5, err
    assert "1 failed (units 3)" in err
    assert output(tmp_path) == [None if i == 3 else i * i for i in range(8)]
    assert starts(log)[3] == 2  # two attempts, then recorded as failed
    assert_clean(aof)
