"""Agents and workers do not die of one bad moment: Redis refusing writes, a restart backoff
that resets after a healthy period."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
from conftest import AgentProcess
from test_bounds import SmallRedis

from cluster.agent import HEALTHY_S, Agent, AgentSettings
from cluster.broker import Broker
from cluster.credentials import Credentials


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for: {what}")
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path):
    s = SmallRedis(tmp_path, "0")
    yield s
    s.close()


def live_workers(server: SmallRedis) -> int:
    """Workers whose agent renewed their leases within 2 s."""
    now = int(server.client.time()[0] * 1000)
    return sum(server.client.zcard(f"b:agent:{aid.decode()}:workers")
               for aid in server.client.zrangebyscore("b:leases", now - 2000, "+inf"))


def test_an_agent_rides_out_redis_refusing_writes(server: SmallRedis):
    """Redis refusing every write (as with a full disk under its AOF) is an outage: the agent
    and its workers wait for it to end instead of dying at once."""
    agent = AgentProcess(server.creds, cores=2)
    try:
        wait_for(lambda: live_workers(server) == 2, 30, "two live workers")
        workers = psutil.Process(agent.proc.pid).children(recursive=True)
        server.client.config_set("min-replicas-to-write", 1)  # every write: NOREPLICAS
        wait_for(lambda: "refuses writes" in agent.log.read_text(), 30,
                 "the agent to notice that Redis refuses writes")
        assert agent.proc.poll() is None
        assert all(w.is_running() for w in workers)
        server.client.config_set("min-replicas-to-write", 0)
        wait_for(lambda: live_workers(server) == 2, 30, "leases renewed again")
        assert agent.proc.poll() is None
    finally:
        log = agent.stop()
    assert agent.proc.returncode == 0, log


def test_an_agent_stops_when_redis_refuses_writes_past_its_grace(server: SmallRedis):
    agent = AgentProcess(server.creds, cores=1, extra=("--redis-grace", "1"))
    try:
        wait_for(lambda: live_workers(server) == 1, 30, "a live worker")
        server.client.config_set("min-replicas-to-write", 1)
        assert agent.proc.wait(30) == 3
    finally:
        server.client.config_set("min-replicas-to-write", 0)
        agent.stop()


def test_the_restart_backoff_resets_after_a_healthy_period(broker: Broker, creds: Credentials):
    now = [1000.0]
    agent = Agent(broker, creds, AgentSettings(cpus=(0,)), clock=lambda: now[0])
    slot = agent.slots[0]
    slot.started_at = now[0]
    for _ in range(6):
        agent.back_off(slot)
    assert slot.restart_at - now[0] == pytest.approx(0.05 * 2 ** 6)
    slot.started_at = now[0]
    now[0] += HEALTHY_S + 1  # the worker then ran fine for a while before dying
    agent.back_off(slot)
    assert slot.restart_at - now[0] == pytest.approx(0.1)
