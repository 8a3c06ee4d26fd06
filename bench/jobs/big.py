"""Benchmark (c): few units with a large result, a float64 array of ``n`` elements (8 MB at the
default). Measures the bandwidth of getting results back to the coordinator.

    cluster submit bench/jobs/big.py --param units=64
"""

import numpy as np

PARAMS = {"units": 64, "n": 1_000_000}


def scatter(params):
    for i in range(params["units"]):
        yield {"i": i, "n": params["n"]}


def compute(unit):
    return np.full(unit["n"], float(unit["i"]))


def gather(results, params):
    """How many results are the right array (== units when all is well)."""
    n = params["n"]
    return sum(
        1
        for i, r in enumerate(results)
        if r.shape == (n,) and r.dtype == np.float64 and r[0] == i and r[-1] == i
    )
