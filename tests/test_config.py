"""hosts.ini: parsed once, every error names the file, the line and the key."""

from pathlib import Path

import pytest

from cluster.config import ConfigError, load
from cluster.settings import Memory, Range, parse_memory

GOOD = """\
[cluster]
name = lab
redis = node1
user = alice
identity_file = ~/.ssh/lab

[host node1]
address = 10.0.0.11
cores = 4

[host node2]
address = 10.0.0.12
cpus = 0-3,8-11
user = bob
port = 2222
python = /opt/py/bin/python3
install_dir = /srv/cluster
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hosts.ini"
    path.write_text(text)
    return path


def test_a_good_file_and_its_precedence(tmp_path):
    config = load(write(tmp_path, GOOD))
    node1, node2 = config.hosts
    assert (config.name, config.prefix, config.redis_host) == ("lab", "lab:", "node1")
    assert config.redis_address() == "rediss://10.0.0.11:6379/0"  # TLS by default
    assert (node1.user, node1.port, node1.python, node1.cores) == ("alice", 22, "python3", 4)
    assert node1.install_dir == "" and node1.agent_cpu_args() == ["--cores", "4"]
    assert (node2.user, node2.port, node2.install_dir) == ("bob", 2222, "/srv/cluster")
    assert node2.agent_cpu_args() == ["--cpus", "0-3,8-11"]
    assert config.state_dir == Path("~/.config/cluster/lab").expanduser()
    assert config.known_hosts == config.state_dir / "known_hosts"


def test_an_existing_redis_by_url(tmp_path):
    config = load(write(tmp_path, GOOD.replace("redis = node1", "redis = redis://r:7000/0")))
    assert config.redis_host is None and config.redis_address() == "redis://r:7000/0"


@pytest.mark.parametrize("change, line, words", [
    (("cores = 4", "cores = four"), 9, "[host node1] cores: 'four' is not a whole number"),
    (("cores = 4", "coers = 4"), 9, "[host node1] coers: unknown key"),
    (("cores = 4", "cores = 4\ncpus = 1"), 10, "give cores or cpus, not both"),
    (("cpus = 0-3,8-11", "cpus = 3-1"), 13, "[host node2] cpus: bad CPU list"),
    (("redis = node1", "redis = node9"), 3, "neither a redis:// URL nor a host"),
    (("address = 10.0.0.12\ncpus = 0-3,8-11\nuser = bob\nport = 2222",
      "address = 10.0.0.11\ncpus = 0-3,8-11\nuser = bob\nport = 22"), 12,
     "10.0.0.11:22 is already host node1"),
    (("[host node2]", "[hots node2]"), 11, "unknown section"),
    (("port = 2222", "port = -1"), 15, "[host node2] port: -1 is not a whole number from 1 to "
     "65535"),
    (("cores = 4", "cores = 0"), 9, "[host node1] cores: 0 is not a whole number from 1 to"),
    (("name = lab", "name = lab lab"), 2, "not a valid cluster name"),
])
def test_errors_name_file_line_and_key(tmp_path, change, line, words):
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert words in str(info.value)


def test_whole_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="no \\[cluster\\] section"):
        load(write(tmp_path, "[host a]\n"))
    with pytest.raises(ConfigError, match="no \\[host NAME\\] section"):
        load(write(tmp_path, "[cluster]\nredis = a\n"))
    with pytest.raises(ConfigError, match=":3: not a valid INI file"):
        load(write(tmp_path, "[cluster]\nname = a\nname = b\n"))
    with pytest.raises(ConfigError, match="cannot read it"):
        load(tmp_path / "missing.ini")


def with_cluster_key(tmp_path: Path, line: str) -> Path:
    """GOOD with one more [cluster] line, at line 6."""
    return write(tmp_path, GOOD.replace("identity_file = ~/.ssh/lab\n",
                                        f"identity_file = ~/.ssh/lab\n{line}\n"))


@pytest.mark.parametrize("line, words", [
    ("connect_timeout = 0", "connect_timeout: 0 is not a number of seconds from 0.1 to 600"),
    ("connect_timeout = soon", "connect_timeout: 'soon' is not a number of seconds"),
    ("redis_port = 70000", "redis_port: 70000 is not a whole number from 1 to 65535"),
    ("redis_port = 6379.5", "redis_port: '6379.5' is not a whole number"),
    ("port = 0", "[cluster] port: 0 is not a whole number from 1 to 65535"),
    ("heartbeat = 0", "heartbeat: 0 is not a number of seconds from 0.01 to 60"),
    ("heartbeat = nan", "heartbeat: nan is not a number of seconds"),
    ("redis_grace = -1", "redis_grace: -1 is not a number of seconds from 0 to"),
    ("lease = 0", "lease: 0 is not a number of seconds from 0.1 to 3600"),
    ("lease = 1", "lease: 1 must be more than twice the heartbeat (0.5 s)"),
    ("heartbeat = 3", "heartbeat: 3 is too long for the default lease of 5 s, which must be "
     "more than twice the heartbeat (3 s)"),
    ("redis_maxmemory = 95%", "redis_maxmemory: 95% is not a share of RAM from 1% to 90%"),
    ("redis_maxmemory = 1mb", "redis_maxmemory: 1mb is not a share of RAM"),
    ("redis_maxmemory = lots", "redis_maxmemory: 'lots' is not a share of RAM"),
])
def test_numbers_out_of_range_name_file_line_and_key(tmp_path, line, words):
    path = with_cluster_key(tmp_path, line)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}:6: [cluster] "), str(info.value)
    assert words in str(info.value)


def test_numbers_in_range(tmp_path):
    config = load(with_cluster_key(tmp_path, "connect_timeout = 0.5\nheartbeat = 0.2\n"
                                   "lease = 1\nredis_grace = 0\nredis_maxmemory = 2gb"))
    assert (config.connect_timeout, config.heartbeat, config.lease) == (0.5, 0.2, 1.0)
    assert config.redis_grace == 0 and config.redis_maxmemory == Memory(size=2 * 2**30)
    default = load(write(tmp_path, GOOD))
    assert (default.connect_timeout, default.heartbeat, default.lease) == (10.0, 0.5, 5.0)
    assert default.redis_maxmemory == Memory(fraction=0.5)


@pytest.mark.parametrize("text, memory", [
    ("60%", Memory(fraction=0.6)), ("4gb", Memory(size=4 * 2**30)),
    ("512MB", Memory(size=512 * 2**20)), ("1.5g", Memory(size=int(1.5 * 2**30))),
    (str(2**30), Memory(size=2**30)),
])
def test_memory_sizes(text, memory):
    assert parse_memory(text) == memory
    assert memory.of(8 * 2**30) == (memory.size or int(8 * 2**30 * memory.fraction))


def test_ranges_say_what_they_accept():
    assert Range(1, 10, whole=True).parse("3") == 3
    assert Range(0, unit="seconds", above=True).parse("0.25") == 0.25
    with pytest.raises(ValueError, match="^0 is not a number of seconds above 0$"):
        Range(0, unit="seconds", above=True).parse("0")
    with pytest.raises(ValueError, match="^inf is not a number of at least 0$"):
        Range(0).parse("inf")
    with pytest.raises(ValueError, match="^'2.5' is not a whole number of at least 1$"):
        Range(1, whole=True).parse("2.5")
