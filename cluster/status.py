"""`cluster status`: what the agents' heartbeats in Redis say about the cluster."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .broker import Broker


@dataclass
class WorkerStatus:
    id: str
    pid: int | None
    cpu: int | None
    load: float | None
    rss_mb: float | None
    job: str | None
    unit: int | None


@dataclass
class AgentStatus:
    id: str
    host: str
    pid: int | None
    version: str
    cpus: str
    state: str  # alive | lost
    heartbeat_age_s: float
    workers: list[WorkerStatus] = field(default_factory=list)


def collect(broker: Broker, lease_ms: int) -> list[AgentStatus]:
    agents: dict[str, AgentStatus] = {}
    for aid, age, info in broker.agents_seen():
        agents[aid] = AgentStatus(aid, info.get("host", aid.split("/")[0]),
                                  _int(info.get("pid")), info.get("version", "?"),
                                  info.get("cpus", ""), "alive" if age * 1000 <= lease_ms
                                  else "lost", round(age, 1))
    for wid, info in broker.workers_seen():
        agent = agents.get(info.get("agent", ""))
        if agent is None:
            continue
        rss = _float(info.get("rss"))
        agent.workers.append(WorkerStatus(
            wid, _int(info.get("pid")), _int(info.get("cpu")),
            _float(info.get("load")), round(rss / 2**20, 1) if rss is not None else None,
            info.get("job"), _int(info.get("unit"))))
    return sorted(agents.values(), key=lambda a: (a.host, a.id))


def as_json(agents: list[AgentStatus]) -> list[dict[str, Any]]:
    return [asdict(a) for a in agents]


def render(agents: list[AgentStatus]) -> str:
    if not agents:
        return "no agent has ever reported to this Redis"
    lines = [f"{'HOST':<12} {'AGENT':<22} {'STATE':<6} {'HEARTBEAT':>10} {'VERSION':<8} "
             "WORKERS"]
    for a in agents:
        lines.append(f"{a.host:<12} {a.id:<22} {a.state:<6} {a.heartbeat_age_s:>8.1f} s "
                     f"{a.version:<8} {len(a.workers)}")
        for w in sorted(a.workers, key=lambda w: (w.cpu or 0, w.id)):
            load = f"{w.load:.0f}%" if w.load is not None else "?"
            mem = f"{w.rss_mb:.0f} MB" if w.rss_mb is not None else "?"
            doing = f"job {w.job} unit {w.unit}" if w.job else "idle"
            lines.append(f"  {w.id:<32} pid {w.pid}  cpu {w.cpu}  load {load:>4}  "
                         f"mem {mem:>7}  {doing}")
    return "\n".join(lines)


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None
