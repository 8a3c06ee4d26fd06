"""Units for the chaos tests (tests/test_chaos.py): each says where it runs, takes a moment and
returns ``[index, index ** 2]``, so the gathered output can be compared with the fault-free one.

With ``log`` set, every attempt appends ``start <index> <pid> <host>`` before it works (with
`` slow`` at the end when it is the slow one, see below) and ``end <index> <pid> <host>`` after,
one ``write`` each, so a test can pick a victim mid-unit and count how often a unit ran.
``<host>`` is the name ``hosts`` gives to the network namespace the worker runs in (test hosts
are namespaces: ``{"<inode of the namespace>": "node2"}``), else ``?``.

- ``sleep``: seconds each unit takes.
- ``slow_host`` / ``slow_sleep``: the first unit to start on that host (the first to create
  ``<log>.slow``) takes ``slow_sleep`` seconds instead: a victim that is surely mid-unit.
- ``busy``: the slow unit spins in numpy instead of sleeping.
- ``raise_index``: that unit raises on every attempt.
- ``die_index``: that unit SIGKILLs its own worker on every attempt.
- ``pad``: each result also carries that many float64 values equal to its index (a large
  result, which travels through its host's spool); ``gather`` checks and drops them.
- ``hold_index``: that unit (every attempt of it) waits until the file ``release`` exists, so the
  job cannot finish before the test says so; its start line ends with `` slow`` too. It gives
  up (raises) after ``hold_max`` seconds, so that a test that never releases it fails, not hangs.
"""

import os
import signal
import time

import numpy as np

from cluster import unit_index

PARAMS = {"units": 30, "sleep": 0.2, "log": "", "hosts": {}, "slow_host": "",
          "slow_sleep": 0.0, "busy": False, "raise_index": -1, "die_index": -1,
          "hold_index": -1, "release": "", "hold_max": 90.0, "pad": 0}


def scatter(params):
    unit = {k: params[k] for k in PARAMS if k != "units"}
    for _ in range(params["units"]):
        yield unit


def _host(hosts):
    try:
        return hosts.get(str(os.stat("/proc/self/ns/net").st_ino), "?")
    except OSError:
        return "?"


def _log(path, line):
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def _first_slow(unit, host):
    if not unit["log"] or not unit["slow_host"] or host != unit["slow_host"]:
        return False
    try:
        os.close(os.open(unit["log"] + ".slow", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        return True
    except FileExistsError:
        return False


def _spin(seconds, seed):
    a = np.random.default_rng(seed).random((120, 120))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        a = a @ a
        a /= np.abs(a).max()


def _hold(index, release, most):
    deadline = time.monotonic() + most
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"unit {index} was never released")
        time.sleep(0.02)


def compute(unit):
    index = unit_index()
    host = _host(unit["hosts"])
    slow = _first_slow(unit, host)
    held = index == unit["hold_index"]
    _log(unit["log"], f"start {index} {os.getpid()} {host}" + (" slow" if slow or held else ""))
    if held:
        _hold(index, unit["release"], unit["hold_max"])
    if index == unit["die_index"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if index == unit["raise_index"]:
        raise ValueError(f"unit {index} is poison")
    seconds = unit["slow_sleep"] if slow else unit["sleep"]
    if slow and unit["busy"]:
        _spin(seconds, index)
    else:
        time.sleep(seconds)
    _log(unit["log"], f"end {index} {os.getpid()} {host}")
    if unit["pad"]:
        return {"v": [index, index ** 2], "pad": np.full(unit["pad"], float(index))}
    return [index, index ** 2]


def gather(results, params):
    if not params["pad"]:
        return results
    return [r if r is None else r["v"] if (r["pad"] == r["v"][0]).all() else "bad pad"
            for r in results]
