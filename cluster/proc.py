"""Small process helpers shared by the agent, workers and the local cluster."""

from __future__ import annotations

import signal
import sys

RECYCLE = 75  # a worker's exit code: "a job I ran has finished, start a fresh worker in my place"


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send us ``signum`` when our parent dies, so nothing is orphaned even when
    the parent is SIGKILLed. A no-op elsewhere. Safe as a ``preexec_fn``."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signum))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
