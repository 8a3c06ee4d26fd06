"""What a coordinator watches besides its own job: how many workers hold a live lease and on
which hosts, the leases that lapsed (what their workers held is queued again), entries that
straggle (a speculative copy), and agents that could not verify the job.

``Watch`` keeps what it has seen; the coordinator calls it at every maintenance, and repeats a
call that a Redis error cut short (counts are taken anew; a lapsed lease found twice is
reissued once: ``REISSUE`` checks the lease again).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .broker import Broker
from .errors import InfraError, NoWorkers, UsageError
from .settings import renewal_interval
from .signing import Keyring
from .spool import machine_id

log = logging.getLogger("cluster.coordinator")
FULL_SCAN_S = 10.0  # how often the lease check also looks for consumers that hold no lease


class Watch:
    def __init__(self, broker: Broker, keyring: Keyring, lease_ms: int,
                 worker_timeout: float) -> None:
        self.broker = broker
        self.keyring = keyring
        self.lease_ms = lease_ms
        self.worker_timeout = worker_timeout
        self.workers = 0  # holding a live lease, at the last count
        self.hosts_seen: set[str] = set()
        self.alive: set[str] = set()  # hosts with a live worker, at the last count
        self.no_worker_since: float | None = None
        self.next_full_scan = 0.0  # of every consumer, for those with no lease
        self.copied: set[str] = set()  # entries given a speculative copy

    def first_count(self) -> None:
        """Workers before the job starts; a lease too short for this cluster's renewals, or
        agents holding another cluster key, fail the job at once."""
        workers, alive, agents = self.broker.live_capacity(self.lease_ms)
        interval = renewal_interval(0.0, agents)  # (its heartbeat was checked at submit)
        if self.lease_ms <= 2000 * interval:  # agents of a large cluster renew less often
            raise UsageError(f"--lease {self.lease_ms / 1000:g} is too short for {agents} "
                             f"agents, which renew every {interval:g} s: it must be more "
                             "than twice that")
        self.check_keys()
        self.workers, self.alive = workers, alive

    def check_keys(self) -> None:
        """Fail fast when agents cannot verify our job (their workers would drop its units)."""
        mine = self.keyring.for_workers().fingerprint()
        prints = self.broker.agent_fingerprints(self.lease_ms)
        others = sorted(a for a, p in prints.items() if p is not None and p != mine)
        if others:
            raise InfraError(f"{'every agent' if len(others) == len(prints) else 'agent'} "
                             f"({', '.join(others)}) has a different cluster key than this "
                             "coordinator: its workers cannot verify this job; run cluster up "
                             "again with this coordinator's credentials")

    def reissue_lapsed(self, now: float) -> None:
        """Queue again what workers whose lease lapsed held."""
        full = now >= self.next_full_scan  # consumers with no lease: rare, and a scan of all
        for wid in self.broker.expired_workers(self.lease_ms, full=full):
            moved = self.broker.reissue(wid, charge=False, reason=f"worker {wid} lost its lease",
                                        lease_ms=self.lease_ms)
            if moved > 0:
                log.warning("worker %s lost its lease; %d units reissued", wid, moved)
        if full:
            self.next_full_scan = now + FULL_SCAN_S

    def count(self) -> None:
        """The workers holding a live lease, and their hosts (one read per agent)."""
        self.workers, self.alive, _ = self.broker.live_capacity(self.lease_ms)
        self.hosts_seen.update(self.alive)

    def check_workers(self, now: float, outstanding: int) -> None:
        """``NoWorkers`` once no worker has held a lease for ``worker_timeout``."""
        if self.workers:
            self.no_worker_since = None
        elif self.no_worker_since is None:
            self.no_worker_since = now
        elif now - self.no_worker_since > self.worker_timeout:
            lost = ", ".join(sorted(self.hosts_seen - self.alive)) or "none seen"
            raise NoWorkers(f"no live worker for {self.worker_timeout:g} s "
                            f"(hosts lost: {lost}); {outstanding} units still to do")

    def speculate(self, jid: str, owner: str, threshold_ms: float) -> None:
        """Give every entry running longer than ``threshold_ms`` a second copy, once."""
        for msgid, wid, idle in self.broker.pending():
            if idle > threshold_ms and msgid not in self.copied:
                self.copied.add(msgid)  # first: a lost reply costs the copy, never makes two
                self.broker.copy_entry(jid, owner, msgid)
                log.info("job=%s: straggling entry %s on %s gets a speculative copy",
                         jid, msgid, wid)

    def local_spools(self) -> dict[str, Path]:
        """The live agents' spools on this machine (``dataserver.Client``): read directly."""
        here = machine_id()
        return {a["data"]: Path(a["spool"]) for a in self.broker.live_agents_info(self.lease_ms)
                if here and a.get("machine") == here and a.get("data") and a.get("spool")
                and Path(a["spool"]).is_dir()}
