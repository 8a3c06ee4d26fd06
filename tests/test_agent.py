"""The agent: one pinned worker per CPU, single-threaded numeric libraries, leases on Redis time,
respawn after a death, nothing left after it stops."""

import os
import signal

import psutil
import pytest
from conftest import plain, run_cli
from waiting import wait_for

from cluster.errors import UsageError
from cluster.settings import parse_cpus


def configured(agent):
    """The agent's children that it made workers: it sent them their configuration and logged
    it. The others are spares (or not yet configured), waiting to become one."""
    log = agent.log.read_text(errors="replace")
    found = []
    for child in psutil.Process(agent.proc.pid).children(recursive=True):  # of its fork server
        try:
            if f"(pid {child.pid}," in log and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def workers_of(agent, count):
    """The agent's ``count`` workers, once it has started them all."""
    return wait_for(lambda: (lambda w: w if len(w) == count else None)(configured(agent)),
                    20, f"the agent to start {count} workers")


def worker_pins(agent, only_configured=False):
    """{pid: CPUs it may run on} of the agent's worker processes visible now (spares too,
    unless ``only_configured``). A child that has not yet executed the worker (a fork of the
    agent, between fork and exec) is no worker yet."""
    pins = {}
    chosen = {c.pid for c in configured(agent)} if only_configured else None
    for child in psutil.Process(agent.proc.pid).children(recursive=True):
        try:
            named = "cluster.worker" in " ".join(child.cmdline())  # not its fork server
            if named and (chosen is None or child.pid in chosen):
                pins[child.pid] = tuple(child.cpu_affinity())
        except psutil.NoSuchProcess:
            continue
    return pins


def test_every_worker_is_pinned_to_its_own_cpu_from_its_first_moment(agent, broker):
    count = min(2, os.cpu_count() or 1)
    seen = {}

    def every_worker_seen():
        # every sighting counts, from the first moment a worker is visible
        for pid, cpus in worker_pins(agent).items():  # spares too
            assert len(cpus) == 1, f"worker {pid} may run on CPUs {cpus}: not pinned"
            seen.setdefault(pid, cpus)
        return len(seen) >= count

    wait_for(every_worker_seen, 20, f"{count} workers", interval=0.001)
    workers = workers_of(agent, count)
    assert sorted(seen[w.pid] for w in workers) == [(cpu,) for cpu in range(count)]  # distinct
    for p in workers_of(agent, count):
        env = p.environ()
        assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
    wait_for(lambda: len(broker.live_workers(2000)) == count, 10, f"{count} live workers")
    assert len(broker.live_agents(2000)) == 1


def test_status_shows_each_workers_load_and_memory_from_one_write_per_agent(agent, broker):
    from cluster import status

    count = min(2, os.cpu_count() or 1)
    pids = {p.pid for p in workers_of(agent, count)}

    def measured():
        rows = [w for a in status.collect(broker, 60_000) for w in a.workers if w.pid in pids]
        return rows if len(rows) == count and all(w.rss_mb for w in rows) else None

    rows = wait_for(measured, 20, "every worker's usage published")  # every 2 s
    assert all(w.load is not None for w in rows)
    assert all(broker.client.hget(broker.keys.worker(w.id), "rss") is None for w in rows)


def test_a_dead_worker_is_replaced_by_a_pinned_one(agent, broker):
    count = min(2, os.cpu_count() or 1)
    victim = workers_of(agent, count)[0]
    victim.send_signal(signal.SIGKILL)

    def replaced():
        pins = worker_pins(agent, only_configured=True)
        return pins if len(pins) == count and victim.pid not in pins else None

    pins = wait_for(replaced, 10, "the killed worker to be replaced")
    assert sorted(pins.values()) == [(cpu,) for cpu in range(count)]
    log = agent.stop()
    assert "killed by SIGKILL" in log


@pytest.mark.skipif(os.geteuid() != 0, reason="spares start at idle priority as root only")
def test_a_spare_process_replaces_a_worker_at_once(agent, broker):
    """Each CPU keeps a spare worker process (imported, at idle priority as root); a worker
    that exits is replaced by its CPU's spare, raised to normal priority, and a new spare
    follows."""
    count = min(2, os.cpu_count() or 1)
    workers = workers_of(agent, count)

    def spares():
        ours = {w.pid for w in configured(agent)}
        found = {pid: cpus for pid, cpus in worker_pins(agent).items() if pid not in ours}
        return found if len(found) == count else None

    before = wait_for(spares, 20, f"{count} spare worker processes")
    assert sorted(before.values()) == [(cpu,) for cpu in range(count)]
    assert all(os.sched_getscheduler(pid) == os.SCHED_IDLE for pid in before)
    victim = workers[0]
    victim_cpus = tuple(victim.cpu_affinity())
    victim.send_signal(signal.SIGKILL)
    successor = wait_for(lambda: (lambda new: new[0] if new else None)(
        [w for w in configured(agent) if w.pid not in {v.pid for v in workers}]), 10,
        "the killed worker's successor")
    assert successor.pid in before, "the successor is not the spare started before"
    assert before[successor.pid] == victim_cpus  # the spare of the victim's CPU
    assert os.sched_getscheduler(successor.pid) == os.SCHED_OTHER
    wait_for(lambda: (lambda s: s and successor.pid not in s)(spares()), 10, "a new spare")
    agent.stop()
    assert agent.proc.returncode == 0


def test_workers_come_from_the_fork_server_and_are_spawned_when_it_died(agent, broker):
    count = min(2, os.cpu_count() or 1)
    first = workers_of(agent, count)
    [forks] = [c for c in psutil.Process(agent.proc.pid).children()
               if "cluster.forkserver" in c.cmdline()]
    assert all(w.ppid() == forks.pid for w in first)  # forked, not started as a Python
    forks.send_signal(signal.SIGKILL)  # its workers die with it
    psutil.wait_procs(first, timeout=10)

    def spawned():
        workers = [w for w in configured(agent) if w.pid not in {p.pid for p in first}]
        return workers if len(workers) == count else None

    again = wait_for(spawned, 30, f"{count} workers started again")
    assert all(w.ppid() == agent.proc.pid and "cluster.worker" in w.cmdline() for w in again)
    wait_for(lambda: len(broker.live_workers(2000)) == count, 20, f"{count} live workers")
    assert "each worker starts a Python from now on" in agent.log.read_text()
    agent.stop()
    assert agent.proc.returncode == 0


def test_stopping_the_agent_stops_its_workers_and_unregisters(agent, broker):
    children = workers_of(agent, min(2, os.cpu_count() or 1))
    agent.stop()
    assert agent.proc.returncode == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    assert broker.live_agents(60_000) == [] and broker.live_workers(60_000) == []


def test_shutdown_key_stops_every_agent(agent, broker):
    workers_of(agent, min(2, os.cpu_count() or 1))
    broker.client.set(broker.keys.shutdown, 1)
    assert agent.proc.wait(20) == 0


def test_sigkill_of_the_agent_takes_its_workers_along(agent):
    children = workers_of(agent, min(2, os.cpu_count() or 1))
    agent.proc.send_signal(signal.SIGKILL)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def test_cpu_lists():
    assert parse_cpus("0-3,8") == (0, 1, 2, 3, 8)
    for bad in ("", "a", "3-1,1", "1,1"):
        with pytest.raises(UsageError):
            parse_cpus(bad)


def test_worker_user_is_checked_before_anything_starts(creds_file, tmp_path):
    """--worker-user names a user of this host and needs a cache directory for it
    (``accounts``); each mistake is one line and exit 2, before any worker runs."""
    base = ("agent", "--credentials", str(creds_file), "--cores", "1")
    unknown = run_cli(*base, "--worker-user", "no-such-user-here", "--cache-dir",
                      str(tmp_path / "cache"), timeout=30)
    assert unknown.returncode == 2, unknown.stderr
    assert plain(unknown.stderr).strip() == (
        "cluster: error: --worker-user no-such-user-here: no such user on this host")
    no_cache = run_cli(*base, "--worker-user", "nobody", timeout=30)
    assert no_cache.returncode == 2 and "needs --cache-dir" in no_cache.stderr, no_cache.stderr
