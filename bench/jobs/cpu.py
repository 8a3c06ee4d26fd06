"""Benchmark (b): CPU-bound numpy units of a fixed amount of work (``iters`` passes over a small
array that stays in cache). bench.py calibrates ``iters`` so that one unit takes ~20 ms.

    cluster submit bench/jobs/cpu.py --param units=200 --param iters=2000
"""

import numpy as np

PARAMS = {"units": 200, "size": 4096, "iters": 1000}


def scatter(params):
    for _ in range(params["units"]):
        yield {"size": params["size"], "iters": params["iters"]}


def compute(unit):
    x = np.linspace(0.0, 1.0, unit["size"])
    for _ in range(unit["iters"]):
        np.multiply(x, 0.999, out=x)
        np.add(x, 0.001, out=x)
        np.sqrt(x, out=x)
    return float(x.sum())


def gather(results, params):
    return sum(results)
