"""The Redis users of a Redis that `up` or a private local cluster starts (``acl.py``): the
agents' and the coordinators' users get NOPERM for what they do not need, and for keys outside
the cluster's prefix, also through a script; the default user is off. The whole suite's local
clusters run with these users, so a command the protocol needs and they lack fails there."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cluster.credentials import Credentials
from cluster.errors import InfraError, UsageError
from cluster.local import LocalCluster
from cluster.redisconf import check_version, quoted

FORBIDDEN = [
    ("CONFIG", "GET", "maxmemory"), ("CONFIG", "SET", "dir", "/root/.ssh"), ("FLUSHALL",),
    ("FLUSHDB",), ("KEYS", "*"), ("MONITOR",), ("SHUTDOWN", "NOSAVE"), ("REPLICAOF", "NO", "ONE"),
    ("ACL", "LIST"), ("MODULE", "LIST"), ("DEBUG", "SLEEP", "0"), ("GET", "other:secret"),
    ("EVAL", "return redis.call('GET', KEYS[1])", "1", "other:secret"),
    ("EVAL", "return redis.call('GET', 'other:secret')", "0"),
    ("EVAL", "return redis.call('FLUSHALL')", "0"),
    ("EVAL", "return redis.call('KEYS', '*')", "0"),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Credentials]:
    with LocalCluster(cores=1, claim_cpus=False) as creds:
        yield creds


def client(creds: Credentials, role: str) -> redis.Redis:
    mine = creds.as_role(role)
    return redis.Redis.from_url(mine.redis_url, username=mine.username, password=mine.password,
                                socket_timeout=10)


@pytest.mark.parametrize("role", ["agent", "coordinator"])
@pytest.mark.parametrize("command", FORBIDDEN, ids=lambda c: " ".join(c[:2])[:30])
def test_a_role_gets_noperm_for_what_it_does_not_need(cluster: Credentials, role: str,
                                                      command: tuple[str, ...]):
    with pytest.raises(redis.ResponseError) as refused:
        client(cluster, role).execute_command(*command)
    error = str(refused.value)
    # a script's call refused is told as such; DEBUG is off for every user (Redis 7's
    # enable-debug-command no) before ACLs are asked
    assert isinstance(refused.value, redis.exceptions.NoPermissionError) or \
        "The user executing the script can't" in error or \
        (command[0] == "DEBUG" and "not allowed" in error), error


@pytest.mark.parametrize("role", ["agent", "coordinator"])
def test_a_role_works_on_the_clusters_keys(cluster: Credentials, role: str):
    c = client(cluster, role)
    assert c.set(f"{cluster.prefix}acl-test-{role}", "1")
    assert c.eval("return redis.call('GET', KEYS[1])", 1, f"{cluster.prefix}acl-test-{role}") \
        == b"1"


def test_the_default_user_is_off_and_only_admin_configures(cluster: Credentials):
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(cluster.redis_url, password=cluster.password).ping()
    assert client(cluster, "admin").config_get("maxmemory-policy") == {
        "maxmemory-policy": "noeviction"}
    assert client(cluster, "coordinator").info("memory")["maxmemory"] > 0


def test_a_value_for_redis_conf_is_quoted_or_refused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    assert quoted('a dir/with "quotes" \\ and spaces') == \
        '"a dir/with \\"quotes\\" \\\\ and spaces"'
    with pytest.raises(UsageError, match="control character"):
        quoted("x\nrequirepass \"\"")
    odd = tmp_path / 'a dir with "quotes" and spaces'
    odd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(odd))
    with LocalCluster(cores=1, claim_cpus=False) as creds:
        assert client(creds, "coordinator").ping()


def test_up_refuses_a_redis_older_than_7():
    """On 6.x, CONFIG SET dir and SAVE write files wherever Redis's user may; 7.0 can refuse."""
    check_version("node1", "/usr/bin/redis-server", "Redis server v=7.0.15 sha=00000000:0")
    with pytest.raises(InfraError, match=r"^node1: /usr/bin/redis-server is Redis 6\.2\.7; "
                                         r"cluster needs 7\.0 or newer"):
        check_version("node1", "/usr/bin/redis-server", "Redis server v=6.2.7 sha=00000000:0")
    with pytest.raises(InfraError, match="cannot tell the version"):
        check_version("node1", "/opt/redis", "not redis at all")


def test_every_command_a_script_calls_is_one_the_agents_and_coordinators_may_run():
    """A script calling a command its caller's user lacks fails with NOPERM only on the path
    that reaches the call: a lease check, a reissue. Read every script's calls instead."""
    import re

    from cluster import acl, scripts, workscripts

    called = set()
    for module in (scripts, workscripts):
        for text in vars(module).values():
            if isinstance(text, str):
                for name, sub in re.findall(r"redis\.call\('(\w+)'(?:, '(\w+)')?", text):
                    wanted = name.lower()
                    if f"{wanted}|{sub.lower()}" in acl.COMMON:
                        wanted = f"{wanted}|{sub.lower()}"
                    called.add(wanted)
    assert len(called) > 20
    assert called - set(acl.COMMON) == set()
