"""Units for the chaos tests (tests/test_chaos.py) where a job must surely still be running when
the test acts: like chaos_units.py, each unit says where it runs, takes ``sleep`` seconds and
returns ``[index, index ** 2]``, and with ``log`` set appends ``start <index> <pid> <host>`` and
``end <index> <pid> <host>``.

- ``hold_index``: that unit (every attempt of it) waits until the file ``release`` exists, so the
  job cannot finish before the test says so; its start line ends with `` slow``. It gives up
  (raises) after ``hold_max`` seconds, so that a test that never releases it fails, not hangs.
"""

import os
import time

from cluster import unit_index

PARAMS = {"units": 30, "sleep": 0.1, "log": "", "hosts": {}, "hold_index": -1, "release": "",
          "hold_max": 90.0}


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


def compute(unit):
    index = unit_index()
    host = _host(unit["hosts"])
    held = index == unit["hold_index"]
    _log(unit["log"], f"start {index} {os.getpid()} {host}" + (" slow" if held else ""))
    if held:
        deadline = time.monotonic() + unit["hold_max"]
        while not os.path.exists(unit["release"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"unit {index} was never released")
            time.sleep(0.02)
    time.sleep(unit["sleep"])
    _log(unit["log"], f"end {index} {os.getpid()} {host}")
    return [index, index ** 2]


def gather(results, params):
    return results
