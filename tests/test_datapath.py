"""The data path for large results (``spool``, ``dataserver``): a worker writes a large result
into its host's spool, Redis records only a reference, the coordinator takes it from the host's
data server. Real redis-server, real agents and data server processes; the host's death between
record and fetch is a real SIGKILL of its agent with its data server, and the loss of its spool.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, SAMPLES, AgentProcess, need, plain, run_cli
from waiting import wait_for

from cluster import dataserver
from cluster.broker import Broker
from cluster.credentials import Credentials
from cluster.datapath import DataPath
from cluster.local import LocalCluster
from cluster.spool import DIRECT, Spool, default_dir, parse, remove_dead_spools

KEY = secrets.token_bytes(32)

# -- the spool (pure logic on a directory) ---------------------------------------------------


def test_a_spooled_result_is_named_by_its_reference(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "127.0.0.1:4000", 1 << 20)
    ref = spool.put("j1", 3, "tok", [b"x" * 10, memoryview(b"tag")])
    assert ref == DIRECT + b"127.0.0.1:4000/j1.3.tok"
    assert parse(ref) == ("127.0.0.1:4000", "j1.3.tok")
    assert (tmp_path / "j1.3.tok").read_bytes() == b"x" * 10 + b"tag"
    assert (tmp_path / "j1.3.tok").stat().st_mode & 0o777 == 0o600
    spool.remove(ref)
    assert not list(tmp_path.iterdir())


def test_a_full_spool_refuses_a_result_and_writes_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "127.0.0.1:4000", 100)
    assert spool.put("j1", 0, "a", [b"x" * 60]) is not None
    assert spool.put("j1", 1, "b", [b"x" * 60]) is None  # 120 > 100: through Redis instead
    assert [p.name for p in tmp_path.iterdir()] == ["j1.0.a"]


def test_the_sweep_removes_the_results_of_jobs_that_are_gone(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "h:1", 1 << 20)
    for jid in ("live", "gone"):
        spool.put(jid, 0, "t", [b"x"])
    asked: list[list[str]] = []

    def exists(jids: list[str]) -> list[bool]:
        asked.append(jids)
        return [j == "live" for j in jids]

    assert spool.sweep(exists) == 1
    assert asked == [["gone", "live"]]
    assert [p.name for p in tmp_path.iterdir()] == ["live.0.t"]


@pytest.mark.parametrize("ref", [b"D", b"Dhost/j.1.t", b"D:1/j.1", b"Dh:1/", b"D\xff:1/a.b.c"])
def test_a_malformed_reference_is_refused(ref: bytes) -> None:
    with pytest.raises(ValueError):
        parse(ref)


# -- the data server (a real process on loopback) --------------------------------------------


@pytest.fixture
def data_path(tmp_path: Path) -> Iterator[DataPath]:
    settings = SimpleNamespace(spool_dir=str(tmp_path / "spool"), host="h",
                               data_address="127.0.0.1")
    path = DataPath.start(settings, KEY, None)
    yield path
    path.stop()


def test_a_result_is_served_once_then_deleted(data_path: DataPath) -> None:
    ref = data_path.spool.put("j1", 0, "t", [b"result", b"tag"])
    assert ref is not None
    where, name = parse(ref)
    client = dataserver.Client(KEY)
    try:
        assert client.take(where, name) == b"resulttag"
        assert not (data_path.spool.dir / name).exists()
        assert client.take(where, name) is None  # taken: a later ask finds nothing
        big = os.urandom(3 << 20)  # the same connection carries a large one whole
        ref = data_path.spool.put("j1", 1, "t", [big])
        assert ref is not None
        assert client.take(*parse(ref)) == big
    finally:
        client.close()


def test_a_client_without_the_key_gets_nothing(data_path: DataPath) -> None:
    ref = data_path.spool.put("j1", 0, "t", [b"secret"])
    assert ref is not None
    client = dataserver.Client(secrets.token_bytes(32))
    with pytest.raises(dataserver.Unreachable, match="does not hold this cluster's key"):
        client.take(*parse(ref))
    assert (data_path.spool.dir / "j1.0.t").read_bytes() == b"secret"


def test_a_link_in_the_spool_is_not_followed(data_path: DataPath, tmp_path: Path) -> None:
    """Job code may write into the spool and the data server may run as root: a name that
    is a link to another file serves nothing and deletes nothing."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's file")
    (data_path.spool.dir / "j1.0.t").symlink_to(secret)
    client = dataserver.Client(KEY)
    try:
        assert client.take(data_path.spool.where, "j1.0.t") is None
    finally:
        client.close()
    assert secret.read_bytes() == b"root's file"


def test_a_name_outside_the_spool_ends_the_connection(data_path: DataPath, tmp_path: Path
                                                      ) -> None:
    (tmp_path / "outside.0.t").write_bytes(b"not a result")
    client = dataserver.Client(KEY)
    try:
        with pytest.raises(dataserver.Unreachable):
            client.take(data_path.spool.where, "../outside.0.t")
    finally:
        client.close()
    assert (tmp_path / "outside.0.t").exists()


def test_a_dead_data_server_is_unreachable_and_the_agent_starts_it_again(
        data_path: DataPath, broker: Broker) -> None:
    where = data_path.spool.where
    assert data_path.proc is not None
    data_path.proc.kill()
    data_path.proc.wait()
    client = dataserver.Client(KEY)
    with pytest.raises(dataserver.Unreachable):
        client.take(where, "j1.0.t")
    assert where in client.down  # not asked again at once: each result would wait for it
    with pytest.raises(dataserver.Unreachable):
        client.take(where, "j1.0.t")
    data_path.sweep(broker)  # the agent's periodic check: started again, on the same port
    assert data_path.spool.where == where
    ref = data_path.spool.put("j1", 0, "t", [b"again"])
    assert ref is not None
    fresh = dataserver.Client(KEY)
    try:
        assert fresh.take(*parse(ref)) == b"again"
    finally:
        fresh.close()


# -- through a cluster -----------------------------------------------------------------------


def test_large_results_do_not_pass_through_redis(tmp_path: Path) -> None:
    """24 results of 8 MB: exact, and Redis's memory never grew by more than 64 MB."""
    need("redis-server")
    cluster = LocalCluster(claim_cpus=False)
    with cluster as creds:
        admin = Broker.of(creds.as_role("admin"))
        try:
            idle = int(admin.client.info("memory")["used_memory"])
            r = run_cli("submit", str(SAMPLES / "big_results.py"), "--credentials",
                        str(cluster.dir / "credentials.json"), "--print", "json")
            peak = int(admin.client.info("memory")["used_memory_peak"])
        finally:
            admin.close()
        spooled = list(cluster.spool.iterdir())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == list(range(24))
    assert peak - idle < 64 << 20, f"Redis grew by {(peak - idle) >> 20} MB"
    assert spooled == []  # every result taken, and deleted on the way
    assert not cluster.spool.exists()


def test_a_host_lost_between_record_and_fetch_has_its_units_computed_again(
        creds_file: Path, tmp_path: Path, redis_server: tuple[str, str]) -> None:
    """The coordinator is stopped (SIGSTOP) while a host records its units' results in its
    spool; the host then dies (its agent and data server SIGKILLed, its spool gone) before the
    coordinator fetched any. Resumed, the coordinator finds the results unreachable, queues
    their units again, and another host computes them: exact, each recorded once."""
    creds = Credentials.load(creds_file)
    units, gate, started = 4, tmp_path / "gate", tmp_path / "started.log"
    spool = tmp_path / "spool-a"
    host_a = AgentProcess(creds_file, cores=2,
                          extra=("--data-address", "127.0.0.1", "--spool", str(spool)))
    summary = tmp_path / "summary.json"
    submit = subprocess.Popen(
        [sys.executable, "-m", "cluster", "submit", str(SAMPLES / "gated_big.py"),
         "--credentials", str(creds_file), "--param", f"units={units}", "--param",
         f"gate={gate}", "--param", f"log={started}", "--print", "json", "--timeout", "120",
         "--summary-json", str(summary), "--progress", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    host_b = None
    broker = Broker.of(creds)
    try:
        jid = wait_for(lambda: next(iter(broker.client.smembers(f"{creds.prefix}jobs")), None),
                       60, "the job to be registered").decode()
        wait_for(lambda: int(broker.client.hget(broker.keys.job(jid), "scattered") or 0)
                 == units, 60, "every unit to be queued")
        wait_for(lambda: started.exists(), 60, "a unit to start")
        os.killpg(submit.pid, signal.SIGSTOP)
        gate.touch()
        wait_for(lambda: int(broker.client.hget(broker.keys.stats(jid), "recorded") or 0)
                 == units, 60, "every result to be recorded")
        assert len(list(spool.iterdir())) == units  # in the spool, not in Redis
        assert broker.client.hlen(broker.keys.blobs(jid)) == units  # each unit, kept
        host_a.proc.send_signal(signal.SIGKILL)  # the host dies: its memory with it
        os.killpg(host_a.proc.pid, signal.SIGKILL)
        host_a.proc.wait()
        for path in spool.iterdir():
            path.unlink()
        host_b = AgentProcess(creds_file, cores=2)  # no data path: through Redis
        os.killpg(submit.pid, signal.SIGCONT)
        out, err = submit.communicate(timeout=120)
    finally:
        if submit.poll() is None:
            os.killpg(submit.pid, signal.SIGCONT)
            os.killpg(submit.pid, signal.SIGKILL)
            submit.wait()
        broker.close()
        host_a.stop()
        if host_b is not None:
            host_b.stop()
    assert submit.returncode == 0, plain(err.decode())
    assert json.loads(out) == list(range(units))
    counts = json.loads(summary.read_text())["units"]
    assert counts["lost_results"] == units
    assert counts["duplicates"] == 0
    assert f"{units} recorded results lost with their host and computed again" in plain(
        err.decode())


def test_an_agent_removes_the_spools_its_dead_predecessors_left(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    left = default_dir("h-left", int(dead))
    alive = default_dir("h-left", os.getpid())
    other = default_dir("h-left-other", int(dead))
    for path in (left, alive, other):
        path.mkdir()
        (path / "j.0.t").write_bytes(b"x")
    try:
        remove_dead_spools("h-left")
        assert not left.exists()
        assert alive.exists() and other.exists()  # alive, or another host's
    finally:
        for path in (left, alive, other):
            shutil.rmtree(path, ignore_errors=True)


def test_requeue_queues_a_lost_spooled_result_once_and_through_redis(broker: Broker) -> None:
    """RECORD keeps the unit beside a spooled result's reference; REQUEUE clears the recorded
    bit and queues the unit again, marked to go through Redis this time (its host may serve
    nobody), once however often it is called; a reference it does not hold changes nothing."""
    from cluster import codec
    from cluster.entries import Outcome

    jid, owner = "j1", "owner"
    broker.create_job(jid, {"name": "t", "code": b"", "sig": "", "seed": 0,
                            "max_attempts": 2, "owner": owner})
    broker.register_worker("w1", "a1", {"host": "h"})
    unit = codec.encode({"i": 0})
    broker.add_units(jid, owner, [[(0, unit)]])
    work = broker.read_work("w1", 0)
    assert work is not None and work.spool
    ref = DIRECT + b"127.0.0.1:1/j1.0.tok"
    answer = broker.record(work, "w1", 0.0, [Outcome(0, "ok", ref, unit)])
    assert (answer.status, answer.done) == ("RECORDED", 1)
    assert broker.client.getbit(broker.keys.recorded(jid), 0) == 1
    assert not broker.requeue(jid, owner, 0, ref + b"x")  # not what was recorded
    assert broker.requeue(jid, owner, 0, ref)
    assert not broker.requeue(jid, owner, 0, ref)  # a retry after a lost reply: no second copy
    assert broker.client.getbit(broker.keys.recorded(jid), 0) == 0
    again = broker.read_work("w1", 0)
    assert again is not None and again.units == [(0, unit)] and not again.spool
    assert broker.client.hget(broker.keys.stats(jid), "lost_data") == b"1"
    answer = broker.record(again, "w1", 0.0, [Outcome(0, "ok", codec.encode(1), unit)])
    assert (answer.status, answer.done, answer.dups) == ("RECORDED", 1, 0)


def test_a_spool_on_this_machine_is_read_directly(data_path: DataPath, tmp_path: Path) -> None:
    """The coordinator maps a result of a spool on its own machine and deletes it, without
    the data server (stopped here): writable, nothing copied. What is not there, or is a
    link, is asked of the host's data server instead."""
    big = os.urandom(1 << 20)
    ref = data_path.spool.put("j1", 0, "t", [big])
    assert ref is not None
    assert data_path.proc is not None
    data_path.proc.kill()
    data_path.proc.wait()
    where, name = parse(ref)
    client = dataserver.Client(KEY, local=lambda: {where: data_path.spool.dir})
    data = client.take(where, name)
    assert data is not None and bytes(data) == big and not memoryview(data).readonly
    assert not (data_path.spool.dir / name).exists()
    with pytest.raises(dataserver.Unreachable):  # not here (any more): its server is asked
        client.take(where, name)
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's file")
    (data_path.spool.dir / "j1.1.t").symlink_to(secret)
    with pytest.raises(dataserver.Unreachable):  # a link is not read: the server is asked
        client.take(where, "j1.1.t")
    assert secret.read_bytes() == b"root's file"
    assert (data_path.spool.dir / "j1.1.t").is_symlink()
