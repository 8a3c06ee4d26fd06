"""Real processes killed for real: the job still completes, each unit recorded exactly once."""

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, SAMPLES, tagged_processes
from waiting import wait_for

from cluster.errors import ExitCode

pytestmark = pytest.mark.slow


def started(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    return [tuple(map(int, line.split())) for line in log.read_text().splitlines() if line]


def test_sigkill_a_worker_mid_unit(creds_file, agent, tmp_path):
    log = tmp_path / "started.log"
    units, held = 30, 5
    submit = subprocess.Popen(
        [sys.executable, "-m", "cluster", "submit", str(SAMPLES / "slow_units.py"),
         "--credentials", str(creds_file), "--param", f"units={units}",
         "--param", "sleep=0.15", "--param", f"log={log}", "--param", f"hold={held}",
         "--output", str(tmp_path / "r.json"), "--progress", "none", "--no-speculate"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    # the held unit's first attempt keeps its worker busy until the kill: surely mid-unit
    pid = wait_for(lambda: next((p for i, p in started(log) if i == held), None), 60,
                   f"unit {held} to start")
    assert psutil.Process(pid) in psutil.Process(agent.proc.pid).children(recursive=True)
    os.kill(pid, signal.SIGKILL)
    out, err = submit.communicate(timeout=60)
    assert submit.returncode == 0, err

    result = json.loads((tmp_path / "r.json").read_text())
    assert result["indices"] == list(range(units))  # every unit once, in scatter order
    assert result["squares"] == [i * i for i in range(units)]
    runs = [i for i, _ in started(log)]
    assert runs.count(held) == 2  # the killed unit ran again, elsewhere
    reissued = int(re.search(r"(\d+) reissued", err).group(1))
    assert reissued >= 1
    assert re.search(r"\b0 duplicates discarded", err)
    agent_log = agent.stop()
    assert "killed by SIGKILL" in agent_log


def start_tagged(tmp_path, tag):
    log = tmp_path / "units.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster", "submit", str(SAMPLES / "sleepy.py"),
         "--param", "sleep=5", "--param", f"log={log}", "--progress", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "CLUSTER_TEST_TAG": tag})
    wait_for(lambda: log.exists() and "start" in log.read_text(), 60, "a unit to start")
    return proc


def wait_until_gone(tag):
    wait_for(lambda: not tagged_processes(tag), 15, "every process of the killed submit to exit")


def test_ctrl_c_on_the_local_default_stops_everything(tmp_path):
    tag = uuid.uuid4().hex
    proc = start_tagged(tmp_path, tag)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "cluster: error: interrupted" in err
    assert tagged_processes(tag) == []


def test_a_killed_submit_takes_its_local_cluster_along(tmp_path):
    tag = uuid.uuid4().hex
    proc = start_tagged(tmp_path, tag)
    proc.kill()  # no chance to clean up: Redis, agent and workers must go on their own
    proc.communicate(timeout=30)
    wait_until_gone(tag)


def test_a_unit_that_kills_its_worker_from_a_packed_batch_fails_alone(creds_file, agent,
                                                                      tmp_path):
    # tiny units travel packed, many to an entry; the one that SIGKILLs its worker on every
    # attempt takes the entry down with it once: the entry is split, one unit per entry, and
    # only that unit fails (the others of its batch, charged one attempt, are recorded)
    log, out, units, poison = tmp_path / "units.log", tmp_path / "r.json", 3000, 2500
    run = subprocess.run(
        [sys.executable, "-m", "cluster", "submit", str(SAMPLES / "chaos_units.py"),
         "--credentials", str(creds_file), "--param", f"units={units}", "--param", "sleep=0",
         "--param", f"log={log}", "--param", f"die_index={poison}", "--max-attempts", "2",
         "--max-failed", "1", "--output", str(out), "--progress", "none", "--no-speculate"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == ExitCode.PARTIAL, run.stderr
    assert json.loads(out.read_text()) == [None if i == poison else [i, i * i]
                                           for i in range(units)]
    starts = [int(line.split()[1]) for line in log.read_text().splitlines()
              if line.startswith("start")]
    assert starts.count(poison) == 2
    assert re.search(r"\b1 failed", run.stderr), run.stderr
    agent_log = agent.stop()
    assert re.search(r"entry \S+ \(attempt 2\) split into \d+ entries", agent_log), agent_log
