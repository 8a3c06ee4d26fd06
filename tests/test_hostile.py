"""Entries a password holder without the cluster key could write into a running job's results
stream (issue 12): malformed ones, and ones naming units that were never scattered, are
rejected, counted and logged; they change no result and crash nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import SAMPLES, AgentProcess
from waiting import wait_for

from cluster import codec
from cluster.broker import Broker


def start_gated(creds_file: Path, broker: Broker, tmp_path: Path, *params: str
                ) -> tuple[subprocess.Popen[str], str]:
    """A submit of the gated job, once its job is registered and a unit has started."""
    gate, log = tmp_path / "gate", tmp_path / "units.log"
    submit = subprocess.Popen(
        [sys.executable, "-m", "cluster", "submit", str(SAMPLES / "gated.py"), "--credentials",
         str(creds_file), "--progress", "none", "--param", f"gate={gate}", "--param",
         f"log={log}", *params], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        jid = wait_for(lambda: next(iter(broker.client.smembers(broker.keys.jobs)), None), 30,
                       "the job to be registered").decode()
        wait_for(lambda: log.exists() and len(log.read_text().split()) >= 1, 30,
                 "a unit to start")
    except BaseException:
        submit.kill()
        raise
    return submit, jid


def test_malformed_and_out_of_range_entries_are_rejected(creds_file: Path, broker: Broker,
                                                         agent: AgentProcess, tmp_path: Path):
    gate = tmp_path / "gate"
    submit, jid = start_gated(creds_file, broker, tmp_path)
    try:
        results = broker.keys.results(jid)
        for fields in (
            {"w": "forger", "t": "0.1", "-1": codec.encode(666)},  # the bitmap's last bit
            {"w": "forger", "t": "0.1", str(10**11): codec.encode(666)},  # a 12.5 GB bitmap
            {"w": "forger"},  # truncated
            {"w": "forger", "t": "soon", "0": codec.encode(1)},  # not a number
            {"f": "1", "e": "not json"},
            {"f": "2", "e": json.dumps(["not", "an", "object"])},
            {"d": "forger", "x": b"12345678"},
        ):
            broker.client.xadd(results, fields)
        gate.touch()
        out, err = submit.communicate(timeout=60)
    finally:
        submit.kill()
    assert submit.returncode == 0, err
    assert json.loads(out) == 6  # 0 + 1 + 2 + 3: nothing forged counted, nothing lost
    assert "7 results entries rejected" in err, err
    assert "rejected: it names unit -1, but units 0 to 3 were scattered" in err
    assert f"rejected: it names unit {10**11}" in err


def test_a_malformed_work_entry_crashes_no_worker_or_agent(creds_file: Path, broker: Broker,
                                                           agent: AgentProcess, tmp_path: Path):
    gate = tmp_path / "gate"
    submit, jid = start_gated(creds_file, broker, tmp_path, "--param", "units=1")
    try:
        for fields in ({"j": jid, "a": "soon", "0": codec.encode({"i": 0})},
                       {"j": jid},
                       {"j": jid, "a": "1", "zero": b"N\x00"},
                       {"j": jid, "a": "1", "1": b"garbage"}):
            last = broker.client.xadd(broker.keys.units, fields)

        def delivered() -> bool:
            [group] = broker.client.xinfo_groups(broker.keys.units)
            done = group["last-delivered-id"]
            return tuple(map(int, done.split(b"-"))) >= tuple(map(int, last.split(b"-")))
        wait_for(delivered, 30, "the workers to read the malformed entries")
        gate.touch()
        out, err = submit.communicate(timeout=60)
    finally:
        submit.kill()
    assert submit.returncode == 0, err
    assert json.loads(out) == 0  # one unit, held by one worker while the other reads these
    assert agent.proc.poll() is None, agent.stop()  # the agent is still there
    told = agent.stop()
    assert "exit code" not in told and "script" not in told, told  # no worker died, no error
    assert told.count("is malformed") >= 3, told
