"""hosts.ini: parsed once, every error names the file, the line and the key."""

from pathlib import Path

import pytest

from cluster.config import ConfigError, load

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
    assert config.redis_address() == "redis://10.0.0.11:6379/0"
    assert (node1.user, node1.port, node1.python, node1.cores) == ("alice", 22, "python3", 4)
    assert node1.install_dir == "~/.cluster/lab" and node1.agent_cpu_args() == ["--cores", "4"]
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
    (("port = 2222", "port = -1"), 15, "[host node2] port: -1 must be positive"),
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
