"""A job's code as a worker loads it (``load_job``): its signed description checked, its
directory unpacked once per host, its code imported in that directory."""

from __future__ import annotations

import logging
import types
from collections.abc import Callable

from .broker import Broker
from .errors import ClusterError
from .jobfile import load_source
from .signing import WorkerKeys
from .workdir import ArchiveError, Cache, Workspace

log = logging.getLogger("cluster.worker")

DEFAULT_MAX_RESULT = 256_000_000  # bytes of an encoded result, unless the job says otherwise


class LoadedJob:
    """Job code as a worker runs it, or the reason it cannot run here."""

    def __init__(self, module: types.ModuleType | None, seed: int, error: str = "",
                 max_result: int = DEFAULT_MAX_RESULT, full_wait: float = 60.0,
                 workspace: Workspace | None = None, max_log: int = 0, max_attempts: int = 3,
                 expires: int = 0) -> None:
        self.module = module
        self.max_attempts = max_attempts
        self.expires = expires  # Redis server ms after which its signature no longer holds
        self.workspace = workspace
        self.max_log = max_log  # bytes of log records the job keeps in Redis
        self.imported: dict[str, str] = {}  # what its code wrote while being imported
        self.seed = seed
        self.error = error
        self.max_result = max_result
        self.full_wait = full_wait  # how long a commit refused by a full Redis is retried


def load_job(broker: Broker, keys: WorkerKeys, cache: Cache, jid: str, wid: str,
             enter: Callable[[Workspace | None], None]) -> LoadedJob | None:
    """Job ``jid`` as worker ``wid`` runs it (``enter``: into its directory, before its code
    is imported); None when the job is gone or not signed with this cluster's key."""
    info = broker.job_info(jid)
    if info is None:
        return None
    fields = keys.job(jid, info)
    if fields is None:  # its entries are dropped, as if it were gone
        log.error("job=%s: not signed by this cluster's key (forged, or a copy of another "
                  "job); refusing to run it", jid)
        return None
    seed, code = int(fields["seed"] or 0), fields["code"]

    def loaded_job(module: types.ModuleType | None, error: str = "",
                   workspace: Workspace | None = None) -> LoadedJob:
        return LoadedJob(module, seed, error, workspace=workspace,
                         max_result=int(fields["max_result"] or DEFAULT_MAX_RESULT),
                         full_wait=float(fields["redis_grace"] or 60.0),
                         max_log=int(fields["max_log"] or 0),
                         max_attempts=int(fields["max_attempts"] or 3),
                         expires=int(fields["expires"] or 0))

    try:
        workspace = workspace_of(broker, cache, jid, fields)
    except ArchiveError as exc:
        log.error("job=%s: %s", jid, exc)
        return loaded_job(None, f"worker {wid} refused the job: {exc}")
    file = str(workspace.path / fields["workdir_job"]) if workspace else None
    enter(workspace)
    try:
        module = load_source(code, fields["path"] or "job.py",
                             module_name=f"cluster_job_{fields['name']}_{jid}", file=file)
    except ClusterError as exc:
        return loaded_job(None, f"on worker {wid}: {exc}")
    log.info("job=%s loaded (%s)", jid, fields["name"])
    return loaded_job(module, workspace=workspace)


def workspace_of(broker: Broker, cache: Cache, jid: str, fields: dict[str, str]
                 ) -> Workspace | None:
    """The job's directory (its digest signed with the job), unpacked on this host once
    (``workdir.Cache``, which checks the digest)."""
    digest = fields["workdir_sha"]
    if not digest:
        return None
    path, _held = cache.hold(digest)  # held until this process exits
    if path is None:
        data = broker.workdir(jid)
        if data is None:
            raise ArchiveError("the job directory is missing from Redis")
        path = cache.unpack(digest, data)
        log.info("job=%s directory %s unpacked (%d bytes)", jid, digest[:12], len(data))
    return Workspace(path)
