"""Benchmark (a): many tiny units; compute returns its input. Measures per-unit overhead.

cluster submit bench/jobs/tiny.py --param units=20000
"""

PARAMS = {"units": 20_000}


def scatter(params):
    for i in range(params["units"]):
        yield {"i": i}


def compute(unit):
    return unit


def gather(results, params):
    """The number of units that came back in scatter order (== units when all is well)."""
    return sum(1 for i, r in enumerate(results) if r == {"i": i})
