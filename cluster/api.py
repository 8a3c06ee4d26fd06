"""``cluster.run``: what ``cluster submit`` does, called from Python (a script, a notebook)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .arguments import build_parser
from .destination import Destination
from .errors import ExitCode, UsageError
from .recorder import Recorder
from .results import RunResult

FLAGS = {"seed", "timeout", "worker_timeout", "max_attempts", "max_failed", "lease", "resume",
         "overlap", "name", "keep", "redis_grace", "max_result_size", "workdir",
         "max_workdir_size", "max_log_size", "cores", "progress", "summary_json", "tls_ca",
         "tls_cert", "tls_key"}
SWITCHES = {"fresh": "--fresh", "logs": "--logs", "speculate": "--no-speculate"}


def run(job: str | Path, params: dict[str, Any] | None = None, *, hosts: str | None = None,
        redis: str | None = None, credentials: str | None = None, output: str | None = None,
        exclude: list[str] | tuple[str, ...] = (), **options: Any) -> RunResult:
    """Run the job file ``job`` as ``cluster submit`` would, and return its ``RunResult``:
    ``.value`` (what gather returned), ``.summary()`` (the line submit prints), ``.jid``,
    ``.failed`` (units that failed for good, with ``max_failed``), ``.seconds``.

    ``hosts``, ``redis`` or ``credentials`` name a running cluster; with none, a private local
    cluster runs it. ``output`` writes the result to a file as ``--output`` does. Any other
    option of ``cluster submit`` is a keyword with its flag's name: ``seed=``, ``timeout=``,
    ``max_attempts=``, ``max_failed=``, ``cores=``, ``progress=`` ("none" unless given),
    ``workdir=``, ``name=``, ``fresh=True``, ``logs=True``, ``speculate=False``... A failed run
    raises the ``ClusterError`` whose exit code ``cluster submit`` would exit with."""
    from .submit import submit_job

    argv = _argv(job, params or {}, {"hosts": hosts, "redis": redis, "credentials": credentials,
                                     "output": output}, exclude, options)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # the parser said why on stderr
        raise UsageError(f"cluster.run: options refused: {' '.join(argv[2:])}") from None
    destination = Destination(args.output, Path(args.job).stem) if args.output else None
    with Recorder(args.summary_json, job_name=Path(args.job).stem) as record:
        _, result = submit_job(args, record, destination)
        if destination:
            destination.check_written(result.jid)
        record.ended(ExitCode.PARTIAL if result.failed else ExitCode.OK)
    return result


def _argv(job: str | Path, params: dict[str, Any], where: dict[str, str | None],
          exclude: list[str] | tuple[str, ...], options: dict[str, Any]) -> list[str]:
    """The command line of ``cluster submit`` that does what ``run`` was asked."""
    argv = ["submit", str(job), "--progress", str(options.pop("progress", "none"))]
    for key, value in params.items():
        argv += ["--param", f"{key}={json.dumps(value)}"]
    argv += [arg for flag, value in where.items() if value is not None
             for arg in (f"--{flag}", str(value))]
    for pattern in exclude:
        argv += ["--exclude", pattern]
    for key, value in options.items():
        if key in SWITCHES:
            if bool(value) != (key == "speculate"):
                argv.append(SWITCHES[key])
        elif key in FLAGS:
            if value is not None:
                argv += [f"--{key.replace('_', '-')}", str(value)]
        else:
            raise UsageError(f"cluster.run: no option {key!r} (see cluster submit --help)")
    return argv
