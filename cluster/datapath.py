"""An agent's side of the data path (``spool``, ``dataserver``): its spool directory and the
data server process that serves it, restarted when it dies."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .proc import die_with_parent
from .spool import Spool, default_dir, default_limit, remove_dead_spools

log = logging.getLogger("cluster.datapath")


@dataclass
class DataPath:
    """An agent's side of the data path: its spool directory (its workers', when they run as
    a user of their own) and the data server process that serves it (``dataserver``)."""

    spool: Spool
    address: str
    key: bytes
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @classmethod
    def start(cls, settings: Any, key: bytes, user: Any) -> DataPath:
        if not settings.spool_dir:
            remove_dead_spools(settings.host)
        path = Path(settings.spool_dir) if settings.spool_dir else default_dir(settings.host)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if user is not None:
            os.chown(path, user.uid, user.gid)
        data = cls(Spool(path, "", default_limit(path)), settings.data_address, key)
        data.serve()
        return data

    def serve(self) -> None:
        """Start the data server (again, on the same port when it had one). The agent binds
        its socket and hands it over: the port is known at once, and the workers start
        beside the server instead of after it."""
        self.end_server()
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as listening:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listening.bind((self.address, self.port))
            listening.listen(64)
            self.port, fd = listening.getsockname()[1], listening.fileno()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cluster.dataserver"], stdin=subprocess.PIPE,
                close_fds=True, pass_fds=(listening.fileno(),), preexec_fn=die_with_parent)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({
            "fd": fd, "spool": str(self.spool.dir), "key": self.key.hex(),
            "log_level": logging.getLogger().level or "INFO"}).encode())
        self.proc.stdin.close()
        host = f"[{self.address}]" if ":" in self.address else self.address
        self.spool = dataclasses.replace(self.spool, where=f"{host}:{self.port}")

    def sweep(self, broker: Any) -> None:
        """Restart a data server that died; delete the results of jobs that are gone."""
        if self.proc is None or self.proc.poll() is not None:
            log.warning("the data server is not running (%s): starting it again",
                        self.proc.returncode if self.proc is not None else "did not start")
            try:
                self.serve()
            except OSError as exc:
                log.error("%s", exc)  # tried again at the next sweep
        with contextlib.suppress(OSError):
            removed = self.spool.sweep(broker.jobs_exist)
            if removed:
                log.info("removed %d spooled results of jobs that are gone", removed)

    def stop(self) -> None:
        self.end_server()
        shutil.rmtree(self.spool.dir, ignore_errors=True)

    def end_server(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
