"""cluster/aws-gpu.yaml's nodes, started from its own start commands: ``head_start_ray_commands``
and ``worker_start_ray_commands`` as the launcher runs them (``ray stop`` skipped, ``RAY_HEAD_IP``
set for the worker), each node a home of its own holding what ``file_mounts`` copies there (the
token that `ray get-auth-token --generate` made on the user's machine). Only ports, addresses and
CPU counts are overridden, plus ``--block`` (the test owns the node processes); the
``--autoscaling-config`` flag is dropped (its autoscaler would call AWS). Then a job goes in with the
client environment cluster/README.md documents.

Not emulated (no AWS, no Docker engine here): `ray up`, SSH, the EC2 nodes, the Docker container.
"""
from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import free_port, free_port_with_grpc
from deploy_support import (CLUSTER, RAY, REFUSED, Nodes, alive_nodes, client_base_env, documented_client_env,
                            launcher_start_line, load_yaml, markdown_section, node_base_env, probe,
                            resolve_documented_env, shell_commands, submit, wait_until)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def aws_commands() -> list[str]:
    """The commands of cluster/README.md's AWS command log."""
    return shell_commands(markdown_section((CLUSTER / "README.md").read_text(), "Command log: AWS"))


def copy_file_mounts(config: dict, client_home: Path, node_home: Path) -> None:
    """What ``file_mounts`` puts on a node: each local file (``~`` = the user's home) at its path
    on the node (``~`` = the node's home)."""
    assert "~/.ray/auth_token" in config["file_mounts"], "the token must reach every node"
    for remote, local in config["file_mounts"].items():
        target = Path(remote.replace("~", str(node_home), 1))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local.replace("~", str(client_home), 1), target)


def node_flags(**extra) -> dict:
    """Overrides every node needs on one machine: the address, one CPU, its own agent ports, and
    ``--block``."""
    return {"node-ip-address": "127.0.0.1", "num-cpus": "1", "dashboard-agent-listen-port": str(free_port()),
            "metrics-export-port": str(free_port()), "block": None, **extra}


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """Head + one GPU-type worker from the launcher's start commands (see the module docstring)."""
    config = load_yaml("aws-gpu.yaml")
    temp = Path(tempfile.mkdtemp(prefix="mbaws-", dir="/tmp"))  # short: socket paths are length-limited
    client_home = temp / "home-client"
    client = client_base_env(client_home)
    generated = subprocess.run([RAY, "get-auth-token", "--generate"], env=client, capture_output=True, text=True,
                               timeout=60)  # the first documented command, on the user's machine
    assert generated.returncode == 0, generated.stderr
    token = (client_home / ".ray" / "auth_token").read_text().strip()
    port, dashboard = free_port_with_grpc(), free_port()
    nodes = Nodes(tmp_path_factory.mktemp("aws-logs"))
    try:
        homes = {name: temp / f"home-{name}" for name in ("head", "worker")}
        for home in homes.values():
            copy_file_mounts(config, client_home, home)
        head = nodes.start("head", launcher_start_line(
            config["head_start_ray_commands"], node_flags(port=str(port), **{"dashboard-port": str(dashboard)}),
            drop=("autoscaling-config",)), node_base_env(homes["head"], temp))
        address = f"127.0.0.1:{port}"
        ask = {**client, "RAY_AUTH_MODE": "token"}
        wait_until(lambda: alive_nodes(address, ask) >= 1, head, "the head", lambda: nodes.log("head"))
        line = launcher_start_line(config["worker_start_ray_commands"],
                                   node_flags(address=lambda value: re.sub(r":\d+$", f":{port}", value)))
        worker = nodes.start("worker", line, {**node_base_env(homes["worker"], temp), "RAY_HEAD_IP": "127.0.0.1"})
        wait_until(lambda: alive_nodes(address, ask) >= 2, worker, "the GPU worker", lambda: nodes.log("worker"),
                   timeout=90)
        yield {"dashboard": f"http://127.0.0.1:{dashboard}", "token": token, "client": client, "temp": temp}
    finally:
        nodes.stop()
        shutil.rmtree(temp, ignore_errors=True)


def test_documented_client_runs_a_job_on_both_nodes(aws):
    """`ray job submit` with the variables cluster/README.md sets and the token file it made: the
    job sees both nodes alive and runs a task on each; the nodes run with token auth, usage stats
    off and the head's system config."""
    documented, words = documented_client_env(aws_commands())
    env = {**aws["client"], **resolve_documented_env(documented, aws["token"])}
    seen = probe(submit(aws["dashboard"], words, ["python", "tests/cluster_probe.py"], env))
    assert len(seen["alive"]) == 2 and seen["ran_on"] == seen["alive"], seen
    assert seen["auth_mode"] == "token" and seen["usage_stats"] == "0", seen
    assert seen["system_config"].get("idle_worker_killing_time_threshold_ms") == 60000, seen["system_config"]


@pytest.mark.parametrize("client", ["no token", "wrong token"])
def test_submission_without_the_token_is_refused(aws, client):
    """The head refuses a client with no token and one with another token (the server's answer)."""
    _, words = documented_client_env(aws_commands())
    env = client_base_env(aws["temp"] / f"home-{client.replace(' ', '-')}")
    if client == "wrong token":
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    out = submit(aws["dashboard"], words, ["python", "-c", "print('should not run')"], env, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "should not run" not in text, text[-2000:]
    assert "No available agent" not in text and REFUSED.search(text), text[-2000:]
    assert aws["token"] not in text
