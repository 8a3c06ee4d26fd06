"""A job that prints everywhere it can: at import, in scatter, compute and gather, from Python
and straight to file descriptor 1. None of it may reach the result on stdout."""

import os
import sys

print("chatty: imported")

PARAMS = {"units": 3}


def scatter(params):
    print("chatty: scatter")
    return list(range(params["units"]))


def compute(unit):
    print(f"chatty: compute {unit}", flush=True)
    sys.stdout.write("chatty: sys.stdout\n")
    sys.stdout.flush()
    os.write(1, b"chatty: fd 1 in a worker\n")
    return unit * unit


def gather(results, params):
    print("chatty: gather")
    os.write(1, b"chatty: fd 1 in the coordinator\n")
    return {"squares": results}
