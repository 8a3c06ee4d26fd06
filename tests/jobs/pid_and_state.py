"""Each unit returns the worker's pid and how many units this module object has seen: a
worker that ran another job before must be a fresh process with fresh module state."""
import os

PARAMS = {"units": 8}
SEEN = []


def scatter(params):
    return list(range(params["units"]))


def compute(unit):
    SEEN.append(unit)
    return {"pid": os.getpid(), "seen_before": len(SEEN) - 1}


def gather(results, params):
    return results
