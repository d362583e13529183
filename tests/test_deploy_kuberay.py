"""cluster/kuberay-raycluster.yaml and cluster/kuberay-rayjob.yaml, started as KubeRay starts them:
the head's and the GPU worker group's `rayStartParams` and container environment become the
`ray start` lines KubeRay v1.6 generates (``ulimit -n 65536; ray start --key=value ... --block``,
run by ``/bin/bash -c``), the secrets are the ones cluster/README.md's ``kubectl create secret``
commands make, and KubeRay's ``authOptions`` injection is applied. Only ports, addresses and CPU
counts are overridden to fit one machine. Then a job goes in: on the RayCluster with the client
environment cluster/README.md documents, on the RayJob's cluster with the environment KubeRay
gives its submitter (``authOptions`` only), the entrypoint replaced by a probe.

Not emulated (no Kubernetes here): the pods, the Services, the autoscaler sidecar, the image.
"""
from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import free_port, free_port_with_grpc
from deploy_support import (CLUSTER, REFUSED, Nodes, alive_nodes, client_base_env, documented_client_env,
                            documented_secrets, kuberay_cluster_spec, kuberay_container_env, kuberay_group,
                            kuberay_start_line, kuberay_start_params, load_yaml, markdown_section, node_base_env, probe,
                            resolve_documented_env, shell_commands, submit, wait_until)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
GPU_GROUP = "gpu"


def kubernetes_commands() -> list[str]:
    """The commands of cluster/README.md's KubeRay command log."""
    return shell_commands(markdown_section((CLUSTER / "README.md").read_text(), "Command log: Kubernetes"))


@pytest.fixture(scope="module", params=["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def kuberay(request, tmp_path_factory):
    """Head + one GPU-group worker started from the manifest (see the module docstring)."""
    spec = kuberay_cluster_spec(load_yaml(request.param))
    token = secrets.token_hex(16)
    made = documented_secrets(kubernetes_commands(), token)
    temp = Path(tempfile.mkdtemp(prefix="mbkr-", dir="/tmp"))  # short: socket paths are length-limited
    logs = tmp_path_factory.mktemp("kuberay-logs")
    port, dashboard = free_port_with_grpc(), free_port()
    nodes = Nodes(logs)
    try:
        head_group = kuberay_group(spec, "head")
        head_env = {**node_base_env(temp / "home-head", temp), **kuberay_container_env(spec, head_group, made)}
        params = kuberay_start_params(spec, head_group, head=True)
        params.update({"port": str(port), "node-ip-address": "127.0.0.1", "dashboard-host": "127.0.0.1",
                       "dashboard-port": str(dashboard), "dashboard-agent-listen-port": str(free_port()),
                       "metrics-export-port": str(free_port())})
        head = nodes.start("head", kuberay_start_line(params, head=True), head_env)
        address = f"127.0.0.1:{port}"
        wait_until(lambda: alive_nodes(address, head_env) >= 1, head, "the head", lambda: nodes.log("head"))
        group = kuberay_group(spec, GPU_GROUP)
        env = {**node_base_env(temp / "home-worker", temp), **kuberay_container_env(spec, group, made)}
        params = kuberay_start_params(spec, group, head=False, head_address=address)
        params.update({"address": address, "node-ip-address": "127.0.0.1", "num-cpus": "1",
                       "dashboard-agent-listen-port": str(free_port()), "metrics-export-port": str(free_port())})
        worker = nodes.start("worker", kuberay_start_line(params, head=False), env)
        wait_until(lambda: alive_nodes(address, head_env) >= 2, worker, f"the {GPU_GROUP!r} worker",
                   lambda: nodes.log("worker"))
        yield {"dashboard": f"http://127.0.0.1:{dashboard}", "token": token, "temp": temp, "spec": spec,
               "manifest": request.param, "secrets": made}
    finally:
        nodes.stop()
        shutil.rmtree(temp, ignore_errors=True)


def client(kuberay) -> tuple[dict[str, str], list[str]]:
    """The submitting client's environment and `ray job submit` words: for the RayCluster, exactly
    what cluster/README.md sets; for the RayJob, what KubeRay gives the submitter it runs (the
    ``authOptions`` variables; its command ``ray job submit --address http://HEAD:8265 -- ENTRYPOINT``,
    here with ``--working-dir .`` to ship the probe)."""
    home = client_base_env(kuberay["temp"] / "home-client")
    if kuberay["manifest"] == "kuberay-rayjob.yaml":
        submitter = {"template": {"spec": {"containers": [{}]}}}
        env = kuberay_container_env(kuberay["spec"], submitter, kuberay["secrets"])
        return {**home, **env}, ["ray", "job", "submit", "--address", "http://head:8265", "--working-dir", ".", "--"]
    documented, words = documented_client_env(kubernetes_commands())
    return {**home, **resolve_documented_env(documented, kuberay["token"])}, words


def test_documented_client_runs_a_job_on_both_nodes(kuberay):
    """`ray job submit` with exactly the variables cluster/README.md sets (or KubeRay gives a RayJob's
    submitter): the job runs, sees the
    head and the GPU worker alive, runs a task on each, and a 1-GPU task on the GPU worker (its
    ``num-gpus`` comes from the pod's ``nvidia.com/gpu`` limit, as KubeRay sets it)."""
    env, words = client(kuberay)
    out = submit(kuberay["dashboard"], words, ["python", "tests/cluster_probe.py", json.dumps({"num_gpus": 1})], env)
    seen = probe(out)
    assert len(seen["alive"]) == 2 and seen["ran_on"] == seen["alive"], seen
    assert seen["asked_node"] != seen["driver_node"], seen  # the GPU task ran on the worker, not the head
    assert seen["auth_mode"] == "token" and seen["usage_stats"] == "0", seen
    assert seen["system_config"].get("idle_worker_killing_time_threshold_ms") == 60000, seen["system_config"]


@pytest.mark.parametrize("client", ["no token", "wrong token"])
def test_submission_without_the_token_is_refused(kuberay, client):
    """The head refuses a client with no token (no RAY_AUTH_MODE, no token file) and one with
    another token: the server's refusal, not the job agent being not ready."""
    _, words = documented_client_env(kubernetes_commands())
    env = client_base_env(kuberay["temp"] / f"home-{client.replace(' ', '-')}")
    if client == "wrong token":
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    out = submit(kuberay["dashboard"], words, ["python", "-c", "print('should not run')"], env, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "should not run" not in text, text[-2000:]
    assert "No available agent" not in text and REFUSED.search(text), text[-2000:]
    assert kuberay["token"] not in text
