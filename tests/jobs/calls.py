"""Functions that tests call through ``cluster.Executor`` and ``ProcessPoolExecutor`` alike:
importable on the workers (this directory is shipped), so they travel by reference."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

import cluster


def mul(x, y):
    return x * y


def power(x, exponent=2):
    return x ** exponent


def sleep_and_return(seconds, value=None):
    time.sleep(seconds)
    return value


def raise_runtime_error():
    raise RuntimeError(123)  # some comment


def noisy_stats(seed_offset, size):
    """A small numpy computation whose result depends on its inputs only."""
    rng = np.random.default_rng(1000 + seed_offset)
    data = rng.normal(size=size)
    return {"mean": float(data.mean()), "hist": np.histogram(data, bins=8)[0],
            "shape": data.reshape(-1, 2).shape, "tag": ("unit", seed_offset)}


def marked(index, directory, gate=None):
    """Note that call ``index`` started (a file named by its index and pid); with ``gate``,
    then wait until that file exists."""
    Path(directory, f"{index}.{os.getpid()}").touch()
    gated(gate)
    return index * index


def gated(gate, value=None):
    """Return ``value`` once the file ``gate`` exists (at once for None): a call that runs as
    long as a test wants."""
    while gate is not None and not os.path.exists(gate):
        time.sleep(0.01)
    return value


def drawn(n):
    """Numbers from cluster.unit_rng(): the same for the same call, wherever it runs."""
    return cluster.unit_rng().integers(0, 1000, size=n)


def same(a, b):
    """For the tests: equal values of the same types (arrays: same dtype and elements)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and bool((a == b).all())
    return type(a) is type(b) and a == b


def meet_and_draw(mine, other, timeout=60.0):
    """Say this call runs (file ``mine``), wait for the other call (file ``other``): the two
    run at once, so on two workers. Then this worker's first draw from numpy's global
    generator, and its pid."""
    Path(mine).touch()
    deadline = time.monotonic() + timeout
    while not Path(other).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{other} never appeared")
        time.sleep(0.01)
    return os.getpid(), int(np.random.randint(2 ** 62))
