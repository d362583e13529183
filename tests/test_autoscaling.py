"""Jobs on an autoscaling cluster that starts with no worker node (ray_jobs/runtime/resources.py).

The cluster is Ray's own fake autoscaler: the ``fake_multinode`` node provider that Ray's
``ray.cluster_utils.AutoscalingCluster`` uses in Ray's tests. Its head runs the real autoscaler
(``ray start --head --autoscaling-config=...`` with ``RAY_FAKE_CLUSTER=1``), and each node it
"launches" is a real raylet on this machine with the node type's resources. Two departures from
``AutoscalingCluster`` itself, both forced: its ``start``/``shutdown`` run ``ray stop --force``,
which ends every Ray process on the machine (other tests' clusters too), and the wheel does not
ship the ``fake_multi_node/example.yaml`` template it reads. So the test writes the same config
(:func:`fake_cluster_config`, the fields ``AutoscalingCluster._generate_config`` produces) and
starts the head as a child process, ended by its process group id; the nodes the autoscaler
launched live in that group too.

The head has no CPU and no GPU, as a KubeRay head with ``num-cpus: 0`` and no GPU worker up yet:
before ray_jobs/runtime/resources.py asked the autoscaler, ``train`` failed with "the cluster has 0 CPUs"
and ``sweep --gpu`` with "a trial needs 1 GPUs but the cluster has 0".
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import RAY_NODE_STOP_S, REPO, free_port, free_port_with_grpc, stop_process_group

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = str(Path(sys.executable).with_name("ray"))


def fake_cluster_config(gcs_address: str, worker_types: dict) -> dict:
    """The cluster config ``AutoscalingCluster(head_resources={}, worker_node_types=...)`` makes
    (Ray's fake_multi_node/example.yaml with the node types replaced), the GCS address given."""
    return {
        "cluster_name": "fake_multinode", "max_workers": 8, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {"ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
                                 **worker_types},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture
def autoscaling_cluster(tmp_path):
    """Start a fake autoscaling cluster whose head has no CPU and no GPU; yields ``start(worker_types)``
    -> the environment a job on it runs with (RAY_ADDRESS set, token auth on)."""
    temp = Path(tempfile.mkdtemp(prefix="mbas-", dir="/tmp"))  # short: socket paths are length-limited
    procs = []

    def start(worker_types: dict) -> dict[str, str]:
        port = free_port_with_grpc()
        address = f"127.0.0.1:{port}"
        config = temp / "cluster.json"
        config.write_text(json.dumps(fake_cluster_config(address, worker_types)))
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))},
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_TMPDIR": str(temp), "RAY_ADDRESS": address, "MEDBALANCE_SCALE_UP_TIMEOUT_S": "120"}
        head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}  # as AutoscalingCluster
        procs.append(subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
             "--num-gpus=0", f"--autoscaling-config={config}", "--include-dashboard=false",
             f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
            env=head_env, stdout=open(tmp_path / "head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True))
        return env

    try:
        yield start
    finally:
        for proc in procs:
            stop_process_group(proc, timeout=RAY_NODE_STOP_S)
        shutil.rmtree(temp, ignore_errors=True)


# A small job: size a GPU sweep with resources.plan_trials, then run each planned trial's worker as a
# task holding one GPU and the planned CPUs (the fake nodes' GPUs are resources only, no device).
GPU_SWEEP_JOB = """
import json, ray
from ray_jobs.runtime.ray_setup import init_ray
from ray_jobs.runtime.resources import plan_trials
init_ray()
concurrent, cpus = plan_trials(num_workers=1, use_gpu=True, trials=2)
@ray.remote(num_gpus=1)
def trial_worker():
    return ray.get_runtime_context().get_node_id()
nodes = ray.get([trial_worker.options(num_cpus=cpus).remote() for _ in range(concurrent)], timeout=60)
print("MB-PLAN " + json.dumps({"concurrent": concurrent, "cpus": cpus, "nodes": nodes,
                               "head": ray.get_runtime_context().get_node_id()}), flush=True)
"""


def run_job(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """A job's driver on the cluster in ``env["RAY_ADDRESS"]``, as `ray job submit` runs it."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def resource_request(env: dict[str, str]) -> list:
    """The autoscaler resource request in force (what ``request_resources`` wrote last)."""
    script = ("import json, ray; from ray.experimental.internal_kv import _internal_kv_get; ray.init(); "
              "from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL as key; "
              "print(json.loads(_internal_kv_get(key) or b'null'))")
    out = run_job(["-c", script], env, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"').replace("None", "null"))


def test_gpu_sweep_waits_for_gpu_nodes_instead_of_failing(autoscaling_cluster):
    """`sweep --gpu`'s planning on a cluster with 0 GPUs asks the autoscaler for a GPU node per
    trial, says so, waits for both nodes (not only the first), plans 2 concurrent trials on them,
    and withdraws its request when the job exits."""
    env = autoscaling_cluster({"gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {},
                                              "min_workers": 0, "max_workers": 2}})
    started = time.monotonic()
    out = run_job(["-c", GPU_SWEEP_JOB], env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    plan = json.loads(text.split("MB-PLAN ", 1)[1].splitlines()[0])
    assert "[medbalance] waiting for the autoscaler to add nodes: this job needs" in text, text[-3000:]
    assert "0 CPUs, 0 GPUs" in text and "[medbalance] the cluster has 4 CPUs, 2 GPUs" in text, text[-3000:]
    assert plan["concurrent"] == 2 and plan["cpus"] == 0.95, plan
    assert len(set(plan["nodes"])) == 2 and plan["head"] not in plan["nodes"], plan  # one trial per new GPU node
    assert resource_request(env) == [], "the job's request must be withdrawn when it exits"
    assert time.monotonic() - started < 90


def test_train_on_a_cluster_with_no_cpu_yet_scales_up_and_finishes(autoscaling_cluster, tmp_path, retina_npz):
    """`python -m ray_jobs.train` (one CPU worker, one short epoch) on a cluster whose only node, the
    head, has no CPU: the job asks for a CPU node, the autoscaler adds one, and training finishes
    there (result.json written, its worker on the new node)."""
    import numpy as np

    npz = np.load(retina_npz)
    tiny = {}
    for split, rows in (("train", 40), ("val", 10), ("test", 10)):
        tiny[f"{split}_images"], tiny[f"{split}_labels"] = npz[f"{split}_images"][:rows], npz[f"{split}_labels"][:rows]
    np.savez(tmp_path / "tiny.npz", **tiny)
    prepared = run_job(["-m", "ray_jobs.prepare", "--input", str(tmp_path / "tiny.npz"), "--output",
                        str(tmp_path / "data"), "--workers", "1"], {**os.environ, "RAY_ADDRESS": ""}, timeout=120)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    env = autoscaling_cluster({"cpu_worker": {"resources": {"CPU": 2}, "node_config": {},
                                              "min_workers": 0, "max_workers": 1}})
    out = run_job(["-m", "ray_jobs.train", "--data", str(tmp_path / "data"), "--model", "resnet18", "--loss", "ce",
                   "--epochs", "1", "--image-size", "28", "--batch-size", "16", "--num-workers", "1",
                   "--storage", str(tmp_path / "runs"), "--name", "scaled"], env, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "[medbalance] waiting for the autoscaler to add nodes" in text and "the cluster has 2 CPUs" in text, text[-3000:]
    result = json.loads((tmp_path / "runs" / "scaled" / "result.json").read_text())
    assert result["epochs"] == 1 and result["worker_nodes"], result
