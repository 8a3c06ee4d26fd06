"""Static checks, as CI runs them: ``mypy --strict`` over the package and ``ruff check``.

Their configuration is in pyproject.toml. A missing mypy or ruff is a skip on a laptop and a
failure under CI=true (both are in the ``test`` extra).
"""

from __future__ import annotations

import importlib.util
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
