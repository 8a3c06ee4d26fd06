"""Workers forked from a process that imported their code once (a fork server), instead of each
starting a Python and importing redis-py, numpy and the rest (about 0.5 s of CPU a worker).

The agent starts the fork server (``python -m cluster.forkserver FD``) with the workers' user,
directory and environment (thread counts set, secrets left out), so it holds nothing the
workers may not see: never the agent's credentials or memory. It imports what a worker imports
and says it is ready; then, on each request, it forks a worker process that runs
``cluster.worker``'s main, with the pipe the agent sent it (``SCM_RIGHTS``) as its stdin, where
the configuration comes as for a spawned worker. It never runs job code: a worker loads its job
after the fork, so nothing of one job is in the next worker.

Requests and replies are messages on a Unix ``SOCK_SEQPACKET`` pair. The fork server reaps its
children and reports each exit (``Popen``'s returncode convention). Its workers die with it
(parent-death signal), and it dies with the agent (parent-death signal, and end of its socket),
so nothing outlives the agent. The agent signals its forked workers through pidfds where Linux
has them: a pid reaped by the fork server and reused is never signalled by mistake.

``Forked`` has the part of ``subprocess.Popen``'s interface the agent uses, so a worker is
either. Where the fork server cannot run (not Linux, or it failed), the agent spawns as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from setproctitle import setproctitle

from .proc import die_with_parent

READY_TIMEOUT_S = 60.0  # the fork server's imports, on a loaded host
REPLY_TIMEOUT_S = 10.0  # a fork once it is ready
MESSAGE = 4096


class WorkerProcess(Protocol):
    """What the agent needs of a worker process: ``subprocess.Popen`` or ``Forked``."""

    pid: int
    stdin: IO[bytes] | None

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


def available() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds")


def command(fd: int) -> list[str]:
    """How a fork server starts: its end of the socket is ``fd``."""
    return [sys.executable, "-m", "cluster.forkserver", str(fd)]


class ForkServer:
    """The agent's end of a fork server."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.sock = sock
        self.pid = 0  # as it says once ready
        self.proc = proc  # None when another process started it (``LocalCluster``)
        self.ready = False
        self.dead = False
        self.exits: dict[int, int] = {}
        self.replies: list[dict[str, Any]] = []

    @classmethod
    def start(cls, env: dict[str, str], popen: Callable[..., subprocess.Popen[bytes]]) \
            -> ForkServer:
        """Start one with ``popen(args, env, pass_fds)`` (as the workers' user, dying with the
        caller)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = popen(command(theirs.fileno()), env, (theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(ours, proc)

    @classmethod
    def adopt(cls, fd: int) -> ForkServer:
        """One another process started (``LocalCluster``), reached through socket ``fd``."""
        return cls(socket.socket(fileno=fd))

    def fork(self, cpu: int | None, idle: bool = False) -> tuple[Forked, bool]:
        """A new worker process, waiting for its configuration on stdin; pinned to ``cpu``
        unless None. Returns it and whether it could be pinned. OSError when the fork server
        is gone or does not answer (the caller spawns instead)."""
        if self.dead:
            raise OSError("the fork server is gone")
        if not self.ready:
            self.wait_for(lambda: self.ready, READY_TIMEOUT_S, "to start")
        rfd, wfd = os.pipe()
        try:
            request = json.dumps({"cpu": cpu, "idle": idle}).encode()
            socket.send_fds(self.sock, [request], [rfd])
        except OSError:
            os.close(wfd)
            raise
        finally:
            os.close(rfd)
        try:
            self.wait_for(lambda: bool(self.replies), REPLY_TIMEOUT_S, "to fork")
        except OSError:
            os.close(wfd)
            raise
        reply = self.replies.pop(0)
        if "error" in reply:
            os.close(wfd)
            raise OSError(f"the fork server could not fork: {reply['error']}")
        return Forked(self, int(reply["pid"]), os.fdopen(wfd, "wb")), bool(reply["pinned"])

    def wait_for(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if self.dead or left <= 0:
                self.close()
                raise OSError(f"the fork server failed {what}" if self.dead else
                              f"the fork server did not answer in {timeout:.0f}s {what}")
            self.pump(left)

    def pump(self, timeout: float = 0.0) -> None:
        """Read what the fork server said (waiting up to ``timeout`` for a first message)."""
        if self.dead:
            return
        self.sock.settimeout(timeout if timeout > 0 else 0.0)
        try:
            while True:
                data = self.sock.recv(MESSAGE)
                if not data:
                    self.lost()
                    return
                message = json.loads(data)
                if "exited" in message:
                    self.exits[int(message["exited"])] = int(message["code"])
                elif "ready" in message:
                    self.ready, self.pid = True, int(message["ready"])
                else:  # an exit reported before this fork is of an earlier process
                    self.replies.append(message)
                    self.exits.pop(int(message.get("pid", 0)), None)
                self.sock.settimeout(0.0)
        except (BlockingIOError, TimeoutError, InterruptedError):
            return
        except OSError:
            self.lost()

    def lost(self) -> None:
        """The fork server is gone: its workers died with it (parent-death signal)."""
        self.dead = True
        self.sock.close()

    def exit_of(self, pid: int) -> int | None:
        self.pump()
        if pid in self.exits:
            return self.exits.pop(pid)
        return -signal.SIGKILL if self.dead else None

    def close(self) -> None:
        """Stop it: the end of its socket makes it kill what it still runs, and exit."""
        if not self.dead:
            self.lost()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Forked:
    """A worker process forked by a fork server, seen as a ``Popen``."""

    def __init__(self, server: ForkServer, pid: int, stdin: IO[bytes]) -> None:
        self.server = server
        self.pid = pid
        self.parent = server.pid  # the process whose death the worker watches
        self.stdin: IO[bytes] | None = stdin
        self._returncode: int | None = None
        self.pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):  # gone already, or an old kernel
            self.pidfd = os.pidfd_open(pid)

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def poll(self) -> int | None:
        if self._returncode is None:
            self._returncode = self.server.exit_of(self.pid)
            if self._returncode is not None and self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None
        return self._returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            self.server.pump(min(left, 1.0))
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# -- the fork server's side ---------------------------------------------------------------------


def serve(sock: socket.socket) -> int:
    """Import what a worker imports, say so, then fork workers on request until the agent's end
    of ``sock`` closes; then kill the workers still running, and exit."""
    import numpy.random  # noqa: F401  (numeric jobs draw random numbers: reseeded per worker)

    from . import worker  # noqa: F401  (the point of it all: imported once, here)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is the agent's
    children: set[int] = set()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    try:
        sock.send(json.dumps({"ready": os.getpid()}).encode())
        while True:
            ready = {key.fileobj for key, _ in selector.select()}
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
            reap(children, sock)
            if sock not in ready:
                continue
            data, fds, _, _ = socket.recv_fds(sock, MESSAGE, 1)  # (it ignores flags)
            if not data:
                break
            if not fds:
                sock.send(json.dumps({"error": "no stdin sent"}).encode())
                continue
            request = json.loads(data)
            reply = fork_worker(fds[0], request.get("cpu"), bool(request.get("idle")),
                                (sock, selector, wake_r, wake_w))
            if "pid" in reply:
                children.add(reply["pid"])
            sock.send(json.dumps(reply).encode())
    except (BrokenPipeError, ConnectionResetError):
        pass
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return 0


def reap(children: set[int], sock: socket.socket) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        with contextlib.suppress(OSError):
            sock.send(json.dumps({"exited": pid,
                                  "code": os.waitstatus_to_exitcode(status)}).encode())


def fork_worker(stdin: int, cpu: int | None, idle: bool, ours: tuple[Any, ...]) -> dict[str, Any]:
    """Fork a worker; pin it from here (it only waits for its stdin until the agent has our
    reply), so a failure to pin is reported and the worker runs unpinned."""
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(stdin)
        return {"error": str(exc)}
    if pid == 0:
        become_worker(stdin, idle, ours)
    os.close(stdin)
    pinned = True
    if cpu is not None:
        try:
            os.sched_setaffinity(pid, {cpu})
        except OSError:
            pinned = False
    return {"pid": pid, "pinned": pinned}


def become_worker(stdin: int, idle: bool, ours: tuple[Any, ...]) -> None:
    """In the forked child: leave the fork server's state behind and run a worker. Never
    returns."""
    code = 1
    try:
        sock, selector, wake_r, wake_w = ours
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        selector.close()
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        os.dup2(stdin, 0)
        os.close(stdin)
        parent = os.getppid()
        die_with_parent(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(0)
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        reseed()
        os.environ["SPT_NOENV"] = "1"  # the title in argv's room: /proc/PID/environ stays
        setproctitle(f"{sys.executable} -m cluster.worker")  # what ps shows: a worker
        del os.environ["SPT_NOENV"]
        from .worker import _main

        code = _main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001  (nothing of the fork server's may run on)
        code = 1
    finally:
        with contextlib.suppress(Exception):
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def reseed() -> None:
    """Forked workers would share the fork server's random state: numpy's global generator
    is seeded anew from the OS, as a fresh process would be (Python's ``random`` reseeds itself
    after a fork)."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


def main() -> int:
    """``python -m cluster.forkserver FD``, started dying with its starter."""
    return serve(socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    raise SystemExit(main())
