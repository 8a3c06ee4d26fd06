"""compute() returns a value the wire format refuses (param ``kind``: set, object array or
a dict with an int key) for unit ``bad``."""

import numpy as np

PARAMS = {"units": 4, "bad": 2, "kind": "set"}


def scatter(params):
    for i in range(params["units"]):
        yield {"i": i, "bad": params["bad"], "kind": params["kind"]}


def compute(unit):
    if unit["i"] != unit["bad"]:
        return unit["i"]
    if unit["kind"] == "set":
        return {1, 2, 3}
    if unit["kind"] == "intkey":
        return {"counts": {7: 1}}
    return np.array([{"a": 1}, None], dtype=object)


def gather(results, params):
    return results
