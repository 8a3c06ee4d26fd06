"""``cluster jobs`` and ``cluster show``: the jobs running on a cluster and the records of
recent runs (``history.RunRecord``), from the cluster's Redis or, with no cluster named, from
this machine's history file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .broker import Broker
from .console import utc
from .control import alive
from .history import LocalHistory, RunRecord


@dataclass(frozen=True)
class RunningJob:
    job: str
    name: str
    file: str
    coordinator: str  # its host
    pid: int | None
    started: str | None  # ISO 8601, UTC
    recorded: int  # units recorded (or failed for good)
    total: int | None  # None while scatter runs
    scattered: int
    alive: bool = True  # its coordinator beats; else the job is kept for a run to resume

    def progress(self) -> str:
        if self.total:
            return f"{self.recorded}/{self.total} ({100 * self.recorded / self.total:.0f}%)"
        return f"{self.recorded}/{self.scattered}+"


def running(broker: Broker, only: Sequence[str] | None = None) -> list[RunningJob]:
    """The jobs being run on the cluster (or those of ``only`` that are)."""
    found = broker.running_jobs() if only is None else broker.job_summaries(only)
    return [RunningJob(jid, f.get("name", "?"), f.get("path", ""), f.get("host", "?"),
                       _int(f.get("pid")), utc(int(f["started"]) / 1000) if f.get("started")
                       else None, recorded, _int(f.get("total")), _int(f.get("scattered")) or 0,
                       alive(broker, f))
            for jid, f, recorded in found]


def recent(broker: Broker | None, limit: int) -> list[RunRecord]:
    """The last ``limit`` runs, newest first: of the cluster, or (None) of this machine."""
    if broker is None:
        return LocalHistory().recent(limit)
    return newest_first(RunRecord.from_json(r) for r in broker.recent_runs(limit))[:limit]


def runs_of(broker: Broker | None, jid: str) -> list[RunRecord]:
    """The runs of job ``jid``, newest first: from the cluster's history, else this
    machine's."""
    found = [RunRecord.from_json(r) for r in broker.job_runs(jid)] if broker else []
    return newest_first(found) or LocalHistory().of_job(jid)


def newest_first(records: Any) -> list[RunRecord]:
    return sorted(records, key=lambda r: r.ended, reverse=True)


def as_json(live: list[RunningJob] | None, runs: list[RunRecord], where: str | None
            ) -> dict[str, Any]:
    return {"cluster": where, "running": None if live is None else [asdict(j) for j in live],
            "recent": [r.as_dict() for r in runs]}


def show_json(jid: str, live: RunningJob | None, runs: list[RunRecord]) -> dict[str, Any]:
    return {"job": jid, "running": asdict(live) if live else None,
            "runs": [r.as_dict() for r in runs]}


def render(live: list[RunningJob] | None, runs: list[RunRecord], where: str | None) -> str:
    """The running jobs (when a cluster was named) and the recent runs, as two tables."""
    out = []
    if live is not None:
        out.append(f"running on the cluster at {where}:" if live else
                   f"no job running on the cluster at {where}")
        if live:
            out.append(table([["JOB", "NAME", "PROGRESS", "COORDINATOR", "STARTED"]] + [
                [j.job, j.name, j.progress(), _host(j.coordinator, j.pid) + (
                    "" if j.alive else " (gone: the next run resumes it)"), j.started or "?"]
                for j in live]))
    source = f"the cluster at {where}" if where else "this machine"
    out.append(f"recent runs on {source}:" if runs else f"no run recorded on {source}")
    if runs:
        out.append(table([["JOB", "NAME", "STATE", "EXIT", "UNITS", "ENDED", "TOOK"]] + [
            [r.job or "-", r.name or "?", r.state, str(r.exit_code), _units(r), r.ended,
             f"{r.seconds:.1f} s"] for r in runs]))
    return "\n".join(out)


def render_show(jid: str, live: RunningJob | None, runs: list[RunRecord]) -> str:
    """One job: running now, its last run in detail (failed units with their hosts and
    tracebacks), then its earlier runs, one line each."""
    first = live.name if live else runs[0].name
    file = live.file if live else runs[0].file
    out = [f"job {jid}: {first} ({file})"]
    if live:
        out.append(f"running now: {live.progress()} units, coordinator "
                   f"{_host(live.coordinator, live.pid)}, started {live.started or '?'}")
    if runs:
        out += detail(runs[0])
    if len(runs) > 1:
        out.append("earlier runs of this job:")
        out += [f"  run {r.run}: {r.state} (exit {r.exit_code}), ended {r.ended}"
                + (f": {r.error}" if r.error else "") for r in runs[1:]]
    return "\n".join(out)


def detail(r: RunRecord) -> list[str]:
    u = r.units
    where = f"on {r.coordinator}" + (f", Redis at {r.redis}" if r.redis else
                                     ", a private local cluster")
    lines = [f"run {r.run}: {r.state} (exit {r.exit_code})",
             f"  started   {r.started} {where}",
             f"  ended     {r.ended}, after {r.seconds:.1f} s"]
    if r.recorded_before is not None:
        lines.append(f"  resumed   {r.recorded_before} units were already recorded")
    lines.append(f"  units     {_units(r)} done, {u.failed} failed, {u.reissued} reissued, "
                 f"{u.duplicates} duplicates, {u.speculative} speculative"
                 + (f", {u.nondeterministic} nondeterministic" if u.nondeterministic else ""))
    if r.hosts:
        lines.append("  hosts     " + ", ".join(f"{h} {n}" for h, n in r.hosts.items()))
    if r.output:
        lines.append(f"  output    {r.output}")
    if r.error:
        lines.append(f"  error     {r.error}")
    if r.kept:
        lines.append("  kept      in Redis, to be resumed (run the same command again)")
    if r.failed_units:
        shown = len(r.failed_units)
        lines.append(f"failed units{'' if shown == u.failed else f' (the first {shown})'}:")
    for f in r.failed_units:
        lines.append(f"  unit {f.unit} on {f.host} (worker {f.worker}), {f.attempts} "
                     f"attempt{'' if f.attempts == 1 else 's'}: {f.error}")
        lines += [f"    {line}" for line in f.traceback.rstrip().splitlines()]
    return lines


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                     + "  " + row[-1] for row in rows)


def _units(r: RunRecord) -> str:
    total = r.units.total
    return f"{r.units.done}/{total}" if total is not None else f"{r.units.done}/?"


def _host(host: str, pid: int | None) -> str:
    return f"{host} (pid {pid})" if pid else host


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None
