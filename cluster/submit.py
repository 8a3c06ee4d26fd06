"""``cluster submit``: load and pack the job, choose the cluster (a private local one, or the
one the flags name), run the coordinator, then write, print and report the result."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import output, progress, settings, workdir
from .arguments import named_cluster
from .broker import Broker
from .config import ClusterConfig
from .console import say
from .coordinator import Coordinator, RunOptions, Write
from .credentials import Credentials
from .destination import Destination
from .errors import ExitCode, JobCancelled, ResultNotPrinted, UsageError
from .jobfile import Job, load_job, parse_params
from .local import LocalCluster
from .neighbours import RunLock
from .recorder import Recorder
from .requirements import Installed, check_hosts
from .results import RunResult
from .resume import identity
from .spawn import choose_cpus


def cmd_submit(args: argparse.Namespace) -> int:
    # the run's record, whatever the outcome
    with Recorder(args.summary_json, job_name=Path(args.job).stem) as run:
        return run.ended(submit_and_show(args, run))


def submit_and_show(args: argparse.Namespace, run: Recorder) -> int:
    mode = output.print_mode(args.print, terminal=sys.stdout.isatty())
    destination = Destination(args.output, Path(args.job).stem) if args.output else None
    with output.stdout_to_stderr():  # job code and a local cluster's workers print to stderr
        name, result = submit_job(args, run, destination)
    written = destination.written if destination else None
    if written:
        run.output = str(written)
        say(f"result written to {written}")
    problem = output.show(result.value, mode, sys.stdout)
    report(result, args)
    if problem and written:
        say(f"result not printed: {problem}; it is in {written}")
    elif problem:
        raise ResultNotPrinted(problem, str(output.keep(f"{name}-{result.jid}", result.value)))
    if destination:
        destination.check_written(result.jid)
    return ExitCode.PARTIAL if result.failed else ExitCode.OK


def submit_job(args: argparse.Namespace, run: Recorder,
               destination: Destination | None = None) -> tuple[str, RunResult]:
    """Run the job ``args`` name, writing its result to ``destination`` (checked before the
    job runs): the job's name and what the run returned."""
    job = load_job(args.job, args.workdir)
    params = parse_params(args.param, job.defaults)
    job = dataclasses.replace(job, archive=workdir.pack(
        Path(args.job), Path(args.workdir) if args.workdir else None, args.exclude,
        int(args.max_workdir_size * 1e6)))
    if destination:
        destination.check()
    write = destination.write if destination else None
    cfg, creds = named_cluster(args)
    check_local_flags(args, local=creds is None)
    run.submitting(job, creds, cfg.history_days if cfg else settings.DEFAULT_HISTORY_DAYS)
    options = RunOptions(seed=args.seed, max_attempts=args.max_attempts,
                         max_failed=args.max_failed, timeout=args.timeout,
                         worker_timeout=args.worker_timeout,
                         lease_s=submit_lease(args.lease, cfg, local=creds is None),
                         redis_grace_s=args.redis_grace, keep_s=int(args.keep * 3600),
                         speculate=args.speculate, resume=args.resume,
                         max_result_bytes=int(args.max_result_size * 1e6),
                         auto_resume=creds is not None, fresh=args.fresh,
                         max_log_bytes=int(args.max_log_size * 1e6), stream_logs=args.logs,
                         keep_logs_locally=creds is None, overlap=args.overlap,
                         name=args.name)
    if creds is None:
        check_hosts(job.path, job.requirements, [Installed.here("this environment")],
                    f"install it for {sys.executable} (the local cluster runs it)")
        lock = local_lock(job, params, options)
        try:
            with LocalCluster(cores=args.cores) as local:
                return job.name, run_job(local, job, params, options, args.progress, run, write)
        finally:
            if lock is not None:
                lock.release()
    return job.name, run_job(creds, job, params, options, args.progress, run, write)


def local_lock(job: Job, params: dict[str, Any], options: RunOptions) -> RunLock | None:
    """A local run of the job holds its machine-wide lock (``--overlap``; none with allow). A
    newer run that replaces this one signals it (SIGUSR1): its job is cancelled."""
    if options.overlap == "allow":
        return None
    seed = job.seed if options.seed is None else options.seed
    lock = RunLock(f"name:{options.name}" if options.name else identity(job, params, seed))
    timeout = options.timeout if options.timeout is not None else options.keep_s
    lock.acquire(options.overlap, time.monotonic() + timeout)
    signal.signal(signal.SIGUSR1, _replaced)
    return lock


def _replaced(signum: int, frame: object) -> None:
    raise JobCancelled("replaced by a newer run of the same job on this machine "
                       "(--overlap replace)")


def report(result: RunResult, args: argparse.Namespace) -> None:
    """The run's summary on stderr, and units per host when there were several."""
    say(result.summary())
    if result.stats.get("log_bytes") and not args.logs:
        say(f"compute wrote output: cluster logs {result.jid}{where_flags(args)}")
    if len(result.tally.hosts()) > 1:
        per_host = ", ".join(f"{h} {n}" for h, n in sorted(result.tally.by_host().items()))
        say(f"units per host: {per_host}")


def where_flags(args: argparse.Namespace) -> str:
    """The flags that name the cluster a command used, for a command to suggest."""
    for flag in ("hosts", "credentials", "redis"):
        if getattr(args, flag, None):
            return f" --{flag} {getattr(args, flag)}"
    return ""


def check_local_flags(args: argparse.Namespace, local: bool) -> None:
    """--cores only for a local cluster, and within this machine; --resume only for a
    running cluster."""
    if local and args.resume:
        raise UsageError("--resume needs a running cluster (--redis, --credentials or --hosts): "
                         "a private local cluster does not outlive its submit")
    if args.cores is None:
        return
    if not local:
        raise UsageError(f"--cores {args.cores}: only for a private local cluster; the agents "
                         "of a running cluster choose their CPUs (cores = ... in hosts.ini, or "
                         "cluster agent --cores)")
    choose_cpus(None, args.cores)


def submit_lease(given: float | None, cfg: ClusterConfig | None, local: bool) -> float:
    """--lease, else hosts.ini's lease, else the default. Where the agents' heartbeat is known
    (hosts.ini's, or a local cluster's default), the lease must outlast two of them."""
    lease = given if given is not None else (cfg.lease if cfg else settings.LEASE_S)
    heartbeat = cfg.heartbeat if cfg else settings.HEARTBEAT_S if local else None
    problem = settings.lease_problem(lease, heartbeat) if heartbeat is not None else None
    if problem:
        source = f"heartbeat of {cfg.path}" if cfg else "a local cluster's agent"
        raise UsageError(f"--lease {lease:g} {problem} ({source})")
    return lease


def run_job(creds: Credentials, job: Job, params: dict[str, Any], options: RunOptions,
            progress_mode: str, run: Recorder, write: Write | None = None) -> RunResult:
    # a socket timeout short enough that a silently dropped connection costs little of the
    # grace, long enough for the largest reply (a result of --max-result-size)
    broker = Broker.of(creds, socket_timeout=15.0, retry_s=options.redis_grace_s)
    try:
        if job.requirements:  # agents that join later are not checked (README)
            hosts = broker.live_agents_info(int(options.lease_s * 1000))
            check_hosts(job.path, job.requirements, map(Installed.from_agent, hosts),
                        "list it in requirements in hosts.ini and run cluster up")
        coordinator = Coordinator(broker, job, params, creds.key, options,
                                  progress.reporter(progress_mode))
        run.watch(coordinator)
        return coordinator.run(write)
    finally:
        broker.close()
