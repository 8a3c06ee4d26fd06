"""Worker processes as the agent starts them: on which CPUs (``choose_cpus``), pinned to one
(the child pins itself between fork and exec), as which user (``WorkerUser``), dying with the
agent; whether one still runs (``is_running``) and how its exit reads (``describe_exit``)."""

from __future__ import annotations

import functools
import logging
import os
import pwd
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from .errors import UsageError
from .forkserver import ForkServer
from .proc import die_with_parent
from .settings import parse_cpus

log = logging.getLogger("cluster.agent")

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
SECRET = re.compile(r"^CLUSTER_(REDIS_|KEY|TLS_)")  # where the agent may have found its secrets


@dataclass(frozen=True)
class WorkerUser:
    """The user that workers run as (``accounts``): they cannot read the agent's credentials
    file or memory. The agent makes the job cache theirs."""

    name: str
    uid: int
    gid: int
    home: str  # their HOME: the cache directory, the one place of theirs

    @classmethod
    def prepare(cls, name: str, cache_dir: str | None) -> WorkerUser:
        if os.geteuid() != 0:
            raise UsageError(f"--worker-user {name}: only an agent run as root starts workers "
                             "as another user")
        if not cache_dir:
            raise UsageError(f"--worker-user {name} needs --cache-dir (a directory for them)")
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise UsageError(f"--worker-user {name}: no such user on this host") from None
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        if cache.stat().st_uid != entry.pw_uid:  # e.g. unpacked by workers that ran as root
            for path in (cache, *cache.rglob("*")):
                os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
        return cls(name, entry.pw_uid, entry.pw_gid, str(cache))


def worker_env(threads: int, user: WorkerUser | None = None) -> dict[str, str]:
    """Workers' environment: ours without secrets, BLAS threads set, the workers' user's HOME."""
    env = {k: v for k, v in os.environ.items() if not SECRET.search(k)}
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    return env


def available_cpus() -> tuple[int, ...]:
    try:
        return tuple(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):
        return tuple(range(os.cpu_count() or 1))


def choose_cpus(cpus: str | None, cores: int | None) -> tuple[int, ...]:
    if cpus:
        return parse_cpus(cpus)
    everything = available_cpus()
    if cores is not None:
        if not 1 <= cores <= len(everything):
            raise UsageError(f"--cores {cores}: this host has {len(everything)} usable CPUs")
        return everything[:cores]
    return everything


def pin(pid: int, cpu: int) -> bool:
    """Pin a process to one CPU; False (and a warning) where the OS cannot."""
    try:
        psutil.Process(pid).cpu_affinity([cpu])
        return True
    except AttributeError:
        log.warning("CPU affinity is not supported on this OS: workers run unpinned")
    except (psutil.Error, ValueError, OSError) as exc:
        log.warning("cannot pin pid %d to CPU %d (%s): it runs unpinned", pid, cpu, exc)
    return False


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def spawn_worker(env: dict[str, str], cpu: int, user: WorkerUser | None = None,
                 idle: bool = False, pinned: bool = True) -> subprocess.Popen[bytes]:
    """Start a worker process pinned to ``cpu``, where the OS has affinity (Linux): the child
    pins itself between fork and exec, so the worker program never runs unpinned. Elsewhere
    (macOS) it is pinned after the start where psutil can, else it warns.

    ``preexec_fn`` is unsafe in a process with threads (the child may inherit a held lock). The
    agent is single-threaded: its loop, redis-py and psutil start no threads, and ``cluster
    agent`` always runs it in a process of its own."""
    args = [sys.executable, "-m", "cluster.worker"]
    if not pinned:  # other local clusters pinned theirs: workers share the CPUs
        return _popen(args, env, functools.partial(_die_with_agent, idle), user)
    if not hasattr(os, "sched_setaffinity"):
        proc = _popen(args, env, _die_with_agent, user)
        pin(proc.pid, cpu)
        return proc
    try:
        return _popen(args, env, functools.partial(_pinned_to, cpu, idle), user)
    except subprocess.SubprocessError:  # the child could not pin itself: it did not run
        cpus = sorted(os.sched_getaffinity(0))
        log.warning("cannot pin a worker to CPU %d (this agent may use CPUs %s): it runs "
                    "unpinned", cpu, ",".join(map(str, cpus)))
        return _popen(args, env, functools.partial(_die_with_agent, idle), user)


def _popen(args: list[str], env: dict[str, str], preexec: Callable[[], None],
           user: WorkerUser | None = None, pass_fds: tuple[int, ...] = (),
           stdin: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """The child changes user (and drops every other group) before ``preexec`` runs, so the
    parent-death signal it sets is not cleared by that change."""
    if user is None:
        return subprocess.Popen(args, stdin=stdin, env=env, close_fds=True,
                                preexec_fn=preexec, pass_fds=pass_fds)
    return subprocess.Popen(args, stdin=stdin, env=env, close_fds=True, pass_fds=pass_fds,
                            preexec_fn=preexec, user=user.uid, group=user.gid, extra_groups=[],
                            cwd=user.home)


def start_fork_server(env: dict[str, str], user: WorkerUser | None = None) -> ForkServer:
    """A fork server (``forkserver``) with the workers' user and environment, dying with us."""
    def popen(args: list[str], env: dict[str, str],
              fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
        return _popen(args, env, functools.partial(die_with_parent, signal.SIGKILL), user, fds,
                      stdin=subprocess.DEVNULL)

    return ForkServer.start(env, popen)


def _pinned_to(cpu: int, idle: bool = False) -> None:
    """In the worker, between fork and exec: run on ``cpu`` only, and die with the agent.
    Raising here makes ``Popen`` raise SubprocessError in the agent, before anything runs."""
    os.sched_setaffinity(0, {cpu})
    _die_with_agent(idle)


def _die_with_agent(idle: bool = False) -> None:
    """A worker dies at once with its agent: whatever it held is reissued through its lease.
    With ``idle``, a spare: it runs only when its CPU has nothing else to do."""
    die_with_parent(signal.SIGKILL)
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def is_running(pid: int) -> bool:
    """True unless the process is gone, a zombie or stopped (SIGSTOP): those lose their lease."""
    try:
        status = psutil.Process(pid).status()
    except psutil.Error:
        return False
    return status not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD,
                          getattr(psutil, "STATUS_TRACING_STOP", "tracing-stop"))
