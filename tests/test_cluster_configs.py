"""The files in cluster/ are checked, so a broken config fails CI.

* cluster/aws-gpu.yaml goes through what `ray up` does before it touches AWS (Ray's own
  ``prepare_config`` + ``validate_config``: the JSON schema shipped inside the installed ``ray``),
  runs its nodes in the medbalance image (``docker:``, GPUs and Ray's open-files limit) and starts
  every node in token mode.
* The KubeRay manifests parse and carry what the job needs (GPU worker group with requests and
  limits that fit the node type they name, no head-only `ray start` parameter in a worker group,
  the image and Ray version of the pins, token auth through KubeRay's ``authOptions`` with the
  secret cluster/README.md makes, no literal credentials).
* cluster/runtime_env.yaml: the working dir that `ray job submit --working-dir .` packages with its
  excludes stays small (Ray's own packaging code builds the zip).
"""
from __future__ import annotations

import copy
import re
import zipfile

import pytest
import yaml

from conftest import REPO
from deploy_support import documented_secrets, image_tag, k8s_quantity, markdown_section, pinned, shell_commands

CLUSTER = REPO / "cluster"
IMAGE = re.compile(r"^[\w.-]+(?::\d+)?(?:/[\w.-]+)*/medbalance:(?P<tag>[\w.-]+)$")  # registry/.../medbalance:TAG
# `ray start` parameters Ray refuses on a node that is not the head: scripts.py's head_only_flags
# ("should only be specified when starting head node") and node.py ("System config parameters can
# only be set on the head node").
HEAD_ONLY_PARAMS = {"port", "redis-shard-ports", "include-dashboard", "system-config"}
# Node types the files name: what the instance has, and what Kubernetes leaves a pod of it. EKS's
# kubelet keeps ~0.1 vCPU and ~1 GiB (kube-reserved: 255 MiB + 11 MiB per pod, eviction threshold
# 100 MiB) and the DaemonSets (aws-node, kube-proxy, the NVIDIA device plugin) take a few hundred
# millicores more: a pod fits when it asks at most vCPUs - 0.5 and 85 % of the memory.
INSTANCE_TYPES = {"m6i.2xlarge": {"cpu": 8, "memory": 32 * 2**30, "gpu": 0},
                  "g5.2xlarge": {"cpu": 8, "memory": 32 * 2**30, "gpu": 1}}
# A credential with a value (placeholders such as "=..." or "=$VAR" in comments are fine).
SECRET_LIKE = re.compile(r"(aws_secret_access_key|aws_access_key_id|secretKey)\s*[:=]\s*[\"']?[A-Za-z0-9/+]{8,}"
                         r"|AKIA[0-9A-Z]{16}", re.IGNORECASE)


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_aws_cluster_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("aws-gpu.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on any schema violation
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["node_confg"] = {}  # a typo must not pass
    with pytest.raises(Exception, match="node_confg"):
        validate_config(prepare_config(broken))


def test_aws_cluster_config_is_secure_and_runs_the_image():
    """CPU head, autoscaling GPU workers, S3 by instance role, no credentials; every node runs the
    medbalance image (the pinned set and medbalance are installed in it, with -c constraints.txt,
    so the nodes install nothing), GPU workers with their GPU, Ray's open-files limit kept; the
    job port on 127.0.0.1; every `ray start` in token mode with the token file on every node."""
    config = load("aws-gpu.yaml")
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0                       # CPU head
    assert any(w["min_workers"] == 0 and w["max_workers"] > 0 and w["node_config"]["InstanceType"].startswith(("g", "p"))
               for w in workers)                                       # autoscaling GPU workers
    for node in [head, *workers]:
        assert "IamInstanceProfile" in node["node_config"]              # S3 by instance role
    assert not SECRET_LIKE.search(text)                                # no credentials in the file
    # medbalance comes from the image, built with the pinned set (the old setup_commands' pip install)
    docker = config["docker"]
    match = IMAGE.match(docker["image"])
    assert match and match.group("tag") == image_tag(), docker["image"]
    assert re.search(r"^RUN pip install [^\n]*-c constraints\.txt", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE)
    assert not any("pip install" in c for c in config.get("setup_commands", []) + config.get("worker_setup_commands", []))
    assert "--gpus all" in docker.get("worker_run_options", []) + docker.get("run_options", [])
    assert any(re.search(r"--ulimit nofile=65536", o) for o in docker.get("run_options", []))
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    assert "RAY_AUTH_MODE=disabled" not in text
    assert config["file_mounts"].get("~/.ray/auth_token")              # one token on every node
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        for line in (c for c in commands if "ray start" in c):        # the token file alone is not token mode
            assert re.search(r"(^|[;&\s])RAY_AUTH_MODE=token ray start", line), line
            assert line.startswith("ulimit -n 65536;"), line            # Ray's default, dropped by custom commands


def kubernetes_secrets() -> dict[str, dict[str, str]]:
    """The secrets cluster/README.md's KubeRay command log creates (the token's value: "TOKEN")."""
    section = markdown_section((CLUSTER / "README.md").read_text(), "Command log: Kubernetes")
    return documented_secrets(shell_commands(section), "TOKEN")


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_manifests_carry_what_the_job_needs(name):
    manifest = load(name)
    text = (CLUSTER / name).read_text()
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] in ("RayCluster", "RayJob")
    spec = manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]
    if manifest["kind"] == "RayJob":
        assert manifest["spec"]["entrypoint"].startswith("python -m ray_jobs.")
        assert "--gpu" in manifest["spec"]["entrypoint"] and "s3://" in manifest["spec"]["entrypoint"]
    assert spec["rayVersion"] == pinned("ray")
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups
    # Token auth: KubeRay's authOptions put RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (the secret's
    # auth_token key) in every Ray container, the autoscaler and a RayJob's submitter; the secret is
    # the one cluster/README.md creates, with that key.
    auth = spec["authOptions"]
    assert auth["mode"] == "token" and "auth_token" in kubernetes_secrets()[auth["secretName"]], auth
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        resources = container["resources"]
        assert resources["requests"] and resources["limits"]
        assert resources["requests"].get("nvidia.com/gpu") == resources["limits"].get("nvidia.com/gpu")
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {"value": "token"}).get("value") == "token"  # none turns it off
        if "RAY_AUTH_TOKEN" in env:                                       # none replaces the secret's token
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}
        assert IMAGE.match(container["image"]) and IMAGE.match(container["image"]).group("tag") == image_tag()
        assert_fits_its_node_type(group)
    for group in spec["workerGroupSpecs"]:
        refused = HEAD_ONLY_PARAMS & set(group.get("rayStartParams") or {})
        assert not refused, f"worker group {group['groupName']!r}: {refused} only on the head (Ray refuses it)"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"  # not opened to the world
    assert not SECRET_LIKE.search(text) and "RAY_AUTH_MODE=disabled" not in text


def assert_fits_its_node_type(group: dict) -> None:
    """The group's pods name a node type (nodeSelector) and ask for what that node leaves a pod."""
    pod = group["template"]["spec"]
    kind = (pod.get("nodeSelector") or {}).get("node.kubernetes.io/instance-type")
    assert kind in INSTANCE_TYPES, f"group {group.get('groupName', 'head')!r}: no known node type ({kind!r})"
    node, asked = INSTANCE_TYPES[kind], pod["containers"][0]["resources"]["requests"]
    assert k8s_quantity(asked["cpu"]) <= node["cpu"] - 0.5, (kind, asked)
    assert k8s_quantity(asked["memory"]) <= 0.85 * node["memory"], (kind, asked)
    assert k8s_quantity(asked.get("nvidia.com/gpu", 0)) <= node["gpu"], (kind, asked)


def test_runtime_env_packages_a_small_working_dir(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    runtime_env = load("runtime_env.yaml")
    for required in (".git", ".venv", "data", "runs"):
        assert required in runtime_env["excludes"]
    package = tmp_path / "pkg.zip"
    create_package(str(REPO), package, include_gitignore=True, excludes=runtime_env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert any(n.endswith("ray_jobs/train.py") for n in names)
    assert not any(n.startswith((".git/", ".venv/", "data/", "runs/")) or "/.git/" in n for n in names)
    assert package.stat().st_size < 2_000_000, f"{package.stat().st_size} bytes: something big is uploaded"
