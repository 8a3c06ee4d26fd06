"""Resources stay bounded: results leave Redis once gathered, a full Redis loses nothing, a
result over the size cap fails its unit, each job runs in fresh worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import ROOT, SAMPLES, AgentProcess, need, run_cli

from cluster.credentials import Credentials
from cluster.local import free_port


def test_each_job_runs_in_fresh_worker_processes(local_cluster: Path, tmp_path: Path):
    runs = []
    for n in range(2):
        out = tmp_path / f"run{n}.json"
        done = run_cli("submit", str(SAMPLES / "pid_and_state.py"), "--credentials",
                       str(local_cluster), "-o", str(out), "--progress", "none")
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(out.read_text()))
    first, second = ({r["pid"] for r in run} for run in runs)
    assert not first & second  # a worker that ran the first job did not run the second
    assert min(r["seen_before"] for r in runs[1]) == 0


def test_a_result_over_the_size_cap_fails_its_unit(local_cluster: Path):
    done = run_cli("submit", str(SAMPLES / "big_results.py"), "--credentials", str(local_cluster),
                   "-p", "units=2", "-p", "floats=200000", "--max-result-size", "1",
                   "--progress", "none")
    assert done.returncode == 1, done.stderr
    assert "more than the limit of 1 MB (--max-result-size)" in done.stderr
    assert "unit 0" in done.stderr or "unit 1" in done.stderr


class SmallRedis:
    """A private redis-server with a memory limit, and credentials for it."""

    def __init__(self, workdir: Path, maxmemory: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [need("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(workdir), "--maxmemory", maxmemory, "--maxmemory-policy",
             "noeviction", "--requirepass", "pw"], stdout=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, password="pw")
        for _ in range(500):
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                threading.Event().wait(0.02)
        self.creds = workdir / "credentials.json"
        Credentials(f"redis://127.0.0.1:{self.port}/0", "pw", b"k" * 32, prefix="b:").dump(
            self.creds)

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(10)


class PeakMemory(threading.Thread):
    """Samples Redis's used_memory until stopped."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.client, self.peak, self.done = client, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.005):
            info = self.client.info("memory")
            if int(info["used_memory"]) > self.peak:
                self.peak = int(info["used_memory"])
                self.at_peak = {k: int(v) >> 20 for k, v in info.items()
                                if k in ("used_memory_dataset", "mem_clients_normal",
                                         "used_memory_scripts")}


@pytest.fixture
def small_redis(tmp_path: Path, request: pytest.FixtureRequest):
    server = SmallRedis(tmp_path, getattr(request, "param", "0"))
    agent = AgentProcess(server.creds, cores=2)
    yield server
    agent.stop()
    server.close()


def submit(server: SmallRedis, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster", "submit",
                           str(SAMPLES / "big_results.py"), "--credentials", str(server.creds),
                           "--progress", "none", "--timeout", "240", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          stdin=subprocess.DEVNULL)


def test_large_results_leave_redis_as_they_are_gathered(small_redis: SmallRedis):
    idle = int(small_redis.client.info("memory")["used_memory"])
    sampler = PeakMemory(small_redis.client)
    sampler.start()
    done = submit(small_redis, "-p", "units=64")  # 64 results of 8 MB
    sampler.done.set()
    sampler.join()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == list(range(64))
    # Queued ahead: at most 3 units' results (24 MB, plan.INFLIGHT_BYTES), plus what a busy
    # machine adds for a moment: speculative copies' results arriving (deleted as duplicates),
    # and client buffers (two 8 MB commits coming in, one 8 MB result going out). 96 MB holds
    # all of that; keeping the results until the end would take 512 MB.
    assert sampler.peak - idle < 96 << 20, (
        f"peak {(sampler.peak - idle) >> 20} MB above idle: {sampler.at_peak}")


@pytest.mark.parametrize("small_redis", ["40mb"], indirect=True)
def test_a_full_redis_delays_results_but_loses_none(small_redis: SmallRedis):
    done = submit(small_redis, "-p", "units=24")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == list(range(24))


@pytest.mark.parametrize("small_redis", ["40mb"], indirect=True)
def test_a_result_that_never_fits_fails_with_a_reason(small_redis: SmallRedis):
    done = submit(small_redis, "-p", "units=1", "-p", f"floats={6 << 20}", "--redis-grace",
                  "2", "--max-attempts", "1")  # 48 MB: more than Redis may hold
    assert done.returncode == 1, done.stderr
    assert "Redis is out of memory" in done.stderr


def test_an_abandoned_job_leaves_no_key_behind(small_redis: SmallRedis, tmp_path: Path):
    """The coordinator dies; after --keep, every key of its job has expired, also those made
    after it last refreshed their expiry."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster", "submit", str(SAMPLES / "big_results.py"),
         "--credentials", str(small_redis.creds), "--progress", "none", "-p", "units=400",
         "-p", "floats=8192", "--keep", "0.002"],  # 7.2 s
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**__import__("os").environ, "CLUSTER_JOURNAL": str(tmp_path / "journal")})
    client = small_redis.client
    try:
        deadline = time.monotonic() + 60
        while not client.keys("b:job:*:recorded"):
            assert time.monotonic() < deadline, "no result was recorded"
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while client.keys("b:job:*") or client.keys("b:resume:*"):
        left = {k: client.pttl(k) for k in client.keys("b:job:*") + client.keys("b:resume:*")}
        assert time.monotonic() < deadline, f"keys left: {left}"
        assert all(ttl != -1 for ttl in left.values()), f"keys that never expire: {left}"
        time.sleep(0.2)
