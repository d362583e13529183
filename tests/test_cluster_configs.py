"""The files in cluster/ are checked, so a broken config fails CI.

* cluster/aws-gpu.yaml goes through what `ray up` does before it touches AWS (Ray's own
  ``prepare_config`` + ``validate_config``: the JSON schema shipped inside the installed ``ray``).
* The KubeRay manifests parse and carry what the job needs (GPU worker group with requests and
  limits, the entrypoint, token auth from a secret, no literal credentials).
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

CLUSTER = REPO / "cluster"
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


def test_aws_cluster_config_is_secure_and_installs_medbalance():
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
    assert any("pip install" in c and "constraints.txt" in c for c in config["setup_commands"])
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    assert "RAY_AUTH_MODE=disabled" not in text
    assert config["file_mounts"].get("~/.ray/auth_token")              # one token on every node


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_manifests_carry_what_the_job_needs(name):
    manifest = load(name)
    text = (CLUSTER / name).read_text()
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] in ("RayCluster", "RayJob")
    spec = manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]
    if manifest["kind"] == "RayJob":
        assert manifest["spec"]["entrypoint"].startswith("python -m ray_jobs.")
        assert "--gpu" in manifest["spec"]["entrypoint"] and "s3://" in manifest["spec"]["entrypoint"]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    for container in containers:
        resources = container["resources"]
        assert resources["requests"] and resources["limits"]
        assert resources["requests"].get("nvidia.com/gpu") == resources["limits"].get("nvidia.com/gpu")
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]    # token from a secret
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"  # not opened to the world
    assert not SECRET_LIKE.search(text) and "RAY_AUTH_MODE=disabled" not in text


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
