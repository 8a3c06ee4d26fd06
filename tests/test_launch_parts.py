"""Parts of `up`, `down`, `status` and `doctor` that need no SSH, against real Redis servers and
real agents: the broker's launcher/status calls and their errors, an agent replacing a lost
one of its host, the limits of a local cluster's Redis, Redis sizing, and wheel identity."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AgentProcess, need, run_cli

from cluster import redisconf, wheelhouse
from cluster.broker import Broker
from cluster.errors import ExitCode, RedisUnavailable
from cluster.local import LocalCluster, free_port
from cluster.redisconf import Limits

# -- a Redis of one's own, to break --------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of this test's own (no password, loopback): (process, url)."""
    binary = need("redis-server")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            Broker.connect(url).close()
            break
        except RedisUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield proc, url
    proc.kill()
    proc.wait()


def test_a_redis_that_dies_is_one_error_naming_it(own_redis):
    proc, url = own_redis
    broker = Broker.connect(url)
    proc.kill()
    proc.wait()
    where = url.removeprefix("redis://").removesuffix("/0")
    for call in (broker.agents_seen, broker.workers_seen, broker.request_shutdown,
                 broker.forget_agents, lambda: broker.server_config("maxclients")):
        with pytest.raises(RedisUnavailable, match=f"Redis at {where} is unreachable"):
            call()


def test_status_on_a_broken_redis_is_one_line_and_exit_3(own_redis, tmp_path):
    _, url = own_redis
    broker = Broker.connect(url, prefix="broken:")
    broker.client.set(broker.keys.agents, "not a sorted set")
    result = run_cli("status", "--redis", url, env={"CLUSTER_PREFIX": "broken:",
                                                    "CLUSTER_KEY_FILE": str(tmp_path / "key")},
                     timeout=20)
    assert result.returncode == ExitCode.INFRA, result.stderr
    where = url.removeprefix("redis://").removesuffix("/0")
    assert result.stderr.startswith(f"cluster: error: Redis at {where} failed: WRONGTYPE")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_status_lists_agents_and_their_workers(broker: Broker, agent: AgentProcess):
    from cluster.status import collect, render

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        agents = collect(broker, lease_ms=5000)
        if agents and len(agents[0].workers) == 2:
            break
        time.sleep(0.1)
    assert [a.state for a in agents] == ["alive"] and len(agents[0].workers) == 2
    assert agents[0].id in render(agents)


# -- an agent that replaces a lost one of its host -------------------------------------------------


def fake_agent(broker: Broker, aid: str, age_ms: int) -> None:
    """An agent entry as a dead agent leaves it: registered, last heard of ``age_ms`` ago."""
    broker.register_agent(aid, {"host": aid.split("/")[0], "pid": aid.split("/")[1]})
    broker.client.zadd(broker.keys.agents, {aid: broker.server_time_ms() - age_ms})


def test_an_agent_retires_lost_agents_of_its_host(broker: Broker, creds_file: Path):
    fake_agent(broker, "hostA/111", 60_000)  # lost in a power cut: replaced
    fake_agent(broker, "hostA/222", 0)  # still heartbeating: another agent, kept
    fake_agent(broker, "hostB/333", 60_000)  # lost, but another host's: kept
    agent = AgentProcess(creds_file, cores=1, extra=("--name", "hostA"))
    try:
        deadline = time.monotonic() + 20
        while "hostA/111" in [a for a, _, _ in broker.agents_seen()]:
            assert time.monotonic() < deadline, agent.stop()
            time.sleep(0.05)
        seen = {a for a, _, _ in broker.agents_seen()}
        assert {"hostA/222", "hostB/333", f"hostA/{agent.proc.pid}"} <= seen
        assert broker.client.exists(broker.keys.agent("hostA/111")) == 0
    finally:
        log = agent.stop()
    assert f"agent hostA/{agent.proc.pid} replaces hostA/111" in log


def test_retiring_is_by_host_and_lease(broker: Broker):
    fake_agent(broker, "h/1", 10_000)
    fake_agent(broker, "h/2", 1_000)
    assert broker.retire_replaced_agents("h/3", "h", lease_ms=5000) == ["h/1"]
    assert broker.retire_replaced_agents("h/3", "h", lease_ms=500) == ["h/2"]
    assert broker.agents_seen() == []


# -- Redis's limits ------------------------------------------------------------------------------


def test_a_local_cluster_sizes_its_redis():
    need("redis-server")
    import psutil

    with LocalCluster(cores=1) as creds:
        broker = Broker.of(creds.as_role("admin"))  # it reads Redis's config
        try:
            limits = Limits.of(broker)
        finally:
            broker.close()
    assert limits.maxclients == redisconf.DEFAULT_MAXCLIENTS  # 1 worker: Redis's default is ample
    assert limits.maxmemory == psutil.virtual_memory().total // 2
    assert limits.policy == "noeviction"


def test_maxclients_can_be_raised_at_run_time(own_redis):
    _, url = own_redis
    broker = Broker.connect(url)
    try:
        assert broker.raise_maxclients(12_345) == 12_345
        assert broker.raise_maxclients(100) == 12_345  # never lowered
    finally:
        broker.close()


def test_redis_is_sized_to_the_cluster():
    assert redisconf.maxclients_for(workers=8, agents=1) == 10_000
    # 155 hosts of 64 cores: past Redis's default of 10,000 clients
    assert redisconf.maxclients_for(workers=155 * 64, agents=155) == 2 * 155 * 65 + 100
    assert redisconf.files_for(20_000) == 20_032
    assert redisconf.limit_lines(10_000, 2**30) == [
        "maxclients 10000", "maxmemory-policy noeviction", f"maxmemory {2**30}"]
    assert Limits(10_000, 0, "noeviction").shortfall(workers=4000, agents=100) is None
    shortfall = Limits(4064, 0, "noeviction").shortfall(workers=2000, agents=100)
    assert shortfall is not None and "Redis accepts 4064 clients" in shortfall
    assert "ulimit -n" in shortfall and str(redisconf.files_for(4300)) in shortfall
    assert str(Limits(10_000, 3 * 2**30, "noeviction")) == \
        "maxclients 10000, maxmemory 3.0 GB, noeviction"


def test_the_file_limit_is_raised_for_redis():
    script = ("import os, resource; from cluster.redisconf import raise_file_limit\n"
              "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
              "raise_file_limit(4096)\n"
              "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard, os.geteuid())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    soft, hard, uid = (int(v) for v in out.split())
    # as far as allowed: to 4096 within the hard limit (or for root), else to the hard limit
    assert soft == (4096 if uid == 0 or hard < 0 or hard >= 4096 else hard)


# -- wheels are identified by content -------------------------------------------------------------


def test_a_given_wheelhouse_is_identified_by_content(tmp_path: Path):
    house = tmp_path / "house"
    house.mkdir()
    wheel = house / "cluster-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"A" * 1000)
    first = wheelhouse.prepare(house)
    wheel.write_bytes(b"B" * 1000)  # same name, same size, other content
    second = wheelhouse.prepare(house)
    assert first.build != second.build
    assert first.hashes[wheel.name] != second.hashes[wheel.name]
    assert second.hashes[wheel.name] == wheelhouse.sha256(wheel)
