"""Soak job, reduced: results are folded as they arrive, in a way that tells a unit counted
twice from one missed. Unit i contributes ``n=1``, ``bits=2**i`` and an array ``(i + 1) * w``.

A sum of N powers of two equals ``2**N - 1`` only if they are the distinct powers 0..N-1 (a
repeated power would leave fewer than N bits set), so ``n == N`` and ``bits == 2**N - 1`` prove
that every unit was folded exactly once. The result is ``{"units": N, "bad": []}`` then; else
``bad`` names the units missing and what else is off.

``floats=65536`` makes each result 512 KB, sent to Redis as a blob.
"""

import time

import numpy as np

PARAMS = {"units": 300, "floats": 1, "sleep": 0.0}


def weights(floats):
    return np.arange(floats, dtype=np.float64) % 1000 + 1


def scatter(params):
    for i in range(params["units"]):
        yield {"i": i, "floats": params["floats"], "sleep": params["sleep"]}


def compute(unit):
    time.sleep(unit["sleep"])
    i = unit["i"]
    return {"n": 1, "bits": 2 ** i, "v": (i + 1) * weights(unit["floats"])}


def reduce(accumulator, result):
    return {"n": accumulator["n"] + result["n"], "bits": accumulator["bits"] + result["bits"],
            "v": accumulator["v"] + result["v"]}


def count(params):
    return params["units"]


def gather(total, params):
    units = params["units"]
    if total is None:
        return {"units": 0, "bad": ["nothing was folded"]}
    bad = [i for i in range(units) if not total["bits"] >> i & 1]
    if total["n"] != units or total["bits"] != 2 ** units - 1:
        bad.append(f"n={total['n']} bits={total['bits']:#x}")
    if not np.array_equal(total["v"], units * (units + 1) // 2 * weights(params["floats"])):
        bad.append("array sum differs")
    return {"units": total["n"], "bad": bad}
