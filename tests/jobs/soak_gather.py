"""Soak job, gathered: each unit's result names its index and carries values derived only from
it, so ``gather`` can name every unit whose result is missing, misplaced or corrupted.

``floats=1`` gives small results; ``floats=65536`` gives 512 KB results, which travel to Redis
as blobs (at least ``BLOB_THRESHOLD``, 32 KB). The result is ``{"units": N, "bad": []}``
exactly when every unit's own result arrived, once, in its place.
"""

import time

import numpy as np

from cluster import unit_index

PARAMS = {"units": 300, "floats": 1, "sleep": 0.0}


def values(index, floats):
    """What unit ``index`` must return: exact integers in float64, unique to the unit."""
    return np.arange(floats, dtype=np.float64) + float(index * floats)


def scatter(params):
    for i in range(params["units"]):
        yield {"i": i, "floats": params["floats"], "sleep": params["sleep"]}


def compute(unit):
    time.sleep(unit["sleep"])
    return {"i": unit["i"], "at": unit_index(), "v": values(unit["i"], unit["floats"])}


def count(params):
    return params["units"]


def gather(results, params):
    bad = [k for k, r in enumerate(results)
           if r is None or r["i"] != k or r["at"] != k
           or not np.array_equal(r["v"], values(k, params["floats"]))]
    return {"units": len(results), "bad": bad}
