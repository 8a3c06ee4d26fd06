"""The commands that reach hosts over SSH: `up`, `rotate-key`, `down` and `doctor`. Imported
only when one of them runs (``cli.over_ssh``), so that `cluster agent`, its workers and
`submit` never import Fabric and Paramiko."""

from __future__ import annotations

import argparse
import dataclasses
import secrets
from pathlib import Path

from . import config, credentials, wheelhouse
from .console import say
from .credentials import Credentials
from .doctor import Doctor
from .errors import ExitCode, InfraError
from .launcher import Launcher
from .remote import HostReport


def cmd_up(args: argparse.Namespace) -> int:
    cfg = config.load(args.hosts)
    house = wheelhouse.prepare(Path(args.wheelhouse) if args.wheelhouse else None,
                               requirements=cfg.requirements, packages=cfg.packages)
    creds = credentials.for_cluster(cfg, create=True)
    reports = Launcher(cfg, creds, args.accept_new_host_keys, house).up()
    print(report_table(reports, with_agent=True))
    failed = [r for r in reports if not r.ok]
    if failed and not args.allow_partial:
        raise InfraError(f"{len(failed)} of {len(reports)} hosts failed: "
                         f"{', '.join(r.host for r in failed)}")
    return ExitCode.OK


def cmd_rotate_key(args: argparse.Namespace) -> int:
    cfg = config.load(args.hosts)
    old = credentials.for_cluster(cfg, create=False)
    new = dataclasses.replace(old, key=secrets.token_bytes(32))
    reports = Launcher(cfg, old).rotate_key(new)
    print(report_table(reports, with_agent=True))
    failed = [r for r in reports if not r.ok]
    if len(failed) == len(reports):
        raise InfraError("no host took the new key; the old one stays")
    new.dump(cfg.credentials_file)
    say(f"new cluster key in {cfg.credentials_file}; copy it wherever coordinators use a copy "
        "of the old one")
    if failed:
        raise InfraError(f"{len(failed)} of {len(reports)} hosts kept the old key: "
                         f"{', '.join(r.host for r in failed)} (cluster up {args.hosts} gives "
                         "them the new one)")
    return ExitCode.OK


def cmd_down(args: argparse.Namespace) -> int:
    cfg = config.load(args.hosts)
    creds = credentials.for_cluster(cfg, create=False)
    reports = Launcher(cfg, creds).down(keep_redis=args.keep_redis)
    print(report_table(reports))
    failed = [r for r in reports if not r.ok]
    if failed:
        raise InfraError(f"{len(failed)} hosts failed")
    return ExitCode.OK


def cmd_doctor(args: argparse.Namespace) -> int:
    cfg = config.load(args.hosts)
    creds = credentials.for_cluster(cfg, create=False) if cfg.credentials_file.exists() \
        else Credentials(cfg.redis_address(), None, b"", cfg.prefix)
    reports = Doctor(Launcher(cfg, creds)).run()
    print(report_table(reports))
    bad = [r.host for r in reports if not r.ok]
    if bad:
        raise InfraError(f"problems on {', '.join(bad)}")
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
