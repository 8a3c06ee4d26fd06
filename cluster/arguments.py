"""The ``cluster`` command line: every command, flag, default and help text. ``cli`` runs
the command a parse names (``args.command``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from . import control, settings, workdir
from .config import ClusterConfig
from .console import STDERR
from .credentials import Credentials, named
from .errors import ExitCode
from .version import __version__


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
    submit.add_argument("--print", choices=settings.PRINT_MODES, default="auto",
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

    cancel = commands.add_parser("cancel", help="stop a running job, from any machine that "
                                 "reaches the cluster's Redis")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument("--hosts", metavar="HOSTS_INI", help="the cluster cluster up started "
                        "from this file")
    cancel.add_argument("--wait", type=within(settings.WORKER_TIMEOUT), default=30.0,
                        metavar="SECONDS", help="how long its coordinator may take to stop "
                        "(default 30)")
    _connection_flags(cancel)

    up = commands.add_parser("up", help="ship, install and start agents on every host")
    up.add_argument("hosts", metavar="HOSTS_INI")
    up.add_argument("--accept-new-host-keys", action="store_true",
                    help="trust hosts seen for the first time (their keys are recorded); a "
                    "changed key is still refused")
    up.add_argument("--allow-partial", action="store_true",
                    help="exit 0 even if some hosts failed")
    up.add_argument("--wheelhouse", metavar="DIR", help="ship these wheels instead of building")

    rotate = commands.add_parser("rotate-key", help="a new cluster key on every host (agents "
                                 "restarted with it); refused while a job runs")
    rotate.add_argument("hosts", metavar="HOSTS_INI")

    down = commands.add_parser("down", help="stop every agent and worker, and the Redis up "
                               "started")
    down.add_argument("hosts", metavar="HOSTS_INI")
    down.add_argument("--keep-redis", action="store_true", help="leave Redis running")

    status = commands.add_parser("status", help="hosts, agents and workers, from Redis")
    status.add_argument("hosts", metavar="HOSTS_INI", nargs="?")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _connection_flags(status)

    listing = commands.add_parser("jobs", help="the jobs running on a cluster, and recent runs")
    listing.add_argument("--limit", type=within(settings.RUNS_SHOWN), default=20,
                         metavar="N", help="recent runs shown (default 20)")
    _history_flags(listing)

    show = commands.add_parser("show", help="one job's runs in detail: outcome, units, failed "
                               "units with their hosts and tracebacks")
    show.add_argument("job_id", metavar="JOB_ID")
    _history_flags(show)

    doctor = commands.add_parser("doctor", help="what would stop up, host by host; changes "
                                 "nothing")
    doctor.add_argument("hosts", metavar="HOSTS_INI")

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
    agent.add_argument("--no-fork-server", dest="fork_server", action="store_false",
                       help="start each worker as a Python of its own instead of forking it "
                            "from a process that imported the worker's code once")
    agent.add_argument("--fork-server-fd", type=int, help=argparse.SUPPRESS)  # LocalCluster's
    agent.add_argument("--no-spares", dest="spares", action="store_false",
                       help="do not keep a started worker process ready per CPU (a worker "
                            "recycled after its job is then replaced by a new process, which "
                            "imports Python and numpy first)")
    agent.add_argument("--cache-dir", metavar="DIR", help="where job directories are unpacked "
                       "(default: $XDG_CACHE_HOME/cluster, else ~/.cache/cluster)")
    agent.add_argument("--data-address", metavar="ADDRESS",
                       help="serve large results to coordinators on this address (the one "
                            "they reach this host at): they then bypass Redis")
    agent.add_argument("--spool", metavar="DIR", help="where workers put large results "
                       "for --data-address (default: a directory of its own in /dev/shm)")
    agent.add_argument("--worker-user", metavar="USER", help="as root: run the workers (job "
                       "code) as this user, which cannot read the credentials (needs --cache-dir)")
    agent.add_argument("--log-level", default=None,
                       help="DEBUG, INFO (default), WARNING or ERROR (or CLUSTER_LOG_LEVEL)")
    agent.set_defaults(default_level="INFO")
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
    parser.add_argument("--tls-ca", metavar="FILE", help="for a rediss:// URL: the CA that "
                        "signed Redis's certificate (or CLUSTER_TLS_CA)")
    parser.add_argument("--tls-cert", metavar="FILE", help="a client certificate, for a Redis "
                        "that asks for one (or CLUSTER_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="FILE", help="its key (or CLUSTER_TLS_KEY)")


def named_cluster(args: argparse.Namespace) -> tuple[ClusterConfig | None, Credentials | None]:
    """The cluster that a command's --hosts, --redis or --credentials (and --tls-*) name."""
    return named(args.hosts, args.redis, args.credentials, tls=tls_flags(args))


def tls_flags(args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    return args.tls_ca, args.tls_cert, args.tls_key
