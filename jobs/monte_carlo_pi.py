"""Estimate pi by throwing random points at the unit square.

    cluster submit jobs/monte_carlo_pi.py --param units=64 --param samples=1000000
"""

import numpy as np

from cluster import unit_rng

PARAMS = {"units": 64, "samples": 1_000_000}


def scatter(params):
    for _ in range(params["units"]):
        yield {"samples": params["samples"]}


def count(params):
    return params["units"]


def compute(unit):
    xy = unit_rng().random((unit["samples"], 2))
    inside = np.count_nonzero((xy * xy).sum(axis=1) <= 1.0)
    return {"inside": inside, "samples": unit["samples"]}


def gather(results, params):
    inside = sum(r["inside"] for r in results)
    samples = sum(r["samples"] for r in results)
    return 4.0 * inside / samples
