"""The ``cluster`` command. The only module that knows all the others; it parses, delegates and
maps errors to exit codes (``errors.ExitCode``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from . import (
    __version__,
    config,
    control,
    credentials,
    history,
    joblogs,
    jobs,
    output,
    progress,
    settings,
    status,
    wheelhouse,
    workdir,
)
from .agent import Agent, AgentSettings, choose_cpus
from .broker import Broker
from .config import ClusterConfig
from .console import STDERR, say
from .coordinator import Coordinator, RunOptions, Write
from .credentials import Credentials, resolve
from .destination import Destination
from .doctor import Doctor
from .entries import LogRecord
from .errors import ClusterError, ExitCode, JobCancelled, ResultNotPrinted, UsageError
from .jobfile import Job, load_job, parse_params
from .launcher import Launcher
from .local import LocalCluster
from .neighbours import RunLock
from .recorder import Recorder
from .remote import HostReport
from .requirements import Installed, check_hosts
from .results import RunResult
from .resume import identity

EXIT_INTERNAL = 70


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line and the usage exit code
        self.exit(ExitCode.USAGE, f"{STDERR.stamp()}cluster: error: {message} "
                  "(see cluster --help)\n")


def within(accepted: settings.Range) -> Callable[[str], float]:
    """An argparse type: the flag's value if ``accepted``, else a one-line error naming it."""

    def parse(text: str) -> float:
        try:
            return accepted.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cluster", description="Run a numeric Python job on every core of "
                    "many machines, through Redis.")
    parser.add_argument("--version", action="version", version=f"cluster {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    submit = commands.add_parser("submit", help="run a job file and print or write its result")
    submit.add_argument("job", help="the job file (scatter, compute, gather)")
    submit.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                        help="set a job parameter (JSON value, else a string); repeatable")
    submit.add_argument("--seed", type=within(settings.SEED), help="seed of every unit's generator "
                        "(default: the job's SEED, else 0)")
    submit.add_argument("--output", "-o", metavar="FILE", help="write the result to FILE (.npy, "
                        ".npz, .json, .png), through a temporary file renamed into place; {job}, "
                        "{date}, {time} and {id} in FILE are replaced")
    submit.add_argument("--print", choices=output.PRINT_MODES, default="auto",
                        help="the result on stdout: json, text or none (default: text on a "
                        "terminal, else json)")
    submit.add_argument("--timeout", type=within(settings.TIMEOUT), metavar="SECONDS",
                        help="give up after SECONDS (exit code 4)")
    submit.add_argument("--worker-timeout", type=within(settings.WORKER_TIMEOUT), default=30.0,
                        metavar="SECONDS",
                        help="fail when no worker is alive for this long (default 30)")
    submit.add_argument("--max-attempts", type=within(settings.MAX_ATTEMPTS), default=3,
                        help="attempts per unit before the job fails (default 3)")
    submit.add_argument("--max-failed", type=within(settings.MAX_FAILED), default=0,
                        help="units allowed to fail for good; they gather as None (default 0)")
    submit.add_argument("--lease", type=within(settings.LEASE), metavar="SECONDS",
                        help="a worker whose lease is not renewed this long is lost (default: "
                        "hosts.ini's lease, else 5)")
    submit.add_argument("--resume", metavar="JOB_ID", help="pick up this unfinished job (the "
                        "same job file and params); on a running cluster, re-running the same "
                        "command resumes its unfinished job by itself")
    submit.add_argument("--fresh", action="store_true",
                        help="start a new job even if an unfinished one of the same job, "
                        "params and seed is there")
    submit.add_argument("--overlap", choices=control.OVERLAP, default="forbid",
                        help="when the same job (same file, directory, params and seed, or "
                        "--name) already runs on this cluster: forbid (exit 6), wait for it, "
                        "replace it (cancel it, then run), or allow both (default forbid)")
    submit.add_argument("--name", help="the job goes by this name rather than by its code and "
                        "params, for --overlap and resuming")
    submit.add_argument("--keep", type=within(settings.KEEP_HOURS), default=24.0,
                        metavar="HOURS",
                        help="keep an unfinished job resumable this long (default 24)")
    submit.add_argument("--redis-grace", type=within(settings.REDIS_GRACE), default=60.0,
                        metavar="SECONDS",
                        help="ride out a Redis outage this long (default 60)")
    submit.add_argument("--max-result-size", type=within(settings.MAX_RESULT_MB),
                        default=256.0, metavar="MB",
                        help="largest encoded unit or result; a larger one fails its unit "
                        "(default 256)")
    submit.add_argument("--workdir", metavar="DIR", help="the directory shipped to workers, "
                        "their working directory and first on sys.path (default: the job "
                        "file's directory)")
    submit.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="do not ship files or directories matching PATTERN (a glob on the "
                        "name or the path in the directory); repeatable")
    submit.add_argument("--max-workdir-size", type=within(settings.MAX_WORKDIR_MB),
                        default=workdir.DEFAULT_MAX_BYTES / 1e6, metavar="MB",
                        help="largest job directory to ship, before compression (default 20)")
    submit.add_argument("--logs", action="store_true",
                        help="show what compute writes (stdout, stderr, logging) on stderr as "
                        "it arrives, each line prefixed with host and unit")
    submit.add_argument("--max-log-size", type=within(settings.MAX_LOG_MB), default=32.0,
                        metavar="MB", help="what compute writes, kept for the whole job; the "
                        "rest is dropped and counted (default 32; 64 KB per stream per unit)")
    submit.add_argument("--no-speculate", dest="speculate", action="store_false",
                        help="no speculative copies of straggling units")
    submit.add_argument("--cores", type=within(settings.CORES),
                        help="local cluster only: workers to start (default: one per core)")
    submit.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                        help="progress display (default: a bar on a terminal, else lines)")
    submit.add_argument("--summary-json", metavar="FILE", help="write the run's record (state, "
                        "exit code, units, hosts, failed units, times, output) to FILE as JSON, "
                        "whatever the outcome; - for one line on stderr")
    _connection_flags(submit)
    submit.set_defaults(func=cmd_submit, log_level="WARNING")

    submit.add_argument("--hosts", metavar="HOSTS_INI",
                        help="submit to the cluster that cluster up started from this file")

    logs = commands.add_parser("logs", help="what compute wrote, per unit, during and after a "
                               "run")
    logs.add_argument("job_id", metavar="JOB_ID")
    logs.add_argument("--unit", type=int, metavar="N", help="only unit N")
    logs.add_argument("--host", metavar="HOST", help="only units that ran on HOST")
    logs.add_argument("--failed", action="store_true", help="only failed attempts, with their "
                      "tracebacks")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep showing new output until the job ends")
    logs.add_argument("--hosts", metavar="HOSTS_INI", help="the cluster cluster up started "
                      "from this file (none of --hosts, --redis, --credentials: a local run's "
                      "logs, kept on this machine)")
    _connection_flags(logs)
    logs.set_defaults(func=cmd_logs, log_level="WARNING")

    cancel = commands.add_parser("cancel", help="stop a running job, from any machine that "
                                 "reaches the cluster's Redis")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument("--hosts", metavar="HOSTS_INI", help="the cluster cluster up started "
                        "from this file")
    cancel.add_argument("--wait", type=within(settings.WORKER_TIMEOUT), default=30.0,
                        metavar="SECONDS", help="how long its coordinator may take to stop "
                        "(default 30)")
    _connection_flags(cancel)
    cancel.set_defaults(func=cmd_cancel, log_level="WARNING")

    up = commands.add_parser("up", help="ship, install and start agents on every host")
    up.add_argument("hosts", metavar="HOSTS_INI")
    up.add_argument("--accept-new-host-keys", action="store_true",
                    help="trust hosts seen for the first time (their keys are recorded); a "
                    "changed key is still refused")
    up.add_argument("--allow-partial", action="store_true",
                    help="exit 0 even if some hosts failed")
    up.add_argument("--wheelhouse", metavar="DIR", help="ship these wheels instead of building")
    up.set_defaults(func=cmd_up, log_level="WARNING")

    down = commands.add_parser("down", help="stop every agent and worker, and the Redis up "
                               "started")
    down.add_argument("hosts", metavar="HOSTS_INI")
    down.add_argument("--keep-redis", action="store_true", help="leave Redis running")
    down.set_defaults(func=cmd_down, log_level="WARNING")

    status = commands.add_parser("status", help="hosts, agents and workers, from Redis")
    status.add_argument("hosts", metavar="HOSTS_INI", nargs="?")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _connection_flags(status)
    status.set_defaults(func=cmd_status, log_level="WARNING")

    listing = commands.add_parser("jobs", help="the jobs running on a cluster, and recent runs")
    listing.add_argument("--limit", type=within(settings.RUNS_SHOWN), default=20,
                         metavar="N", help="recent runs shown (default 20)")
    _history_flags(listing)
    listing.set_defaults(func=cmd_jobs, log_level="WARNING")

    show = commands.add_parser("show", help="one job's runs in detail: outcome, units, failed "
                               "units with their hosts and tracebacks")
    show.add_argument("job_id", metavar="JOB_ID")
    _history_flags(show)
    show.set_defaults(func=cmd_show, log_level="WARNING")

    doctor = commands.add_parser("doctor", help="what would stop up, host by host; changes "
                                 "nothing")
    doctor.add_argument("hosts", metavar="HOSTS_INI")
    doctor.set_defaults(func=cmd_doctor, log_level="WARNING")

    agent = commands.add_parser("agent", help="run this host's agent and its workers")
    _connection_flags(agent)
    agent.add_argument("--cpus", help="CPUs to use, e.g. 0-3,8 (default: all)")
    agent.add_argument("--cores", type=within(settings.CORES), help="use the first N CPUs")
    agent.add_argument("--threads", type=within(settings.THREADS), default=1,
                       help="OMP/OpenBLAS/MKL threads per worker (default 1)")
    agent.add_argument("--name", help="host name reported to the cluster (default: hostname)")
    agent.add_argument("--heartbeat", type=within(settings.HEARTBEAT),
                       default=settings.HEARTBEAT_S, metavar="SECONDS",
                       help="heartbeat and lease renewal interval (default 0.5)")
    agent.add_argument("--redis-grace", type=within(settings.REDIS_GRACE), default=60.0,
                       metavar="SECONDS",
                       help="stop when Redis is unreachable this long (default 60)")
    agent.add_argument("--pidfile", help="write the agent's pid to this file while it runs")
    agent.add_argument("--no-pin", dest="pin", action="store_false",
                       help="do not pin workers to CPUs (they share the CPUs chosen)")
    agent.add_argument("--cache-dir", metavar="DIR", help="where job directories are unpacked "
                       "(default: $XDG_CACHE_HOME/cluster, else ~/.cache/cluster)")
    agent.add_argument("--log-level", default="INFO")
    agent.set_defaults(func=cmd_agent)
    return parser


def _history_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--hosts", metavar="HOSTS_INI", help="the cluster cluster up started "
                        "from this file (none of --hosts, --redis, --credentials: the runs "
                        "recorded on this machine)")
    _connection_flags(parser)


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", metavar="URL", help="redis://host:port of a running cluster "
                        "(or CLUSTER_REDIS_URL); password from CLUSTER_REDIS_PASSWORD")
    parser.add_argument("--credentials", metavar="FILE",
                        help="JSON credentials file (mode 0600), as written by cluster up")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.func(args))
    except ClusterError as exc:
        return _fail(str(exc), exc.detail, exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", "", ExitCode.INTERRUPTED)
    except BrokenPipeError:  # `cluster logs ... | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        return 128 + signal.SIGPIPE
    except redis.RedisError as exc:
        return _fail(f"Redis error: {exc}", "", ExitCode.INFRA)
    except Exception as exc:  # noqa: BLE001 - a bug of ours: say so, in one line by default
        detail = traceback.format_exc() if os.environ.get("CLUSTER_DEBUG") else ""
        return _fail(f"internal error: {type(exc).__name__}: {exc} "
                     "(set CLUSTER_DEBUG=1 for a traceback)", detail, EXIT_INTERNAL)


def _fail(message: str, detail: str, code: int) -> int:
    say(f"cluster: error: {message}", detail)
    return int(code)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


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


def named_cluster(args: argparse.Namespace) -> tuple[ClusterConfig | None, Credentials | None]:
    """The cluster a command names: ``--hosts`` (hosts.ini), else ``--redis`` or
    ``--credentials``; no credentials when it names none."""
    cfg = config.load(args.hosts) if args.hosts else None
    if cfg is not None:
        return cfg, credentials.for_cluster(cfg, create=False)
    return None, resolve(args.redis, args.credentials)


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


def cmd_up(args: argparse.Namespace) -> int:
    cfg = config.load(args.hosts)
    house = wheelhouse.prepare(Path(args.wheelhouse) if args.wheelhouse else None,
                               requirements=cfg.requirements, packages=cfg.packages)
    creds = credentials.for_cluster(cfg, create=True)
    reports = Launcher(cfg, creds, args.accept_new_host_keys, house).up()
    print(report_table(reports, with_agent=True))
    failed = [r for r in reports if not r.ok]
    if failed and not args.allow_partial:
        return _fail(f"{len(failed)} of {len(reports)} hosts failed: "
                     f"{', '.join(r.host for r in failed)}", "", ExitCode.INFRA)
    return ExitCode.OK


def cmd_down(args: argparse.Namespace) -> int:
    cfg = config.load(args.hosts)
    creds = credentials.for_cluster(cfg, create=False)
    reports = Launcher(cfg, creds).down(keep_redis=args.keep_redis)
    print(report_table(reports))
    failed = [r for r in reports if not r.ok]
    return _fail(f"{len(failed)} hosts failed", "", ExitCode.INFRA) if failed else ExitCode.OK


def cmd_doctor(args: argparse.Namespace) -> int:
    cfg = config.load(args.hosts)
    creds = credentials.for_cluster(cfg, create=False) if cfg.credentials_file.exists() \
        else Credentials(cfg.redis_address(), None, b"", cfg.prefix)
    reports = Doctor(Launcher(cfg, creds)).run()
    print(report_table(reports))
    bad = [r.host for r in reports if not r.ok]
    if bad:
        return _fail(f"problems on {', '.join(bad)}", "", ExitCode.INFRA)
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    cfg, creds = named_cluster(args)
    if creds is None:
        raise UsageError("cluster status needs HOSTS_INI, --redis URL or --credentials FILE")
    broker = Broker.connect(creds.redis_url, creds.password, prefix=creds.prefix)
    lease_s = cfg.lease if cfg else settings.LEASE_S
    agents = status.collect(broker, lease_ms=int(lease_s * 1000))
    print(json.dumps(status.as_json(agents), indent=1) if args.json else status.render(agents))
    return ExitCode.OK


def cmd_jobs(args: argparse.Namespace) -> int:
    with _history_broker(args) as broker:
        live = jobs.running(broker) if broker else None
        runs = jobs.recent(broker, int(args.limit))
        where = broker.where if broker else None
    print(json.dumps(jobs.as_json(live, runs, where), indent=1) if args.json
          else jobs.render(live, runs, where))
    return ExitCode.OK


def cmd_show(args: argparse.Namespace) -> int:
    with _history_broker(args) as broker:
        live = next(iter(jobs.running(broker, [args.job_id])), None) if broker else None
        runs = jobs.runs_of(broker, args.job_id)
        where = f"Redis at {broker.where} or " if broker else ""
    if live is None and not runs:
        raise UsageError(f"job {args.job_id}: not running, and no record of it in {where}"
                         f"{history.local_path()}")
    print(json.dumps(jobs.show_json(args.job_id, live, runs), indent=1) if args.json
          else jobs.render_show(args.job_id, live, runs))
    return ExitCode.OK


@contextmanager
def _history_broker(args: argparse.Namespace) -> Iterator[Broker | None]:
    """The cluster that ``--hosts``, ``--redis`` or ``--credentials`` name, or None."""
    cfg, creds = named_cluster(args)
    if creds is None:
        yield None
        return
    broker = Broker.connect(creds.redis_url, creds.password, prefix=creds.prefix)
    try:
        yield broker
    finally:
        broker.close()


def cmd_logs(args: argparse.Namespace) -> int:
    cfg, creds = named_cluster(args)

    def show(record: LogRecord) -> None:
        for _ in joblogs.select([record], args.unit, args.host, args.failed):
            print("\n".join(record.lines()), flush=True)

    if creds is None:
        records = joblogs.load_local(args.job_id)
        if records is None:
            raise UsageError(f"job {args.job_id}: no logs of a local run on this machine (in "
                             f"{joblogs.local_dir()}); for a running cluster, give --hosts, "
                             "--redis or --credentials")
        for record in records:
            show(record)
        return ExitCode.OK
    broker = Broker.connect(creds.redis_url, creds.password, prefix=creds.prefix)
    try:
        if not broker.logs_exist(args.job_id) and not broker.job_exists(args.job_id):
            raise UsageError(f"job {args.job_id}: no logs in Redis at {broker.where} (its "
                             "compute wrote nothing, or they expired --keep hours after it "
                             "ended)")
        joblogs.follow(broker, args.job_id, show, forever=args.follow)
    finally:
        broker.close()
    return ExitCode.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    cfg, creds = named_cluster(args)
    if creds is None:
        raise UsageError("cluster cancel needs --hosts HOSTS_INI, --redis URL or --credentials "
                         "FILE (a private local cluster is stopped with its submit: Ctrl-C)")
    broker = Broker.connect(creds.redis_url, creds.password, prefix=creds.prefix)
    try:
        how = control.cancel(broker, args.job_id, f"cluster cancel on {socket.gethostname()}",
                             wait_s=args.wait)
    finally:
        broker.close()
    print(f"job {args.job_id} cancelled: {how}")
    return ExitCode.OK


def report_table(reports: list[HostReport], with_agent: bool = False) -> str:
    """One row per host: its outcome, or the error that stopped it."""
    rows = [["HOST", "CPUS", "PID", "VERSION", "STATE"] if with_agent else ["HOST", "STATE"]]
    for r in reports:
        state = r.state if r.ok else f"FAILED: {'; '.join(r.problems)}"
        if r.ok and r.problems:
            state += ": " + "; ".join(r.problems)
        if not r.ok and r.state not in ("failed", ""):
            state = f"{r.state.upper()}: {'; '.join(r.problems)}"
        rows.append([r.host, r.cpus, str(r.pid or ""), r.version, state] if with_agent
                    else [r.host, state])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) +
                     "  " + row[-1] for row in rows)


def run_job(creds: Credentials, job: Job, params: dict[str, Any], options: RunOptions,
            progress_mode: str, run: Recorder, write: Write | None = None) -> RunResult:
    # a socket timeout short enough that a silently dropped connection costs little of the
    # grace, long enough for the largest reply (a result of --max-result-size)
    broker = Broker.connect(creds.redis_url, creds.password, prefix=creds.prefix,
                            socket_timeout=15.0, retry_s=options.redis_grace_s)
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


def cmd_agent(args: argparse.Namespace) -> int:
    creds = resolve(args.redis, args.credentials)
    if creds is None:
        raise UsageError("cluster agent needs --redis URL, CLUSTER_REDIS_URL or --credentials")
    settings = AgentSettings(cpus=choose_cpus(args.cpus, args.cores),
                             host=args.name or socket.gethostname(),
                             threads=args.threads, heartbeat_s=args.heartbeat,
                             redis_grace_s=args.redis_grace, log_level=args.log_level.upper(),
                             pidfile=args.pidfile, cache_dir=args.cache_dir, pin=args.pin)
    # a short socket timeout: a silently cut network must not stall heartbeats past the grace
    broker = Broker.connect(creds.redis_url, creds.password, prefix=creds.prefix,
                            socket_timeout=max(1.0, 4 * args.heartbeat),
                            retry_s=min(args.redis_grace, 10.0))
    agent = Agent(broker, creds, settings)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    return agent.run()
