"""A real two-node Ray cluster with token authentication, data and checkpoints on a real S3 server,
jobs through `ray job submit`, and storage faults: the S3 server restarted mid-training, a wrong
endpoint, wrong credentials, a missing bucket.

The cluster: `ray start --head --block` and `ray start --address ... --block`, each a child
process of this test with its own CPUs and a custom resource, ended by its process group id
(never `ray stop`). Both run with RAY_AUTH_MODE=token and the same token, as cluster/README.md
tells users to; the job port binds to 127.0.0.1. The cluster has its own SeaweedFS (restartable)
so the fault test disturbs no other test.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from ray_jobs.runtime.faults import ENV as FAULTS_ENV

from conftest import (PLANTED_KEY, PLANTED_SECRET, RAY_NODE_STOP_S, REPO, SeaweedFS, free_port, free_port_with_grpc,
                      retina_subset, run_ray_job_submit, stop_process_groups)

pytestmark = [pytest.mark.slow, pytest.mark.s3]
RAY = str(Path(sys.executable).with_name("ray"))
RUNTIME_ENV = {"excludes": [".git", ".venv", "data", "runs", "*.parquet", "*.npz", ".pytest_cache"]}


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory, retina_npz) -> Path:
    return retina_subset(retina_npz, tmp_path_factory.mktemp("cluster") / "tiny.npz",
                         {"train": 16, "val": 4, "test": 4})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + second node, token auth on, their own S3 server. Yields addresses, env and the server."""
    s3 = SeaweedFS(tmp_path_factory.mktemp("cluster-s3"))
    token = secrets.token_hex(16)
    port, dashboard = free_port_with_grpc(), free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = Path(tempfile.mkdtemp(prefix="mb2n-", dir="/tmp"))  # short: socket paths are length-limited
    # Every Ray process of this cluster knows its own address: with another Ray instance on the
    # machine (the session cluster), Ray Train's internal actors would otherwise not know which.
    # The planted identity: its secret is made for this session and written in no file, so the
    # last test can grep everything the cluster wrote for it.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}, **s3.env(),
           "AWS_ACCESS_KEY_ID": PLANTED_KEY, "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET,
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ADDRESS": address,
           "RAY_USAGE_STATS_ENABLED": "0"}
    system_config = json.dumps({"idle_worker_killing_time_threshold_ms": 60000})
    logs = tmp_path_factory.mktemp("cluster-logs")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         '--resources={"head_node": 1}', "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # each node's job agent on a port of its own (the default 52365 is shared by every Ray here)
         f"--dashboard-agent-listen-port={free_port()}",
         f"--system-config={system_config}"],
        env=env, stdout=open(logs / "head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    procs = [head]
    try:
        _wait_for(lambda: _ray_status(env, address) >= 1, head, "the head node")
        worker = subprocess.Popen(
            [RAY, "start", "--block", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             '--resources={"second_node": 1}', "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}"],
            env=env, stdout=open(logs / "worker.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(worker)
        _wait_for(lambda: _ray_status(env, address) >= 2, worker, "the second node")
        dashboard_url = f"http://127.0.0.1:{dashboard}"
        _wait_for(lambda: _accepts_jobs(env, dashboard_url), head, "the job API")
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}", "env": env, "token": token,
               "s3": s3, "logs": logs, "temp_dir": temp_dir}
    finally:
        stop_process_groups(procs, timeout=RAY_NODE_STOP_S)
        s3.stop()
        import shutil
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_status(env: dict, address: str) -> int:
    """How many alive nodes `ray status` reports (0 while the cluster is not up)."""
    out = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return 0
    return len(re.findall(r"^\s*\d+ node_", out.stdout, re.MULTILINE))


def _accepts_jobs(env: dict, dashboard_url: str) -> bool:
    """True once the head's job agent runs a trivial job (it registers after the node)."""
    out = subprocess.run([RAY, "job", "submit", "--address", dashboard_url, "--", sys.executable, "-c", "pass"],
                         env=env, capture_output=True, text=True, timeout=120)
    return out.returncode == 0


def _wait_for(check, proc, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not check():
        assert proc.poll() is None, f"{what} exited"
        assert time.time() < deadline, f"{what} did not come up within {timeout} s"
        time.sleep(2)


def submit(cluster: dict, *job: str, env: dict | None = None, timeout: float = 900,
           job_env: dict | None = None) -> subprocess.CompletedProcess:
    """`ray job submit` of a medbalance job, as cluster/README.md shows (token from the environment;
    ``job_env``: variables for the job, e.g. a test's MEDBALANCE_TEST_FAULTS). Its output is kept in
    the cluster's log folder for the final secret grep."""
    runtime_env = {**RUNTIME_ENV, **({"env_vars": job_env} if job_env else {})}
    cmd = [RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, "-m", *job]
    out = run_ray_job_submit(cmd, env=env or cluster["env"], timeout=timeout)
    with open(cluster["logs"] / "submit-outputs.log", "a") as f:
        f.write(out.stdout + out.stderr)
    return out


@pytest.fixture(scope="module")
def data(cluster, tiny_npz) -> str:
    """The tests' dataset, prepared once on the cluster's S3 server (jobs only read it; each test
    writes into a bucket of its own)."""
    data = f"{cluster['s3'].bucket()}/data"
    out = subprocess.run([sys.executable, "-m", "ray_jobs.prepare", "--input", str(tiny_npz), "--output", data,
                          "--workers", "1"], cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return data


def train_args(data: str, runs: str, name: str, epochs: int = 1, *extra: str) -> list[str]:
    return ["ray_jobs.train", "--data", data, "--storage", runs, "--name", name, "--model", "resnet18", "--loss", "ce",
            "--epochs", str(epochs), "--batch-size", "16", "--image-size", "28", "--num-workers", "2",
            "--set", "data.augment=none", *extra]  # CPUs per worker as planned: 1 of each node's 2


def read_json(server: SeaweedFS, uri: str) -> dict:
    with server.fs.open_input_stream(uri[len("s3://"):]) as f:
        return json.loads(f.read())


def test_submit_without_the_token_is_refused(cluster):
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_TOKEN_PATH"] = str(Path(tempfile.mkdtemp()) / "no-token")  # not ~/.ray/auth_token
    out = submit(cluster, "ray_jobs.train", "--help", env=env, timeout=120)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "No available agent" not in text  # refused for the token, not for readiness
    assert re.search(r"(?i)token|unauthori[sz]ed|401|authentication (?:failed|error|required)", text), text[-2000:]
    assert cluster["token"] not in text
    ok = submit(cluster, "ray_jobs.train", "--help", timeout=120)  # the same with the token
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-2000:]


def test_two_node_training_with_data_and_checkpoints_on_s3(cluster, data, monkeypatch):
    """prepare -> train (one worker per node) -> evaluate -> predict, all through S3 and
    `ray job submit --working-dir` (the packaged checkout, as cluster/README.md shows)."""
    s3 = cluster["s3"]
    runs = f"{s3.bucket()}/runs"
    started = time.monotonic()
    out = submit(cluster, *train_args(data, runs, "spread", 2, "--set", "placement_strategy=STRICT_SPREAD"))
    seconds = time.monotonic() - started
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    job_id = re.search(r"raysubmit_\w+", out.stdout + out.stderr).group(0)
    status = subprocess.run([RAY, "job", "status", "--address", cluster["dashboard"], job_id], env=cluster["env"],
                            capture_output=True, text=True, timeout=120)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
    result = read_json(s3, f"{runs}/spread/result.json")
    assert result["epochs"] == 2 and result["best_checkpoint"].startswith(f"{runs}/spread/checkpoint_")
    for key, value in s3.env().items():  # this process reads the cluster's S3 server as the jobs do
        monkeypatch.setenv(key, value)
    from ray_jobs.runtime.checkpoint import load_checkpoint
    assert load_checkpoint(result["best_checkpoint"])["epoch"] in (0, 1)
    nodes = {w["node_id"] for w in result["worker_nodes"]}
    assert len(result["worker_nodes"]) == 2 and len(nodes) == 2, result["worker_nodes"]  # both nodes trained
    (cluster["logs"] / "two_node_train_seconds.txt").write_text(f"{seconds:.1f}\n")
    print(f"two-node training job (ray job submit, 2 epochs): {seconds:.1f} s")

    out = submit(cluster, "ray_jobs.evaluate", "--checkpoint", f"{runs}/spread", "--data", data, "--split", "test",
                 "--out", f"{runs}/spread/eval")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = read_json(s3, f"{runs}/spread/eval/report.json")
    assert report["num_samples"] == 20
    assert {"accuracy", "macro_f1", "balanced_accuracy", "ece", "mce", "brier", "auc_macro", "g_mean", "mcc",
            "kappa", "per_class"} <= set(report)
    out = submit(cluster, "ray_jobs.predict", "--checkpoint", f"{runs}/spread", "--input", data, "--split", "test",
                 "--output", f"{runs}/spread/predictions")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert read_json(s3, f"{runs}/spread/predictions/_SUCCESS.json")["rows"] == 20


def test_sweep_on_the_two_node_cluster(cluster, data):
    """A small sweep (2 trials of one epoch) through `ray job submit`, data and results on S3."""
    s3 = cluster["s3"]
    bucket = s3.bucket()
    out = submit(cluster, "ray_jobs.sweep", "--config", "configs/sweep-cws.yaml", "--data", data, "--trials", "2",
                 "--epochs", "1", "--image-size", "28", "--num-workers", "1", "--storage", f"{bucket}/sweeps",
                 "--name", "sw", "--set", "base.model=resnet18", "--set", "base.data.augment=none",
                 "--set", "base.data.batch_size=16", "--set", "scheduler.grace_period=1")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    with s3.fs.open_input_stream(f"{bucket[5:]}/sweeps/sw/trials.csv") as f:
        rows = f.read().decode().strip().splitlines()
    assert len(rows) == 3, rows  # header + 2 trials
    assert s3.fs.get_file_info(f"{bucket[5:]}/sweeps/sw/best_config.yaml").size > 0


def test_gan_on_the_two_node_cluster(cluster, data):
    """GCGAN (2 DDP workers, 4 iterations) and a synthesized dataset version, all on S3, through
    `ray job submit`; the version passes --verify and holds the real shards by reference."""
    s3 = cluster["s3"]
    bucket = s3.bucket()
    gan = f"{bucket}/gan"
    out = submit(cluster, "ray_jobs.gan", "train", "--data", data, "--classes", "4", "--image-size", "32",
                 "--iterations", "4", "--batch-size", "2", "--num-workers", "2", "--checkpoint-every", "2",
                 "--storage", gan, "--name", "g", "--set", "ngf=8", "--set", "ndf=8", "--set", "num_samples=4")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    result = read_json(s3, f"{gan}/g/result.json")
    assert result["classes"] == ["4"] and result["checkpoint"]["4"].startswith(f"{gan}/g/4/checkpoint_"), result
    assert result["runs"]["4"]["iterations"] == 4
    grids = s3.fs.get_file_info(pafs.FileSelector(f"{gan[5:]}/g/4/samples"))
    assert len([g for g in grids if g.base_name.endswith(".png")]) >= 2

    version = f"{bucket}/data-gan"
    out = submit(cluster, "ray_jobs.gan", "synthesize", "--checkpoint", f"{gan}/g", "--output", version,
                 "--per-class", "3")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    manifest = read_json(s3, f"{version}/manifest.json")
    assert manifest["format_version"] == 2 and manifest["synthetic_counts"]["train"]["4"] == 3
    assert sum(manifest["synthetic_counts"]["train"].values()) == 3 and set(manifest["synthetic_counts"]) == {"train"}
    assert {s["dataset"] for s in manifest["shards"] if s.get("dataset")} == {data}
    verified = subprocess.run([sys.executable, "-m", "ray_jobs.prepare", "--verify", version], cwd=REPO,
                              env=cluster["env"], capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_s3_server_restarted_mid_training(cluster, data):
    """Stop the S3 server after the first checkpoint, start it again on the same port and data:
    the run rides it out (retries with backoff) and finishes; no epoch is lost or trained twice."""
    s3 = cluster["s3"]
    bucket = s3.bucket()
    runs = f"{bucket}/runs"
    starts = Path(tempfile.mkdtemp(prefix="mbstarts-")) / "starts"  # one line per worker (re)start
    restarted = {}

    def restart_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                infos = s3.fs.get_file_info(pafs.FileSelector(f"{bucket[5:]}/runs/restart", allow_not_found=True))
                if any(i.base_name.startswith("checkpoint_") for i in infos):
                    began = time.monotonic()
                    s3.restart(down_s=3)
                    restarted["down_s"] = time.monotonic() - began
                    return
            except OSError:
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=restart_after_first_checkpoint, daemon=True)
    thread.start()
    out = submit(cluster, *train_args(data, runs, "restart", 4),
                 job_env={FAULTS_ENV: json.dumps({"start_log": str(starts)})})
    thread.join(timeout=60)
    assert restarted, "the S3 server was never restarted (no checkpoint seen)"
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    result = read_json(s3, f"{runs}/restart/result.json")
    assert result["epochs"] == 4 and result["started_at_epoch"] == 0
    assert sorted(starts.read_text().split()) == ["0", "1"]  # never restarted from a checkpoint
    print(f"S3 server down for {restarted['down_s']:.1f} s mid-training; the run finished all 4 epochs")


@pytest.mark.parametrize("fault", ["wrong endpoint", "wrong credentials", "missing bucket"])
def test_storage_misconfiguration_fails_fast_and_clearly(cluster, data, fault):
    s3 = cluster["s3"]
    bucket = s3.bucket()
    env = dict(cluster["env"])
    expected = {"wrong endpoint": "did not answer", "wrong credentials": "refused the credentials",
                "missing bucket": "does not exist"}[fault]
    if fault == "wrong endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    elif fault == "wrong credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    else:
        data = "s3://no-such-bucket-here/data"
    env.pop("RAY_ADDRESS")  # as a user runs it: the check comes before any Ray
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", *train_args(data, f"{bucket}/runs", "bad")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    assert out.returncode == 2, out.stderr[-3000:]
    assert expected in out.stderr and "Traceback" not in out.stderr
    assert "not-the-secret" not in out.stdout + out.stderr
    assert seconds < 30, f"{fault}: {seconds:.1f} s to fail"


def test_the_secret_key_is_nowhere_the_cluster_wrote(cluster):
    """Last in this file: after every job above, the S3 secret is in no Ray log or session file of
    either node, no job output, and no object on the S3 server (checkpoints, configs, results)."""
    secret = PLANTED_SECRET.encode()
    assert cluster["env"]["AWS_SECRET_ACCESS_KEY"] == PLANTED_SECRET
    found = [str(p) for root in (cluster["temp_dir"], cluster["logs"]) for p in Path(root).rglob("*")
             if p.is_file() and not p.is_symlink() and secret in _read(p)]
    s3 = cluster["s3"]
    objects = 0
    for bucket in s3.fs.get_file_info(pafs.FileSelector("")):
        for info in s3.fs.get_file_info(pafs.FileSelector(bucket.path, recursive=True)):
            if info.type == pafs.FileType.File:
                objects += 1
                with s3.fs.open_input_stream(info.path) as f:
                    if secret in f.read():
                        found.append(f"s3://{info.path}")
    assert objects > 20 and (cluster["logs"] / "submit-outputs.log").stat().st_size > 0
    assert not found, found


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a socket or a file removed while listing
        return b""
