"""Static checks, as CI runs them: ``mypy --strict`` over the package and ``ruff check``.

Their configuration is in pyproject.toml. A missing mypy or ruff is a skip on a laptop and a
failure under CI=true (both are in the ``test`` extra).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import IN_CI, ROOT


def tool(module: str) -> list[str]:
    """The command running ``module`` with this interpreter, which must have it installed."""
    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed (pip install -e '.[test]')"
        if IN_CI:
            pytest.fail(message + " but is required under CI=true")
        pytest.skip(message)
    return [sys.executable, "-m", module]


def check(command: list[str]) -> None:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (f"{' '.join(command[2:])} exited {proc.returncode}:\n"
                                  f"{proc.stdout}{proc.stderr}")


def test_mypy_strict_passes() -> None:
    check([*tool("mypy"), "--strict", "cluster"])


def test_ruff_passes() -> None:
    check([*tool("ruff"), "check", "cluster", "tests"])


def loaded_after(imports: str, names: set[str]) -> set[str]:
    """Which of the top-level packages ``names`` a fresh interpreter holds after ``imports``."""
    probe = f"import json, sys, {imports}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return names & {m.split(".")[0] for m in json.loads(proc.stdout)}


def test_host_and_local_paths_import_no_ssh_library() -> None:
    """The agent, its workers, `submit` and the local cluster never need SSH: Fabric, Invoke
    and Paramiko are imported by `up`, `down`, `rotate-key` and `doctor` only (``sshcommands``),
    and they cost a cold `cluster submit` a third of its start-up."""
    ssh = {"fabric", "invoke", "paramiko"}
    assert loaded_after("cluster.cli, cluster.worker, cluster.agent, cluster.local", ssh) == set()
    assert "fabric" in loaded_after("cluster.sshcommands", ssh)  # the probe would see them


def test_the_agent_imports_no_numpy() -> None:
    """An agent never decodes a unit or a result: it starts (and its host's workers with it)
    without numpy's import time; the package itself imports numpy only when used."""
    assert loaded_after("cluster.agent, cluster.dataserver", {"numpy"}) == set()
    assert loaded_after("cluster.worker", {"numpy"}) == {"numpy"}  # the probe would see it
