"""compute writes in every way it can: print, os.write, C stdio, logging, a child process.
Param ``fail``: the unit that raises; ``big``: the unit that prints ``big`` bytes; ``gate``: a
file that must exist before units past the first return (so a test can watch a running job)."""

import ctypes
import logging
import os
import subprocess
import sys
import time

print("importing talky")
PARAMS = {"units": 4, "fail": -1, "big": -1, "size": 0, "gate": ""}
libc = ctypes.CDLL(None)


def scatter(params):
    print("scatter says hello")
    for i in range(params["units"]):
        yield {"i": i, **params}


def compute(unit):
    i = unit["i"]
    print(f"print of unit {i}")
    os.write(1, f"fd1 of unit {i}\n".encode())
    os.write(2, f"fd2 of unit {i}\n".encode())
    libc.printf(f"C printf of unit {i}\n".encode())
    libc.fflush(None)
    logging.getLogger("talky").warning("logging of unit %d", i)
    subprocess.run(["echo", f"child of unit {i}"], check=True)
    print(f"stderr print of unit {i}", file=sys.stderr)
    if i == unit["big"]:
        print("x" * unit["size"])
    if i == unit["fail"]:
        raise ValueError(f"unit {i} fails on purpose")
    while i > 0 and unit["gate"] and not os.path.exists(unit["gate"]):
        time.sleep(0.01)
    return i


def gather(results, params):
    print("gather says hello")
    return sum(r or 0 for r in results)
