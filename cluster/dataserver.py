"""The data path for large results: they do not pass through Redis.

A worker writes a large result, sealed (``signing``), into its host's spool directory and
records only a reference in Redis (``D`` + ``address:port/name`` + size). Its agent runs this
server beside it, which serves the spool to coordinators: a result crosses the network once,
from the worker's host to the coordinator's, and Redis holds a few bytes per result instead of
the result.

The protocol, over TCP (one connection per coordinator and host, reused):

    client: MAGIC, client nonce (16)
    server: server nonce (16), HMAC(message key, b"server" + both nonces)
    client: HMAC(message key, b"client" + both nonces)
    then any number of requests:
    client: b"T", name length (2), name          -> server: size (8) and the bytes, or 2**64-1
                                                    for none; the file is deleted once sent

Both sides prove they hold the cluster's message key before anything is sent; a result is
sealed besides, so the coordinator checks it as it checks any result. Names are file names in
the spool (no separators): nothing else can be read or deleted.

Bounded: at most ``MAX_CLIENTS`` connections; a client silent for ``IDLE_S`` is dropped.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import mmap
import os
import re
import secrets
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .proc import die_with_parent

log = logging.getLogger("cluster.dataserver")

MAGIC = b"CLD1"
MISSING = 2**64 - 1
NAME = re.compile(rb"^[A-Za-z0-9_.:-]{1,200}$")
MAX_CLIENTS = 256
IDLE_S = 300.0


def proof(key: bytes, side: bytes, client: bytes | bytearray, server: bytes | bytearray
          ) -> bytes:
    return hmac.new(key, side + client + server, hashlib.sha256).digest()


def read_exactly(sock: socket.socket, n: int) -> bytearray:
    """``n`` bytes, received straight into the buffer returned (no copy after)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the peer closed the connection")
        got += k
    return buf


class Handler(socketserver.BaseRequestHandler):
    server: Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(IDLE_S)
        try:
            if read_exactly(sock, 4) != MAGIC:
                return
            client = read_exactly(sock, 16)
            mine = secrets.token_bytes(16)
            key = self.server.key
            sock.sendall(mine + proof(key, b"server", client, mine))
            if not hmac.compare_digest(read_exactly(sock, 32),
                                       proof(key, b"client", client, mine)):
                log.warning("a client at %s failed to prove the key", self.client_address[0])
                return
            while True:
                op, size = struct.unpack("!cH", read_exactly(sock, 3))
                name = read_exactly(sock, size)
                if not NAME.match(name):
                    return
                path = self.server.spool / name.decode()
                if op != b"T":
                    return
                self.send_file(sock, path)
        except (OSError, ConnectionError, struct.error):
            return

    def send_file(self, sock: socket.socket, path: Path) -> None:
        """Send a result file and delete it; only a plain file of the spool's owner, never
        what a link points to (job code may write into the spool, and this server may run
        as root)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            sock.sendall(struct.pack("!Q", MISSING))
            return
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 \
                    or info.st_uid != self.server.owner:
                log.warning("%s is not a result file: refused", path.name)
                sock.sendall(struct.pack("!Q", MISSING))
                return
            sock.sendall(struct.pack("!Q", info.st_size))
            sock.sendfile(f, 0, info.st_size)
        # sent: it is the coordinator's now. One that dies before it recorded the result
        # finds it gone when it (or its successor) asks again, and has the unit computed again
        path.unlink(missing_ok=True)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, listening: socket.socket, spool: Path, key: bytes) -> None:
        """Serves on ``listening``, a socket its agent bound and listens on."""
        self.spool = spool
        self.owner = spool.stat().st_uid  # whose files it serves: its workers'
        self.key = key
        self.clients = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(listening.getsockname(), Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listening

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.clients.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.clients.release()


class Unreachable(Exception):
    """The host that holds a result does not answer (down, cut off, or its agent gone)."""


class Client:
    """A coordinator's connections to the hosts' data servers, one per host, reused. A spool
    on this very machine (``local``: where -> its directory) is read directly: the result's
    file is mapped (copy on write: writable, nothing copied) and deleted, no server asked."""

    def __init__(self, key: bytes, timeout: float = 10.0, retry_s: float = 30.0,
                 local: Callable[[], dict[str, Path]] | None = None) -> None:
        self.key = key
        self.timeout = timeout
        self.retry_s = retry_s  # a host that did not answer is not asked again this long
        self.conns: dict[str, socket.socket] = {}
        self.down: dict[str, tuple[float, str]] = {}  # host: (until when, why)
        self.find_local = local  # the spools on this machine, asked again for a new host
        self.local: dict[str, Path] = {}
        self.seen: set[str] = set()

    def take(self, where: str, name: str) -> bytearray | mmap.mmap | None:
        """The result's bytes, which are then deleted from the host; None when it no longer
        has them. ``Unreachable`` when the host does not answer."""
        if where not in self.seen and self.find_local is not None:
            self.seen.add(where)
            with contextlib.suppress(Exception):  # only a shortcut: the server is there
                self.local = self.find_local()
        spool = self.local.get(where)
        if spool is not None:
            try:
                mapped = map_result(spool / name)
                if mapped is not None:
                    return mapped
                # not here: taken already, or this is not the directory the host writes (a
                # container of its own on this machine): its server knows
            except PermissionError:
                del self.local[where]  # not ours to read (another user's workers): ask
        return self.fetch(where, name)

    def connect(self, where: str) -> socket.socket:
        sock = self.conns.get(where)
        if sock is not None:
            return sock
        until, why = self.down.get(where, (0.0, ""))
        if time.monotonic() < until:
            raise Unreachable(why)
        try:
            sock = self.open(where)
        except Unreachable as exc:
            self.down[where] = (time.monotonic() + self.retry_s, str(exc))
            raise
        self.conns[where] = sock
        return sock

    def open(self, where: str) -> socket.socket:
        """A new connection to ``where``, both sides proven to hold the key."""
        host, _, port = where.rpartition(":")
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), self.timeout)
        except (OSError, ValueError) as exc:
            raise Unreachable(f"{where}: {exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mine = secrets.token_bytes(16)
            sock.sendall(MAGIC + mine)
            answer = read_exactly(sock, 48)
            theirs = answer[:16]
            if not hmac.compare_digest(answer[16:], proof(self.key, b"server", mine, theirs)):
                raise Unreachable(f"{where} does not hold this cluster's key")
            sock.sendall(proof(self.key, b"client", mine, theirs))
        except (OSError, ConnectionError, Unreachable) as exc:
            sock.close()
            raise Unreachable(exc if isinstance(exc, Unreachable) else f"{where}: {exc}") from None
        return sock

    def request(self, where: str, op: bytes, name: str) -> socket.socket:
        raw = name.encode()
        sock = self.connect(where)
        try:
            sock.sendall(op + struct.pack("!H", len(raw)) + raw)
        except OSError as exc:
            self.drop(where)
            raise Unreachable(f"{where}: {exc}") from None
        return sock

    def fetch(self, where: str, name: str) -> bytearray | None:
        """The file's bytes from the host's data server, which then deletes it; None when it
        no longer has it."""
        sock = self.request(where, b"T", name)
        try:
            (size,) = struct.unpack("!Q", read_exactly(sock, 8))
            return None if size == MISSING else read_exactly(sock, size)
        except (OSError, ConnectionError) as exc:
            self.drop(where)
            raise Unreachable(f"{where}: {exc}") from None

    def drop(self, where: str) -> None:
        sock = self.conns.pop(where, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for where in list(self.conns):
            self.drop(where)


def map_result(path: Path) -> mmap.mmap | None:
    """A spooled result of this machine, mapped copy-on-write (writable, shared until
    written), then deleted; None when it is not there. Only a plain file, never a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size == 0:
            return None
        # pages are mapped as they are read (MAP_POPULATE would copy each, for writing)
        data = mmap.mmap(fd, info.st_size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    path.unlink()  # taken: PermissionError (not ours to delete) is the caller's to handle
    return data


def main() -> int:
    """``python -m cluster.dataserver``, started by an agent: JSON on stdin (the listening
    socket's fd, the spool, the message key); serves until the agent dies."""
    die_with_parent(signal.SIGKILL)
    config = json.loads(sys.stdin.read())
    logging.basicConfig(level=config.get("log_level", "INFO"), stream=sys.stderr,
                        format="%(asctime)s dataserver %(levelname)s %(message)s")
    server = Server(socket.socket(fileno=int(config["fd"])), Path(config["spool"]),
                    bytes.fromhex(config["key"]))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
