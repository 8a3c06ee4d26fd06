"""Results of a chosen shape, for the ways a result is printed. Unit ``i`` computes
``(i + 1) * arange(rows * cols).reshape(rows, cols)`` as float64; ``shape`` picks what gather
returns: ``array`` (the units stacked), ``dict`` (their sum and a list of per-unit maxima) or
``special`` (an array with NaN and +-infinity)."""

import numpy as np

PARAMS = {"units": 3, "rows": 2, "cols": 3, "shape": "array"}


def scatter(params):
    return [{"i": i, "rows": params["rows"], "cols": params["cols"]} for i in
            range(params["units"])]


def compute(unit):
    return (unit["i"] + 1) * np.arange(unit["rows"] * unit["cols"], dtype=np.float64).reshape(
        unit["rows"], unit["cols"])


def gather(results, params):
    if params["shape"] == "dict":
        return {"sum": sum(results), "max": [r.max() for r in results], "units": len(results)}
    if params["shape"] == "special":
        return np.array([np.nan, np.inf, -np.inf, 1.5])
    return np.stack(results)
