"""Run a numeric Python job on every core of many machines, through Redis."""

from typing import Any

from .context import unit_index, unit_rng
from .errors import ClusterError, ExitCode
from .version import __version__

__all__ = ["ClusterError", "Executor", "ExitCode", "__version__", "run", "unit_index",
           "unit_rng"]


def __getattr__(name: str) -> Any:
    """``Executor`` and ``run`` load the coordinator's side on first use: an agent, which
    imports this package too, never does."""
    if name in ("Executor", "BrokenCluster", "TaskFailed"):
        from . import executor

        return getattr(executor, name)
    if name == "run":
        from .api import run

        return run
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
