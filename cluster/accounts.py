"""The hosts' own users, when `up` connects as root.

Nothing that reads input from the network runs as root: Redis runs as ``redis_user`` and the
workers, which run job code, as ``worker_user`` (hosts.ini; system users without a login,
made by `up` where missing). The agent stays root, to start workers as their user and to keep
its credentials file (0600) out of their reach. The install directory is then 0711: its
users can reach what they need (the virtualenv, their own directories) and list nothing.

    install_dir/            root 0711
        credentials.json    root 0600   the agent's: no worker reads it
        venv/ wheels/       root        workers run the virtualenv's python
        tls/ca.pem          root 0644   the CA that signed Redis's certificate (public)
        cache/              worker_user job directories, unpacked by the workers
        redis/              redis_user 0700: redis.conf (every Redis user's password), AOF

A user named ``root`` (or the SSH user) in hosts.ini turns this off; an SSH user that is not
root runs everything as itself (the README's security model says what that costs).
"""

from __future__ import annotations

import shlex

from .remote import Remote
from .ssh import HostError

NOBODY = "root"  # worker_user = root / redis_user = root: no user of its own

# in the host's python: become user argv[1] (its group, no others), then exec argv[2:]
BECOME = ("import os, pwd, sys; p = pwd.getpwnam(sys.argv[1]); os.setgroups([]); "
           "os.setgid(p.pw_gid); os.setuid(p.pw_uid); os.execv(sys.argv[2], sys.argv[2:])")


def apart(remote: Remote, user: str) -> bool:
    """True when processes run as ``user`` instead of the SSH user on this host."""
    return remote.root and user != NOBODY


def ensure_user(remote: Remote, user: str, key: str) -> None:
    """A system user and group ``user`` (hosts.ini's ``key``), without home or login, unless
    it exists. Retried:
    `up` prepares hosts at once and hosts may share /etc/passwd (useradd locks it)."""
    q = shlex.quote(user)
    if not remote.sh(f"id -u {q} 2>/dev/null || true").strip():
        if not remote.sh("command -v useradd || true").strip():
            raise HostError(remote.host.name, f"no user {user!r} and no useradd to make it: "
                            f"create it (a system user without login) or set {key} = root")
    remote.sh(f"for i in $(seq 50); do id -u {q} >/dev/null 2>&1 && exit 0; useradd --system "
              f"--user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "
              f"{q} 2>/dev/null || sleep 0.1; done; id -u {q} >/dev/null")


def as_user(remote: Remote, user: str, argv: list[str]) -> str:
    """A shell command that runs ``argv`` (its program an absolute path) as ``user``."""
    return " ".join(shlex.quote(a) for a in [remote.host.python, "-c", BECOME, user, *argv])


def check_reach(remote: Remote, user: str, path: str, key: str) -> None:
    """``user`` can run (or read) ``path``, else a ``HostError`` that says what to change."""
    probe = as_user(remote, user, ["/bin/sh", "-c", 'test -r "$1" -a -x "$1"', "sh", path])
    if remote.sh(f"{probe} && echo yes || true").strip() != "yes":
        raise HostError(remote.host.name, f"{key} {user} cannot reach {path}: a directory "
                        f"above {remote.dir} is private; move install_dir (e.g. under "
                        f"/var/lib/cluster) or set {key} = root")
