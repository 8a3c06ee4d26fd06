"""The agent: one pinned worker per CPU, single-threaded numeric libraries, leases on Redis time,
respawn after a death, nothing left after it stops."""

import os
import signal
import time

import psutil
import pytest

from cluster.config import parse_cpus
from cluster.errors import UsageError


def workers_of(agent, count, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(agent.proc.pid).children()
        if len(children) == count:
            return children
        time.sleep(0.05)
    raise AssertionError(f"agent did not start {count} workers")


def test_one_pinned_single_threaded_worker_per_cpu(agent, broker):
    count = min(2, os.cpu_count() or 1)
    children = workers_of(agent, count)
    pins = sorted(tuple(p.cpu_affinity()) for p in children)
    assert pins == [(cpu,) for cpu in range(count)]
    for p in children:
        env = p.environ()
        assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
    deadline = time.monotonic() + 10
    while len(broker.live_workers(2000)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(broker.live_workers(2000)) == count
    assert len(broker.live_agents(2000)) == 1


def test_a_dead_worker_is_replaced(agent, broker):
    first = workers_of(agent, min(2, os.cpu_count() or 1))
    victim = first[0]
    victim.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = psutil.Process(agent.proc.pid).children()
        if len(now) == len(first) and victim.pid not in [p.pid for p in now]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the killed worker was not replaced")
    log = agent.stop()
    assert "killed by SIGKILL" in log


def test_stopping_the_agent_stops_its_workers_and_unregisters(agent, broker):
    children = workers_of(agent, min(2, os.cpu_count() or 1))
    agent.stop()
    assert agent.proc.returncode == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    assert broker.live_agents(60_000) == [] and broker.live_workers(60_000) == []


def test_shutdown_key_stops_every_agent(agent, broker):
    workers_of(agent, min(2, os.cpu_count() or 1))
    broker.client.set(broker.keys.shutdown, 1)
    assert agent.proc.wait(20) == 0


def test_sigkill_of_the_agent_takes_its_workers_along(agent):
    children = workers_of(agent, min(2, os.cpu_count() or 1))
    agent.proc.send_signal(signal.SIGKILL)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def test_cpu_lists():
    assert parse_cpus("0-3,8") == (0, 1, 2, 3, 8)
    for bad in ("", "a", "3-1,1", "1,1"):
        with pytest.raises(UsageError):
            parse_cpus(bad)
