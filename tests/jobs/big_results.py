"""Large results: unit i returns ``floats`` float64 values, all equal to i."""
import numpy as np

PARAMS = {"units": 24, "floats": 1 << 20}


def scatter(params):
    return [{"i": i, "n": params["floats"]} for i in range(params["units"])]


def compute(unit):
    return np.full(unit["n"], float(unit["i"]))


def gather(results, params):
    return [int(r[0]) if r is not None and (r == r[0]).all() else None for r in results]
