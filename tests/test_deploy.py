"""deploy/: no container engine runs here, so the compose file and the Dockerfile are checked by
reading them: what they start, with which signals and grace, and that no secret is in them or on
a command line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from conftest import ROOT

from cluster.arguments import build_parser

DEPLOY = ROOT / "deploy"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_runs_redis_and_an_agent_with_secrets_off_command_lines():
    c = compose()
    redis, agent = c["services"]["redis"], c["services"]["agent"]
    script = " ".join(redis["entrypoint"])
    assert "requirepass" in script and "--requirepass" not in script  # a config file, not argv
    assert "appendonly yes" in script and "maxmemory-policy noeviction" in script
    assert redis["secrets"] == ["redis_password"]
    assert agent["depends_on"] == ["redis"]
    assert (DEPLOY / agent["build"]["context"] / agent["build"]["dockerfile"]).resolve() == \
        (DEPLOY / "Dockerfile").resolve()
    secret = agent["secrets"][0]["target"]
    command = agent["command"]
    assert command[:3] == ["agent", "--credentials", f"/run/secrets/{secret}"]
    build_parser().parse_args(command)  # the agent accepts these flags
    for name, spec in c["secrets"].items():
        assert spec["file"].startswith("./secrets/"), name  # files next to it, not values


def test_stops_are_graceful_with_more_grace_than_the_agent_takes():
    for service in compose()["services"].values():
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert int(service["stop_grace_period"].rstrip("s")) > 10  # workers get 10 s


def test_the_dockerfile_runs_the_agent_as_a_user_with_a_cache():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER cluster$", text, re.M)
    assert "--uid 10001" in text and "install -d -o cluster" in text
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd is not None
    args = yaml.safe_load(cmd.group(1))
    build_parser().parse_args(args)
    assert args[args.index("--cache-dir") + 1] == "/var/cache/cluster"
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)


def test_the_crontab_example_parses_as_a_submit():
    lines = [line for line in (DEPLOY / "crontab.example").read_text().splitlines()
             if line and not line.startswith(("#", "SHELL", "PATH", "MAILTO"))]
    assert lines
    for line in lines:
        command = line.split(None, 5)[5]
        submit = shlex.split(command.split("&&")[1].split(">>")[0].replace("\\%", "%"))
        assert Path(submit[0]).name == "cluster" and submit[1] == "submit"
        args = build_parser().parse_args(submit[1:])
        assert args.overlap in ("forbid", "wait")
        assert "--password" not in submit and "CLUSTER_REDIS_PASSWORD" not in line
