"""The ``cluster`` command. The only module that knows all the others; it parses, delegates and
maps errors to exit codes (``errors.ExitCode``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from . import control, history, joblogs, jobs, settings, status
from .agent import Agent, AgentSettings
from .arguments import build_parser, named_cluster, tls_flags
from .broker import Broker
from .console import say
from .credentials import resolve
from .entries import LogRecord
from .errors import ClusterError, ExitCode, UsageError
from .spawn import choose_cpus

EXIT_INTERNAL = 70


def cmd_submit(args: argparse.Namespace) -> int:
    """``submit`` (imported here: the coordinator and numpy are not for `cluster agent`)."""
    from .submit import cmd_submit as submit

    return submit(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # precedence: the command's default < CLUSTER_LOG_LEVEL < the agent's --log-level
    level = str(getattr(args, "log_level", None) or os.environ.get("CLUSTER_LOG_LEVEL")
                or getattr(args, "default_level", "WARNING"))
    args.log_level = level.upper()
    if args.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        return _fail(f"bad log level {args.log_level!r}: DEBUG, INFO, WARNING or ERROR", "",
                     ExitCode.USAGE)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(COMMANDS[args.command](args))
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


def cmd_status(args: argparse.Namespace) -> int:
    cfg, creds = named_cluster(args)
    if creds is None:
        raise UsageError("cluster status needs HOSTS_INI, --redis URL or --credentials FILE")
    broker = Broker.of(creds)
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
    broker = Broker.of(creds)
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
    broker = Broker.of(creds)
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
    broker = Broker.of(creds)
    try:
        how = control.cancel(broker, args.job_id, f"cluster cancel on {socket.gethostname()}",
                             wait_s=args.wait)
    finally:
        broker.close()
    print(f"job {args.job_id} cancelled: {how}")
    return ExitCode.OK


def cmd_agent(args: argparse.Namespace) -> int:
    creds = resolve(args.redis, args.credentials, tls=tls_flags(args))
    if creds is None:
        raise UsageError("cluster agent needs --redis URL, CLUSTER_REDIS_URL or --credentials")
    settings = AgentSettings(cpus=choose_cpus(args.cpus, args.cores),
                             host=args.name or socket.gethostname(),
                             threads=args.threads, heartbeat_s=args.heartbeat,
                             redis_grace_s=args.redis_grace, log_level=args.log_level.upper(),
                             pidfile=args.pidfile, cache_dir=args.cache_dir, pin=args.pin,
                             worker_user=args.worker_user, data_address=args.data_address,
                             spool_dir=args.spool, spares=args.spares,
                             fork_server=args.fork_server,
                             fork_server_fd=args.fork_server_fd)
    # a short socket timeout: a silently cut network must not stall heartbeats past the grace
    broker = Broker.of(creds, socket_timeout=max(1.0, 4 * args.heartbeat),
                       retry_s=min(args.redis_grace, 10.0))
    agent = Agent(broker, creds, settings)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    return agent.run()


def over_ssh(name: str) -> Callable[[argparse.Namespace], int]:
    """A command of ``sshcommands``, imported when it runs: no other command imports Fabric."""

    def run(args: argparse.Namespace) -> int:
        from . import sshcommands

        return int(getattr(sshcommands, name)(args))

    return run


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "submit": cmd_submit, "logs": cmd_logs, "cancel": cmd_cancel, "up": over_ssh("cmd_up"),
    "down": over_ssh("cmd_down"), "rotate-key": over_ssh("cmd_rotate_key"),
    "status": cmd_status, "jobs": cmd_jobs, "show": cmd_show, "doctor": over_ssh("cmd_doctor"),
    "agent": cmd_agent}
