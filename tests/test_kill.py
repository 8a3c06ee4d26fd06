"""Real processes killed for real: the job still completes, each unit recorded exactly once."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, SAMPLES

pytestmark = pytest.mark.slow


def started(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    return [tuple(map(int, line.split())) for line in log.read_text().splitlines() if line]


def test_sigkill_a_worker_mid_unit(creds_file, agent, tmp_path):
    log = tmp_path / "started.log"
    units = 30
    submit = subprocess.Popen(
        [sys.executable, "-m", "cluster", "submit", str(SAMPLES / "slow_units.py"),
         "--credentials", str(creds_file), "--param", f"units={units}",
         "--param", "sleep=0.15", "--param", f"log={log}", "--output", str(tmp_path / "r.json"),
         "--progress", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 30
    while len(started(log)) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    index, pid = started(log)[-1]  # a unit that has just started: its worker is mid-unit
    assert psutil.Process(pid).ppid() == agent.proc.pid  # it is one of the agent's workers
    os.kill(pid, signal.SIGKILL)
    out, err = submit.communicate(timeout=60)
    assert submit.returncode == 0, err

    result = json.loads((tmp_path / "r.json").read_text())
    assert result["indices"] == list(range(units))  # every unit once, in scatter order
    assert result["squares"] == [i * i for i in range(units)]
    runs = [i for i, _ in started(log)]
    assert runs.count(index) == 2  # the killed unit ran again, elsewhere
    reissued = int(re.search(r"(\d+) reissued", err).group(1))
    assert reissued >= 1
    assert re.search(r"\b0 duplicates discarded", err)
    agent_log = agent.stop()
    assert "killed by SIGKILL" in agent_log
