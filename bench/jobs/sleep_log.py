"""Job of bench/reissue.py: every unit sleeps, and logs when it starts and when it ends.

Each unit appends two lines to ``params["log"]`` (one ``write`` each, O_APPEND):
``start <index> <host> <time>`` and ``end <index> <host> <time>``, ``<time>`` being
``time.time()``. The benchmark's test hosts are network namespaces of one machine: they share its
clock and its filesystem, so the log is one file and its times compare with the benchmark's own.
The host is recognised by the worker's network namespace: ``params["hosts"]`` maps the inode of a
namespace to a host name.

cluster submit bench/jobs/sleep_log.py --hosts hosts.ini --param log=/tmp/units.log
"""

import os
import time

PARAMS = {"units": 6, "seconds": 2.0, "log": "/dev/null", "hosts": {}}


def scatter(params):
    common = {"seconds": params["seconds"], "log": params["log"], "hosts": params["hosts"]}
    return [{"i": i, **common} for i in range(params["units"])]


def count(params):
    return params["units"]


def _host(hosts):
    inode = str(os.stat("/proc/self/ns/net").st_ino)
    return hosts.get(inode, f"netns:{inode}")


def _log(path, word, index, host):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{word} {index} {host} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


def compute(unit):
    host = _host(unit["hosts"])
    _log(unit["log"], "start", unit["i"], host)
    time.sleep(unit["seconds"])
    _log(unit["log"], "end", unit["i"], host)
    return unit["i"]


def gather(results, params):
    """How many units came back with their own index (== units when all is well)."""
    return sum(1 for i, r in enumerate(results) if r == i)
