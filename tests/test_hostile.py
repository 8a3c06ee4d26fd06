"""What a password holder without the cluster key could write into Redis (issue 12): forged,
tampered, replayed and malformed results, failures, units and jobs are rejected (counted and
logged) or dropped; they change no result, run no code and crash nothing."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import SAMPLES, AgentProcess
from waiting import wait_for

from cluster import codec
from cluster.broker import Broker
from cluster.entries import PACKED, pack_results
from cluster.signing import Keyring


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
    # (how many units were scattered by then depends on how fast the workers took them)
    assert re.search(r"rejected: it names unit -1, but units 0 to \d were scattered", err), err
    assert f"rejected: it names unit {10**11}" in err


def test_a_malformed_work_entry_crashes_no_worker_or_agent(creds_file: Path, broker: Broker,
                                                           agent: AgentProcess, tmp_path: Path):
    def add(jid: str, real: tuple[bytes, bytes], own: bytes) -> bytes:
        for fields in ({"j": jid, "a": "soon", "0": codec.encode({"i": 0})},
                       {"j": jid},
                       {"j": jid, "a": "1", "zero": b"N\x00"},
                       {"j": jid, "a": "1", "1": b"garbage"}):
            last = broker.client.xadd(broker.keys.units, fields)
        return last

    told = added_while_held(creds_file, broker, agent, tmp_path, add)
    assert "exit code" not in told and "script" not in told, told  # no worker died, no error
    assert told.count("is malformed") >= 3, told


def test_forged_results_and_failures_change_nothing(creds_file: Path, broker: Broker,
                                                    agent: AgentProcess, tmp_path: Path):
    """The issue's reproduction: the unit's bit set and a result added (the gather printed
    666), a result tagged with another key, and a failure whose text would be the job's
    traceback. Each is rejected and its unit's bit cleared, so the real result is recorded."""
    gate = tmp_path / "gate"
    submit, jid = start_gated(creds_file, broker, tmp_path)
    other = Keyring(b"x" * 32).sealer
    try:
        # every unit queued first: a bit forged for a unit not yet scattered is a denial of
        # service the README lists (its real result would count as a duplicate)
        wait_for(lambda: broker.client.hget(broker.keys.job(jid), "scattered") == b"4", 30,
                 "all four units to be queued")
        recorded, results = broker.keys.recorded(jid), broker.keys.results(jid)
        for index, fields in (
            (3, {"w": "forger", "t": "0.1", "3": codec.encode(666)}),
            (2, {"w": "forger", "t": "0.1", "2": other.seal(codec.encode(666), "result", jid, 2,
                                                            "forger")}),
            (1, {"f": "1", "e": json.dumps({"error": "PWNED", "traceback": "PWNED"})}),
            (0, {"w": "forger", "t": "0.1", "p": other.seal(pack_results(
                [(0, codec.digest(codec.encode(666)), codec.encode(666))]), "results", jid,
                "forger"), "0": PACKED}),
        ):
            broker.client.setbit(recorded, index, 1)
            broker.client.xadd(results, fields)
        wait_for(lambda: not any(broker.client.getbit(recorded, i) for i in range(4)), 30,
                 "the coordinator to reject them and clear their units' bits")
        gate.touch()
        out, err = submit.communicate(timeout=60)
    finally:
        submit.kill()
    assert submit.returncode == 0, err
    assert json.loads(out) == 6  # 0 + 1 + 2 + 3, each computed by a worker
    assert "4 results entries rejected" in err, err
    assert "the result of unit 3 is not signed by this cluster's key" in err
    assert "the packed results of units 0 to 0 are not signed by this cluster's key" in err
    assert "PWNED" not in err


def test_a_copied_job_or_replayed_unit_runs_nothing(creds_file: Path, broker: Broker,
                                                    agent: AgentProcess, tmp_path: Path):
    """The issue's reproduction: a running job's code and signature copied into a new job id,
    with a unit of one's own choosing (it would append to a file the attacker names), and a
    real unit of the running job replayed into that job. Workers refuse both."""
    copy = "c0ffee000000"

    def add(jid: str, real: tuple[bytes, bytes], own: bytes) -> bytes:
        broker.client.hset(broker.keys.job(copy), mapping=broker.client.hgetall(
            broker.keys.job(jid)))
        return broker.client.xadd(broker.keys.units, {"j": copy, "a": "1", "0": own,
                                                     real[0]: real[1]})

    told = added_while_held(creds_file, broker, agent, tmp_path, add)
    assert f"job={copy}: not signed by this cluster's key" in told, told
    assert "Traceback" not in told


def test_a_unit_not_signed_for_its_job_and_index_is_dropped(creds_file: Path, broker: Broker,
                                                            agent: AgentProcess,
                                                            tmp_path: Path):
    """Units added to a running, genuine job: one of the attacker's own, one tagged with
    another key, and a real unit of the job under another index. None is computed."""

    def add(jid: str, real: tuple[bytes, bytes], own: bytes) -> bytes:
        other = Keyring(b"x" * 32).sealer.seal(own, "unit", jid, 4)
        return broker.client.xadd(broker.keys.units, {"j": jid, "a": "1", "5": own, "4": other,
                                                     str(int(real[0]) + 6): real[1]})

    told = added_while_held(creds_file, broker, agent, tmp_path, add)
    assert told.count("is not signed by this cluster's key: dropped") == 3, told


def added_while_held(creds_file: Path, broker: Broker, agent: AgentProcess, tmp_path: Path,
                     add: Callable[[str, tuple[bytes, bytes], bytes], bytes]) -> str:
    """Run the gated job's one unit, held by one worker; once it is queued, ``add(job id, a
    real unit (index, bytes), a unit of the attacker's)`` writes into Redis and returns the
    last units entry it added, which the other worker takes. The job must end exact, no agent
    or worker die, and the attacker's unit (it would plant a file) never run. Returns the
    agent's log."""
    gate, planted = tmp_path / "gate", tmp_path / "planted"
    submit, jid = start_gated(creds_file, broker, tmp_path, "--param", "units=1")
    try:
        (_, fields), = broker.client.xrange(broker.keys.units, count=1)
        real = next((k, v) for k, v in fields.items() if k not in (b"j", b"a"))
        own = codec.encode({"i": 99, "gate": "", "log": str(planted)})
        last = add(jid, real, own)
        wait_for(lambda: handled(broker, last), 120, "a worker to take the entry")
        gate.touch()
        out, err = submit.communicate(timeout=120)
    finally:
        submit.kill()
    assert submit.returncode == 0, err
    assert json.loads(out) == 0  # one unit, held by one worker while the other reads
    assert not planted.exists()
    assert agent.proc.poll() is None
    return agent.stop()


def handled(broker: Broker, entry: bytes) -> bool:
    """A worker took entry ``entry`` of the units stream, and acknowledged and deleted it."""
    return delivered(broker, entry) and not broker.client.xrange(broker.keys.units, entry, entry)


def delivered(broker: Broker, last: bytes) -> bool:
    """The workers' group has read the units stream up to entry ``last``."""
    [group] = broker.client.xinfo_groups(broker.keys.units)
    done = group["last-delivered-id"]
    return tuple(map(int, done.split(b"-"))) >= tuple(map(int, last.split(b"-")))


def test_a_job_replayed_after_its_signature_expired_runs_nothing(creds_file: Path,
                                                                 broker: Broker,
                                                                 agent: AgentProcess,
                                                                 tmp_path: Path):
    """A finished job's hash and a unit of it, seen while it ran, written back once the job's
    signature expired (``--keep``, renewed while the job is kept): the worker refuses."""
    gate, log = tmp_path / "gate", tmp_path / "units.log"
    submit, jid = start_gated(creds_file, broker, tmp_path, "--param", "units=1",
                              "--keep", "0.001")
    try:
        seen = broker.client.hgetall(broker.keys.job(jid))
        (_, entry), = broker.client.xrange(broker.keys.units, count=1)
        gate.touch()
        out, err = submit.communicate(timeout=60)
    finally:
        submit.kill()
    assert submit.returncode == 0, err
    expires = int(broker.client.hget(broker.keys.job(jid), "expires") or seen[b"expires"])
    wait_for(lambda: broker.server_time_ms() > expires, 30, "the signature to expire")
    broker.client.hset(broker.keys.job(jid), mapping=seen)
    last = broker.client.xadd(broker.keys.units, entry)
    wait_for(lambda: handled(broker, last), 30, "a worker to take the replayed entry")
    told = agent.stop()
    assert "queued after the job's signature expired: dropped" in told, told
    assert log.read_text().split() == ["0"]  # the unit ran once, in the real run


def test_thousands_of_random_and_mutated_entries_change_nothing(creds_file: Path,
                                                                broker: Broker,
                                                                agent: AgentProcess,
                                                                tmp_path: Path):
    """A fuzz of the running cluster: 2,000 entries (random fields and values, and real
    entries of the job with bytes flipped or cut) thrown into the units and results streams
    while a job runs. The job still ends exact, and no worker, agent or coordinator dies.
    (Every real entry copied is broken: a whole copy would be computed, by the worker that must
    stay free to read the rest; and its attempt count is left alone: rewriting it can fail a
    unit, a denial of service the README lists.)"""
    rng = random.Random(12)
    names = [b"j", b"a", b"r", b"w", b"t", b"f", b"e", b"d", b"0", b"1", b"5", b"-1",
             b"99999999999", b"x"]

    def noise(jid: str, own: bytes) -> bytes:
        return rng.choice([
            lambda: rng.randbytes(rng.randrange(0, 64)), lambda: own, lambda: jid.encode(),
            lambda: Keyring(b"k" * 32).sealer.seal(codec.encode(rng.random()), "result", jid,
                                                   rng.randrange(6), "w")])()

    def mutated(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
        out = dict(fields)
        key = rng.choice([k for k in out if k != b"a"])
        value = bytearray(out[key])
        if rng.random() < 0.5:
            value[rng.randrange(len(value))] ^= 1 << rng.randrange(8)
        else:
            value = value[:rng.randrange(len(value))]
        out[key] = bytes(value)
        return out

    def add(jid: str, real: tuple[bytes, bytes], own: bytes) -> bytes:
        entry = {b"j": jid.encode(), b"a": b"1", real[0]: real[1]}
        last = b"0-0"
        for n in range(2000):
            fields = mutated(entry) if n % 3 == 0 else {
                rng.choice(names): noise(jid, own) for _ in range(rng.randrange(1, 6))}
            stream = broker.keys.units if n % 2 else broker.keys.results(jid)
            added = broker.client.xadd(stream, fields)
            last = added if n % 2 else last
        return last

    told = added_while_held(creds_file, broker, agent, tmp_path, add)
    assert "exit code" not in told and "Traceback" not in told, told[-3000:]
