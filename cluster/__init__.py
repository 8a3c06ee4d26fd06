"""Run a numeric Python job on every core of many machines, through Redis."""

from .context import unit_index, unit_rng
from .errors import ClusterError, ExitCode

__version__ = "0.1.0"
__all__ = ["ClusterError", "ExitCode", "__version__", "unit_index", "unit_rng"]
