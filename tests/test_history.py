"""The record of every run: ``--summary-json``, the cluster's history in Redis, the local
history file and journal, ``cluster jobs`` and ``cluster show``, after a run that finished,
was partial, failed, timed out, was interrupted or resumed; and the stamps that start the lines
``cluster`` writes to stderr off a terminal."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SAMPLES, plain, run_cli
from waiting import wait_for

from cluster.broker import Broker
from cluster.config import ConfigError, load
from cluster.console import Console, utc
from cluster.errors import ExitCode
from cluster.history import LocalHistory, RunRecord, Units, ended_elsewhere, state_of
from cluster.jobs import runs_of
from cluster.recorder import Recorder

LISTED = str(SAMPLES / "listed.py")
HOST = socket.gethostname()
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture(autouse=True)
def own_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's local history and journal, for the submits it runs and for itself."""
    monkeypatch.setenv("CLUSTER_HISTORY", str(tmp_path / "history.sqlite"))
    monkeypatch.setenv("CLUSTER_JOURNAL", str(tmp_path / "journal.jsonl"))
    monkeypatch.setenv("CLUSTER_KEY_FILE", str(tmp_path / "key"))
    for name in ("CLUSTER_REDIS_URL", "CLUSTER_REDIS_PASSWORD", "CLUSTER_PREFIX"):
        monkeypatch.delenv(name, raising=False)


def submit_args(creds_file: Path, *args: str, **params: object) -> list[str]:
    flags = [f for k, v in params.items() for f in ("--param", f"{k}={v}")]
    return ["submit", LISTED, "--credentials", str(creds_file), "--progress", "none",
            *flags, *args]


def summary_of(stderr: str) -> dict[str, Any]:
    """The record that ``--summary-json -`` wrote: the one line of stderr that is JSON."""
    [line] = [line for line in stderr.splitlines() if line.startswith("{")]
    record: dict[str, Any] = json.loads(line)
    return record


def journal(tmp_path: Path, jid: str) -> list[str]:
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    return [e["event"] for e in map(json.loads, lines) if e["job"] == jid]


def listing(creds_file: Path) -> dict[str, Any]:
    r = run_cli("jobs", "--credentials", str(creds_file), "--json")
    assert r.returncode == 0, r.stderr
    found: dict[str, Any] = json.loads(r.stdout)
    return found


def show(creds_file: Path, jid: str) -> str:
    r = run_cli("show", jid, "--credentials", str(creds_file))
    assert r.returncode == 0, r.stderr
    return r.stdout


def registered(broker: Broker) -> str:
    jid = wait_for(lambda: next(iter(broker.client.smembers(broker.keys.jobs)), None), 30,
                   "the job to be registered")
    return str(jid.decode())


def recorded(broker: Broker, jid: str) -> int:
    return int(broker.client.bitcount(broker.keys.recorded(jid)))


# -- end to end ------------------------------------------------------------------------------


def test_a_finished_run_in_its_summary_jobs_and_show(creds_file: Path, agent: object,
                                                     tmp_path: Path) -> None:
    summary, out = tmp_path / "summary.json", tmp_path / "out.json"
    r = run_cli(*submit_args(creds_file, "--summary-json", str(summary), "-o", str(out),
                             units=6))
    assert r.returncode == 0, r.stderr
    record = json.loads(summary.read_text())
    jid = record["job"]
    assert (record["state"], record["exit_code"], record["name"]) == ("finished", 0, "listed")
    assert record["units"] == {"total": 6, "done": 6, "failed": 0, "reissued": 0,
                               "duplicates": 0, "speculative": 0, "nondeterministic": 0,
                               "lost_results": 0}
    assert record["hosts"] == {HOST: 6} and record["failed_units"] == []
    assert record["output"] == str(out) and record["coordinator"] == HOST and record["redis"]
    assert re.fullmatch(STAMP, record["started"]) and record["started"] <= record["ended"]
    assert record["resumed_from"] is None and record["kept"] is False
    assert journal(tmp_path, jid) == ["started", "finished"]

    listed = listing(creds_file)
    assert listed["running"] == [] and [run["job"] for run in listed["recent"]] == [jid]
    assert listed["recent"][0] == record  # the same record everywhere
    text = show(creds_file, jid)
    assert f"job {jid}: listed ({LISTED})" in text and "finished (exit 0)" in text
    assert "6/6 done, 0 failed" in text and f"output    {out}" in text
    mine = run_cli("jobs")  # no cluster named: the runs recorded on this machine
    assert "recent runs on this machine" in mine.stdout and jid in mine.stdout
    assert "finished (exit 0)" in run_cli("show", jid).stdout


def test_a_partial_run_records_its_failed_units(creds_file: Path, agent: object) -> None:
    r = run_cli(*submit_args(creds_file, "--max-failed", "1", "--max-attempts", "1",
                             "--summary-json", "-", units=6, fail=3))
    assert r.returncode == ExitCode.PARTIAL, r.stderr
    record = summary_of(r.stderr)
    assert (record["state"], record["exit_code"]) == ("partial", 5)
    assert record["units"]["done"] == 6 and record["units"]["failed"] == 1
    [unit] = record["failed_units"]
    assert (unit["unit"], unit["host"], unit["attempts"]) == (3, HOST, 1)
    assert unit["worker"].startswith(f"{HOST}/") and "fails on purpose" in unit["error"]
    assert "Traceback" in unit["traceback"] and "ValueError" in unit["traceback"]
    text = show(creds_file, record["job"])
    assert "partial (exit 5)" in text and "failed units:" in text
    assert f"  unit 3 on {HOST} (worker {unit['worker']}), 1 attempt: " in text
    assert "    Traceback (most recent call last):" in text


def test_a_failed_run(creds_file: Path, agent: object, tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    r = run_cli(*submit_args(creds_file, "--max-attempts", "1", "--summary-json", str(summary),
                             units=6, fail=2))
    assert r.returncode == ExitCode.JOB_FAILED, r.stderr
    record = json.loads(summary.read_text())
    assert (record["state"], record["exit_code"]) == ("failed", 1)
    assert record["error"].startswith("unit 2 failed after 1 attempt(s)")
    assert [u["unit"] for u in record["failed_units"]] == [2]
    assert journal(tmp_path, record["job"]) == ["started", "failed"]  # not "finished"
    assert listing(creds_file)["recent"][0]["state"] == "failed"
    assert "failed (exit 1)" in show(creds_file, record["job"])


def test_a_timed_out_run_counts_units(creds_file: Path, agent: object, tmp_path: Path) -> None:
    r = run_cli(*submit_args(creds_file, "--timeout", "2", "--summary-json", "-", units=40,
                             sleep=0.5))
    assert r.returncode == ExitCode.TIMEOUT, r.stderr
    done = re.search(r"did not finish within 2 s \((\d+) of 40 units done\)", r.stderr)
    assert done, r.stderr  # the units of the job, not those queued so far
    record = summary_of(r.stderr)
    assert (record["state"], record["exit_code"]) == ("timed-out", 4)
    assert record["units"]["total"] == 40 and record["units"]["done"] == int(done[1])
    assert journal(tmp_path, record["job"]) == ["started", "timed-out"]
    assert "timed-out (exit 4)" in show(creds_file, record["job"])


def test_an_interrupted_run(creds_file: Path, agent: object, broker: Broker,
                            tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster", *submit_args(
            creds_file, "--summary-json", str(summary), units=4, hold=0,
            release=tmp_path / "never")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=ROOT)
    try:
        jid = registered(broker)
        # once it scatters, its coordinator has opened the job (registered, then told Redis
        # its expiry): the interrupt falls on a run that knows its job
        wait_for(lambda: int(broker.client.hget(broker.keys.job(jid), "scattered") or 0) > 0,
                 30, "the job's first units to be queued")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.INTERRUPTED, err
    record = json.loads(summary.read_text())
    assert (record["job"], record["state"], record["exit_code"]) == (jid, "interrupted", 130)
    assert journal(tmp_path, jid) == ["started", "interrupted"]
    assert listing(creds_file)["recent"][0]["state"] == "interrupted"


def test_a_resumed_run_says_so_and_its_record_tells(creds_file: Path, agent: object,
                                                    broker: Broker, tmp_path: Path) -> None:
    args = submit_args(creds_file, units=10, sleep=0.3)
    first = subprocess.Popen([sys.executable, "-m", "cluster", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        jid = registered(broker)
        wait_for(lambda: recorded(broker, jid) >= 1, 60, "a unit to be recorded")
        os.kill(first.pid, signal.SIGSTOP)  # what is recorded from now on is not gathered
        before = recorded(broker, jid)
        wait_for(lambda: recorded(broker, jid) >= before + 2, 60, "two more units recorded")
        [running] = listing(creds_file)["running"]
        assert (running["job"], running["name"], running["file"]) == (jid, "listed", LISTED)
        assert (running["coordinator"], running["pid"]) == (HOST, first.pid)
        assert running["recorded"] >= 3 and re.fullmatch(STAMP, running["started"])
    finally:
        first.kill()
        first.communicate(timeout=30)

    summary = tmp_path / "summary.json"
    again = run_cli(*args, "--summary-json", str(summary))  # the same command: it resumes
    assert again.returncode == 0, again.stderr
    said = re.search(rf"^resumed job {jid}: (\d+) of 10 units already recorded$", again.stderr,
                     re.MULTILINE)
    assert said and int(said[1]) >= 2, again.stderr
    record = json.loads(summary.read_text())
    assert (record["job"], record["state"], record["resumed_from"]) == (jid, "finished", jid)
    assert record["recorded_before"] == int(said[1]) and record["units"]["done"] == 10
    assert journal(tmp_path, jid) == ["started", "resumed", "finished"]
    assert f"resumed   {said[1]} units were already recorded" in show(creds_file, jid)


def test_the_lines_on_stderr_start_with_the_time_and_the_job(creds_file: Path, agent: object,
                                                             tmp_path: Path) -> None:
    r = run_cli(*submit_args(creds_file, "-o", str(tmp_path / "out.json"), units=3),
                raw=True)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    jid = re.findall(r"job=(\w+)", lines[0])[0]
    assert [line for line in lines if not re.match(rf"{STAMP} job={jid} ", line)] == []
    assert any(line.endswith(f"result written to {tmp_path / 'out.json'}") for line in lines)
    assert re.match(r"3 units on \d workers", plain(r.stderr).splitlines()[-1]), r.stderr
    # no job yet: job=-
    usage = run_cli(*submit_args(creds_file, "--timeout", "0"), raw=True)
    assert re.fullmatch(rf"{STAMP} job=- cluster: error: argument --timeout: .*\n",
                        usage.stderr)


def test_a_summary_in_a_missing_directory_is_refused_before_the_run(creds_file: Path,
                                                                    tmp_path: Path) -> None:
    r = run_cli(*submit_args(creds_file, "--summary-json", str(tmp_path / "no" / "s.json")))
    assert r.returncode == ExitCode.USAGE
    assert r.stderr.startswith("cluster: error: --summary-json ") and "does not exist" in r.stderr


def test_an_unwritable_local_history_is_a_warning(creds_file: Path, agent: object,
                                                  tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    r = run_cli(*submit_args(creds_file, units=2),
                env={"CLUSTER_HISTORY": str(tmp_path / "file" / "history.sqlite")})
    assert r.returncode == 0, r.stderr
    assert "the run's record is not in the local history" in r.stderr


def test_show_of_an_unknown_job_is_a_one_line_error(creds_file: Path) -> None:
    r = run_cli("show", "0123456789ab", "--credentials", str(creds_file))
    assert r.returncode == ExitCode.USAGE and r.stderr.count("\n") == 1
    assert "job 0123456789ab: not running, and no record of it in Redis at" in r.stderr


# -- the parts -------------------------------------------------------------------------------


def record(job: str | None = "j1", ended: str = "2026-11-28T09:30:00Z", **kw: Any) -> RunRecord:
    return RunRecord(job=job, run="r1", name="n", file="/f.py", state="finished", exit_code=0,
                     started=ended, ended=ended, seconds=1.0, **kw)


def test_states_follow_exit_codes() -> None:
    assert [state_of(c) for c in (0, 5, 1, 2, 3, 4, 8, 70, 130)] == [
        "finished", "partial", "failed", "failed", "failed", "timed-out", "cancelled",
        "failed", "interrupted"]
    assert state_of(7) == "finished" and state_of(7, failed_units=2) == "partial"
    assert state_of(3, fenced=True) == "fenced"


def test_a_record_survives_json_and_ignores_what_it_does_not_know() -> None:
    r = record(units=Units(total=4, done=3, failed=1), hosts={"a": 2})
    assert RunRecord.from_json(r.to_json()) == r == RunRecord.from_json(r.to_json(indent=1))
    newer = {**json.loads(r.to_json()), "something": "new"}
    assert RunRecord.from_json(json.dumps(newer)) == r


def test_the_local_history_is_bounded_in_runs_and_days(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    local = LocalHistory(tmp_path / "h.sqlite", keep_runs=3, keep_days=1, now=lambda: now)
    for i in range(5):
        local.add(record(f"j{i}", utc(now - 60 + i)))
    assert [r.job for r in local.recent(10)] == ["j4", "j3", "j2"]
    local.add(record("old", utc(now - 2 * 86400)))  # older than a day: gone at once
    assert [r.job for r in local.recent(10)] == ["j4", "j3", "j2"]
    assert local.of_job("old") == [] and len(local.of_job("j4")) == 1
    assert LocalHistory(tmp_path / "none.sqlite").recent(5) == []


def test_the_cluster_history_is_bounded_in_jobs_and_days(broker: Broker) -> None:
    keys, hour = broker.keys, 3600_000
    for i in range(5):
        broker.save_run(f"j{i}", "r", record(f"j{i}").to_json(), hour, 3)
    assert broker.client.zrange(keys.history, 0, -1) == [b"j2", b"j3", b"j4"]
    assert not broker.client.exists(keys.runs("j0"))
    assert 0 < broker.client.pttl(keys.runs("j4")) <= hour
    broker.save_run("j4", "r2", record("j4").to_json(), hour, 3)  # a second run of j4
    assert len(runs_of(broker, "j4")) == 2
    broker.client.zadd(keys.history, {"old": 1})  # ended long ago
    broker.client.hset(keys.runs("old"), "r", record("old").to_json())
    assert broker.save_run("j5", "r", record("j5").to_json(), hour, 10) == 1
    assert not broker.client.exists(keys.runs("old"))
    assert broker.client.zrange(keys.history, 0, -1) == [b"j2", b"j3", b"j4", b"j5"]


def test_a_run_ended_elsewhere_is_recorded_as_cancelled(broker: Broker) -> None:
    # the hook for `cluster cancel` of a job whose coordinator is gone
    broker.create_job("c0ffee", {"name": "gone", "path": "/x/gone.py", "owner": "o",
                                 "started": broker.server_time_ms(), "host": "node9",
                                 "total": 8})
    ended = ended_elsewhere(broker, "c0ffee", "cancelled", 8, "cancelled by a test")
    assert ended is not None and (ended.state, ended.exit_code) == ("cancelled", 8)
    assert (ended.name, ended.coordinator, ended.units.total) == ("gone", "node9", 8)
    assert runs_of(broker, "c0ffee") == [ended] == LocalHistory().of_job("c0ffee")
    assert ended_elsewhere(broker, "nothere", "cancelled", 8) is None


def test_an_unreachable_cluster_history_is_a_warning(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from cluster.credentials import Credentials
    from cluster.local import free_port

    run = Recorder(None, local=LocalHistory(tmp_path / "h.sqlite"))
    run.creds = Credentials(f"redis://127.0.0.1:{free_port()}/0", None, b"k", "x:")
    run.save(record())
    assert "is not in the cluster's history" in caplog.text
    assert len(run.local.recent(5)) == 1


def test_stamps_carry_the_time_in_utc_and_the_job() -> None:
    stream = io.StringIO()
    out = Console(stream, stamped=True, now=lambda: 0.0)
    out.line("before")
    out.job = "3f9a0c12d4e1"
    out.line("two\nlines", detail="  a traceback\n")
    assert stream.getvalue() == ("1970-01-01T00:00:00Z job=- before\n"
                                 "1970-01-01T00:00:00Z job=3f9a0c12d4e1 two\n"
                                 "1970-01-01T00:00:00Z job=3f9a0c12d4e1 lines\n"
                                 "  a traceback\n")
    terminal = io.StringIO()
    Console(terminal, stamped=False).line("as it is")
    assert terminal.getvalue() == "as it is\n"


@pytest.mark.parametrize("value, ok", [("7", 7.0), ("0.5", 0.5), ("0", None), ("ten", None)])
def test_history_days_in_hosts_ini(tmp_path: Path, value: str, ok: float | None) -> None:
    ini = tmp_path / "hosts.ini"
    ini.write_text(f"[cluster]\nredis = a\nhistory_days = {value}\n[host a]\n")
    if ok is not None:
        assert load(ini).history_days == ok
        return
    with pytest.raises(ConfigError, match=r"hosts.ini:3: \[cluster\] history_days: "):
        load(ini)
    ini.write_text("[cluster]\nredis = a\n[host a]\n")
    assert load(ini).history_days == 30
