"""Runs the way cron starts them: `env -i` with a minimal PATH, a new session (setsid), stdin
from /dev/null, another working directory; the result goes to a dated file and the run's record
to a JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

from conftest import ROOT, SAMPLES


def cron(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``cluster submit`` as cron runs it, from ``tmp_path``."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "LANG": "C",
           "PYTHONPATH": str(ROOT),  # this checkout, as an installed package would be
           "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"]}
    return subprocess.run(["setsid", "--wait", sys.executable, "-m", "cluster", "submit", *args],
                          env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)


def test_a_cron_run_on_the_local_cluster(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    r = cron(tmp_path, str(SAMPLES / "gated.py"), "--param", "units=6",
             "--output", "out-{date}.json", "--summary-json", "summary.json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == 15  # stdout is not a terminal: JSON
    written = tmp_path / f"out-{date.today().isoformat()}.json"
    assert json.loads(written.read_text()) == 15
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    assert "progress" not in r.stderr or "progress:" in r.stderr  # plain lines, never a bar
    assert "\r" not in r.stderr
