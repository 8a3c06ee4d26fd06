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
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import redis
from conftest import ROOT, SAMPLES, AgentProcess, need, wait_until_answering
from waiting import wait_for

from cluster.credentials import Credentials
from cluster.local import free_port

pytestmark = pytest.mark.slow
JOB = str(SAMPLES / "recovery.py")
# A lease that does not lapse while a worker lives, even on a machine too busy to renew it for a
# few seconds: only a reissue runs a unit twice, and these tests count runs. The paused worker's
# test wants its lease to lapse, soon.
LEASE = 30.0
SHORT_LEASE = 2.0


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
        """A new client: close it (``with aof.client() as client``)."""
        return redis.Redis(port=self.port, password=self.password)

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, str(self.conf)])
        wait_until_answering(self.proc, self.port, self.password)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def crash_back_to(self, snapshot: Path) -> None:
        """SIGKILL, then start again from ``snapshot`` (an RDB dump) alone: Redis comes back
        without the writes it confirmed after the dump, as after a power cut that lost them."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.dir / "appendonlydir", ignore_errors=True)
        shutil.copy(snapshot, self.dir / "dump.rdb")
        self.conf.write_text(self.conf.read_text().replace("appendonly yes", "appendonly no"))
        self.start()


@pytest.fixture
def aof(tmp_path: Path) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path)
    yield server
    server.stop()


class Cluster(NamedTuple):
    creds: Path
    aof: AofRedis
    agent: AgentProcess


@pytest.fixture
def cluster(aof: AofRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """Credentials file for the AOF Redis, with a real agent (2 workers) on it."""
    path = tmp_path / "credentials.json"
    Credentials(f"redis://127.0.0.1:{aof.port}/0", aof.password, secrets.token_bytes(32),
                "r:").dump(path)
    monkeypatch.setenv("CLUSTER_JOURNAL", str(tmp_path / "journal.jsonl"))
    agent = AgentProcess(path, cores=min(2, os.cpu_count() or 1), extra=("--redis-grace", "60"))
    yield Cluster(path, aof, agent)
    agent.stop()


def submit(creds: Path, tmp_path: Path, *args: str, name: str = "out",
           lease: float = LEASE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cluster", "submit", JOB, "--credentials", str(creds),
         "--output", str(tmp_path / f"{name}.json"), "--progress", "none",
         "--lease", str(lease), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=ROOT, env={**os.environ})


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a submit, and close its pipes."""
    proc.kill()
    proc.communicate(timeout=30)


def finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise AssertionError(f"submit did not return within {timeout:g} s") from None
    return proc.returncode, err


def started(log: Path) -> list[int]:
    """The index of each unit start, in the order the units started."""
    if not log.exists():
        return []
    return [int(line.split()[0]) for line in log.read_text().splitlines() if line]


def pid_of(log: Path, index: int) -> int | None:
    """The worker that started unit ``index`` first, once it has."""
    lines = log.read_text().splitlines() if log.exists() else []
    return next((int(pid) for i, pid in map(str.split, lines) if int(i) == index), None)


def starts(log: Path) -> Counter[int]:
    return Counter(started(log))


def wait_for_starts(log: Path, count: int) -> None:
    wait_for(lambda: len(started(log)) >= count, 60, f"{count} unit starts in {log.name}")


def recorded_units(aof: AofRedis, jid: str) -> set[int]:
    """The units whose result Redis has recorded for a job (its ``recorded`` bitmap)."""
    with aof.client() as client:
        bits = client.get(f"r:job:{jid}:recorded") or b""
    return {8 * i + b for i, byte in enumerate(bits) for b in range(8) if byte & (0x80 >> b)}


def not_gathered(aof: AofRedis, jid: str) -> set[int]:
    """The units whose recorded result is still in Redis (a coordinator has not gathered it)."""
    with aof.client() as client:
        entries = client.xrange(f"r:job:{jid}:results")
    return {int(k) for _, fields in entries if b"w" in fields and b"t" in fields
            for k in fields if k not in (b"w", b"t")}


def job_id(tmp_path: Path) -> str:
    return json.loads((tmp_path / "journal.jsonl").read_text().splitlines()[0])["job"]


def assert_clean(aof: AofRedis) -> None:
    """Nothing of the job is left but its logs, which expire --keep hours after it ended."""
    with aof.client() as client:
        logs = client.keys("r:job:*:logs")
        assert set(client.keys("r:job:*")) == set(logs) and client.keys("r:resume:*") == []
        assert all(0 < client.ttl(k) <= 24 * 3600 for k in logs)
        assert client.xpending("r:units", "workers")["pending"] == 0


def output(tmp_path: Path, name: str = "out") -> list:
    return json.loads((tmp_path / f"{name}.json").read_text())


def params(log: Path, units: int = 40, sleep: float = 0.1) -> list[str]:
    return ["--param", f"units={units}", "--param", f"sleep={sleep}", "--param", f"log={log}"]


def test_redis_restarted_mid_job_with_aof(cluster, tmp_path):
    creds, aof, agent = cluster
    log = tmp_path / "starts.log"
    proc = submit(creds, tmp_path, *params(log))
    wait_for_starts(log, 8)
    aof.stop()  # a clean restart: AOF written
    wait_for(lambda: "Redis unreachable" in agent.log.read_text(errors="replace"), 30,
             "the agent to notice that Redis is down")
    aof.start()
    code, err = finish(proc)
    assert code == 0, err
    assert output(tmp_path) == [i * i for i in range(40)]
    assert_clean(aof)


def test_units_redis_lost_with_its_last_writes_are_queued_again(cluster, tmp_path):
    """Redis restarted from an older state (a power cut under appendfsync everysec, a replica
    promoted before it had everything): units it had confirmed queued are gone, with the
    results and recordings that followed. The coordinator notices (Redis's count of queued
    units is behind its own) and queues them again; the output is the fault-free one."""
    creds, aof, agent = cluster
    log = tmp_path / "starts.log"
    proc = submit(creds, tmp_path, *params(log, units=60))
    wait_for_starts(log, 4)
    jid = job_id(tmp_path)
    with aof.client() as client:
        client.save()
        queued = int(client.hget(f"r:job:{jid}", "scattered"))
    shutil.copy(aof.dir / "dump.rdb", tmp_path / "older.rdb")

    def queued_now() -> int:
        with aof.client() as client:
            return int(client.hget(f"r:job:{jid}", "scattered"))

    wait_for(lambda: queued_now() >= queued + 6, 60, "units queued after the snapshot")
    aof.crash_back_to(tmp_path / "older.rdb")
    code, err = finish(proc, timeout=120)
    assert code == 0, err
    assert re.search(r"Redis lost \d+ of the units it had queued", err), err
    assert output(tmp_path) == [i * i for i in range(60)]
    assert_clean(aof)


def test_redis_flushed_mid_job_is_noticed(cluster, tmp_path):
    creds, aof, _ = cluster
    log = tmp_path / "starts.log"
    proc = submit(creds, tmp_path, *params(log))
    wait_for_starts(log, 10)
    with aof.client() as client:
        client.flushall()
    code, err = finish(proc)
    assert code == 0, err
    assert "gone from Redis" in err
    assert output(tmp_path) == [i * i for i in range(40)]
    assert_clean(aof)


def test_coordinator_killed_mid_scatter_then_resumed(cluster, tmp_path):
    creds, aof, _ = cluster
    log = tmp_path / "starts.log"
    proc = submit(creds, tmp_path, *params(log, units=60), "--no-speculate")
    wait_for_starts(log, 10)
    kill(proc)
    jid = job_id(tmp_path)
    with aof.client() as client:
        assert client.hget(f"r:job:{jid}", "total") is None  # scatter was not finished
    recorded = recorded_units(aof, jid)  # each of these started before ...
    before = len(started(log))  # ... this count was taken
    waiting = not_gathered(aof, jid)  # recorded, still in Redis: not gathered
    assert recorded, "no unit was recorded before the kill"
    code, err = finish(submit(creds, tmp_path, *params(log, units=60), "--no-speculate",
                              "--resume", jid))
    assert code == 0, err
    assert output(tmp_path) == [i * i for i in range(60)]
    # results leave Redis once gathered: those the killed coordinator had gathered died with
    # it and were computed once more; no other unit recorded before the kill was
    again = recorded & set(started(log)[before:])
    assert not again & waiting, f"computed again: {sorted(again & waiting)}"
    assert max(starts(log).values()) <= 2
    assert_clean(aof)


def test_coordinator_killed_mid_gather_then_the_same_command_resumes(cluster, tmp_path):
    creds, aof, _ = cluster
    log, marker = tmp_path / "starts.log", tmp_path / "gathering"
    args = [*params(log, units=20), "--param", f"gather_marker={marker}",
            "--param", "gather_sleep=3", "--no-speculate"]
    proc = submit(creds, tmp_path, *args)
    # every result is recorded and gather() runs, for 3 s: far longer than this wait's poll
    wait_for(marker.exists, 60, "gather() to run")
    kill(proc)
    before = started(log)
    code, err = finish(submit(creds, tmp_path, *args))  # the same command again (cron)
    assert code == 0, err
    assert output(tmp_path) == [i * i for i in range(20)]
    # every result had been gathered (and so had left Redis) by the killed coordinator: each
    # unit was computed once more, and only once
    assert sorted(started(log)[len(before):]) == list(range(20))
    events = [json.loads(line)["event"] for line in
              (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert events == ["started", "resumed", "finished"]
    assert_clean(aof)


def test_a_second_coordinator_fences_the_first(cluster, tmp_path):
    creds, aof, _ = cluster
    log, release = tmp_path / "starts.log", tmp_path / "release"
    args = [*params(log, units=40, sleep=0.05), "--param", "hold=5", "--param",
            f"release={release}", "--no-speculate"]
    first = submit(creds, tmp_path, *args, name="first")
    try:
        wait_for(lambda: 5 in started(log), 60, "the held unit to start")  # first cannot end
        jid = job_id(tmp_path)
        second = submit(creds, tmp_path, *args, "--resume", jid, name="second")
        code, err = finish(first)  # it notices by itself, while the held unit still runs
    finally:
        release.touch()
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
    creds, aof, _ = cluster
    log, release = tmp_path / "starts.log", tmp_path / "release"
    proc = submit(creds, tmp_path, *params(log, units=12, sleep=1.0), "--param", "random=true",
                  "--param", "hold=0", "--param", f"release={release}", "--no-speculate",
                  lease=SHORT_LEASE)
    victim = wait_for(lambda: pid_of(log, 0), 60, "unit 0 to start")
    os.kill(victim, signal.SIGSTOP)  # surely mid-unit: unit 0 waits for the release
    release.touch()  # for the next attempt; the stopped victim cannot see it yet
    wait_for(lambda: starts(log)[0] >= 2, 60, "unit 0 to be reissued and start again")
    os.kill(victim, signal.SIGCONT)
    code, err = finish(proc)
    assert code == 0, err
    summary = err.strip().splitlines()[-1]
    assert count(r"(\d+) reissued", summary) >= 1
    assert count(r"(\d+) duplicates discarded", summary) >= 1  # the late commit
    assert count(r"(\d+) nondeterministic", summary) >= 1  # random: the late one differed
    assert len(output(tmp_path)) == 12
    assert_clean(aof)


def test_a_straggler_gets_a_speculative_copy(cluster, tmp_path):
    creds, aof, _ = cluster
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
    creds, aof, _ = cluster
    log = tmp_path / "starts.log"
    code, err = finish(submit(creds, tmp_path, *params(log, units=8, sleep=0.01),
                              "--param", "fail=3", "--max-failed", "1", "--max-attempts", "2"))
    assert code == 5, err
    assert "1 failed (units 3)" in err
    assert output(tmp_path) == [None if i == 3 else i * i for i in range(8)]
    assert starts(log)[3] == 2  # two attempts, then recorded as failed
    assert_clean(aof)
