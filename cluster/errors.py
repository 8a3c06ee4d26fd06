"""One exception tree and the exit codes the CLI maps it to.

Every error carries the data needed to report it and renders a one-line message with ``str()``.
The CLI prints that line (plus ``detail``, e.g. a worker's traceback, when there is one) and exits
with the error's ``exit_code``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the ``cluster`` command (documented in the README)."""

    OK = 0
    JOB_FAILED = 1  # the job's own code failed: scatter, compute (after retries) or gather
    USAGE = 2  # bad command line, bad --param, missing or broken job file
    INFRA = 3  # Redis unreachable or refusing us, no worker, lost workers
    TIMEOUT = 4  # --timeout elapsed
    PARTIAL = 5  # finished, but units failed for good within the --max-failed budget
    ALREADY_RUNNING = 6  # the same job runs on this cluster (--overlap forbid)
    RESULT_ELSEWHERE = 7  # finished, but the result is in a file other than asked: not printed
    # as JSON (too large, no JSON form), or not of the --output format (FILE.json...)
    CANCELLED = 8  # cluster cancel JOB_ID (or --overlap replace) stopped the job
    OUTPUT_FAILED = 9  # finished, but --output could not be written: the error says where the
    # result is (kept in Redis for a re-run, or in another file)
    INTERRUPTED = 130  # Ctrl-C / SIGTERM


class ClusterError(Exception):
    """Root of every error ``cluster`` raises on purpose."""

    exit_code: ExitCode = ExitCode.INFRA

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message


class UsageError(ClusterError):
    """The command line or a parameter is wrong."""

    exit_code = ExitCode.USAGE


class JobFileError(UsageError):
    """The job file is missing, does not compile or import, or breaks the job contract."""

    def __init__(self, path: str, problem: str, *, detail: str = "") -> None:
        super().__init__(f"{path}: {problem}", detail=detail)
        self.path = path
        self.problem = problem


class MissingRequirements(UsageError):
    """Hosts lack what a job requires: ``cluster submit`` refuses it before scattering.
    ``missing``: requirement -> host -> what the host has instead."""

    def __init__(self, job: str, missing: dict[str, dict[str, str]], remedy: str) -> None:
        needs = "; ".join(
            f"{requirement} ({', '.join(f'{host}: {found}' for host, found in hosts.items())})"
            for requirement, hosts in missing.items())
        super().__init__(f"{job} needs {needs}: {remedy}")
        self.job = job
        self.missing = missing


class CodecError(ClusterError):
    """A value cannot be encoded for the wire (object arrays, sets, arbitrary objects...)."""

    exit_code = ExitCode.JOB_FAILED


class JobFailed(ClusterError):
    """The job's own code failed."""

    exit_code = ExitCode.JOB_FAILED


class UnitFailed(JobFailed):
    """A unit failed on every attempt it was allowed."""

    def __init__(
        self, index: int, error: str, *, attempts: int, worker: str, detail: str = ""
    ) -> None:
        super().__init__(
            f"unit {index} failed after {attempts} attempt(s), last on worker {worker}: {error}",
            detail=detail,
        )
        self.index = index
        self.error = error
        self.attempts = attempts
        self.worker = worker


class InfraError(ClusterError):
    """Redis, agents or workers are not there or not working."""

    exit_code = ExitCode.INFRA


class RedisUnavailable(InfraError):
    """Redis cannot be reached, or refuses our credentials."""


class RedisRefused(RedisUnavailable):
    """Redis refused our credentials: waiting will not help."""


class RedisFull(RedisUnavailable):
    """Redis refused a write: it is out of memory (``maxmemory``)."""


class JobGone(InfraError):
    """The job's keys are gone from Redis (restarted without persistence, or flushed)."""

    def __init__(self, jid: str) -> None:
        super().__init__(f"job {jid} is gone from Redis (restarted empty or flushed)")
        self.jid = jid


class NoWorkers(InfraError):
    """No live worker took part within the allowed time."""


class Fenced(InfraError):
    """Another coordinator took the job over; this one must stop."""

    def __init__(self, jid: str) -> None:
        super().__init__(f"job {jid} was taken over by another coordinator; this one stops")
        self.jid = jid


class JobTimeout(ClusterError):
    """The job did not finish within ``--timeout``."""

    exit_code = ExitCode.TIMEOUT


class JobCancelled(ClusterError):
    """``cluster cancel`` (or a run with ``--overlap replace``) asked this job to stop."""

    exit_code = ExitCode.CANCELLED


class AlreadyRunning(ClusterError):
    """The same job (identity or ``--name``) runs on this cluster, and ``--overlap forbid``."""

    exit_code = ExitCode.ALREADY_RUNNING


class ResultNotPrinted(ClusterError):
    """The job finished, but its result could not go to stdout as JSON (too large, or with no
    JSON form) and no ``--output`` was given: it was written to ``path`` instead."""

    exit_code = ExitCode.RESULT_ELSEWHERE

    def __init__(self, problem: str, path: str) -> None:
        super().__init__(f"result not printed: {problem}; it was written to {path} instead "
                         "(use --output FILE, or --print none)")
        self.problem = problem
        self.path = path


class ResultMisfit(ClusterError):
    """The job finished, but its result does not fit the format ``--output`` asked for: it was
    written to ``written`` (``FILE.json``, ...) instead, and ``path`` was not touched."""

    exit_code = ExitCode.RESULT_ELSEWHERE

    def __init__(self, path: str, problem: str, written: str) -> None:
        super().__init__(f"--output {path}: the result does not fit ({problem}); it was written "
                         f"to {written} instead, and {path} was left as it was")
        self.path = path
        self.problem = problem
        self.written = written


class OutputFailed(ClusterError):
    """The job finished, but writing ``--output`` failed (``error``); ``where`` says where the
    result is instead: kept in Redis for a re-run that writes it, or in another file."""

    exit_code = ExitCode.OUTPUT_FAILED

    def __init__(self, path: str, error: str, where: str) -> None:
        super().__init__(f"could not write {path}: {error}; {where}")
        self.path = path
        self.error = error
        self.where = where
