"""A planted credential appears in no log, file, manifest, checkpoint or pickled filesystem."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shards import storage

from conftest import PLANTED_KEY, PLANTED_SECRET
from safety_support import run_job


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.embedded_ray
def test_planted_secret_appears_nowhere(s3_server, small_npz, tmp_path):
    """prepare -> train -> evaluate on S3 with the embedded Ray; grep every file for the secret."""
    fs = s3_server["fs"]
    bucket = f"leak-{os.getpid()}"
    fs.create_dir(bucket)
    ray_tmp = Path(f"/tmp/mbleak-{os.getpid()}")  # short: Ray's socket paths are length-limited
    shutil.rmtree(ray_tmp, ignore_errors=True)
    ray_tmp.mkdir()
    env = {"AWS_ENDPOINT_URL": s3_server["endpoint"], "AWS_ACCESS_KEY_ID": PLANTED_KEY,
           "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET, "AWS_REGION": "us-east-1", "RAY_TMPDIR": str(ray_tmp)}
    data, runs = f"s3://{bucket}/data", f"s3://{bucket}/runs"
    logs = []
    try:
        for args in (("ray_jobs.prepare", "--input", str(small_npz), "--output", data, "--workers", "1"),
                     ("ray_jobs.train", "--data", data, "--model", "resnet18", "--loss", "ce", "--epochs", "1",
                      "--batch-size", "16", "--image-size", "28", "--num-workers", "2", "--storage", runs,
                      "--name", "leak", "--set", "data.augment=none"),
                     ("ray_jobs.evaluate", "--checkpoint", f"{runs}/leak", "--data", data, "--split", "test",
                      "--out", f"{runs}/leak/eval")):
            out = run_job(*args, env=env)
            logs.append(out.stdout + out.stderr)
            assert out.returncode == 0, logs[-1][-3000:]
        # every file Ray wrote, every object in the bucket, everything the jobs printed
        hits = [str(p) for p in ray_tmp.rglob("*") if p.is_file() and PLANTED_SECRET.encode() in p.read_bytes()]
        import pyarrow.fs as pafs
        objects = [i.path for i in fs.get_file_info(pafs.FileSelector(bucket, recursive=True))
                   if i.type == pafs.FileType.File]
        assert any(o.endswith("checkpoint.pt") for o in objects) and any(o.endswith("report.json") for o in objects)
        hits += [o for o in objects if PLANTED_SECRET.encode() in fs.open_input_stream(o).read()]
        hits += [f"job output {i}" for i, text in enumerate(logs) if PLANTED_SECRET in text]
        assert hits == []
        assert list(ray_tmp.rglob("runtime_env_agent.log")), "the embedded Ray's logs were not where expected"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_s3_filesystems_carry_no_credentials_when_pickled(monkeypatch):
    import pickle

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-planted-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.resolve("s3://bucket/prefix")
    assert path == "bucket/prefix"
    blob = pickle.dumps(fs)
    assert PLANTED_SECRET.encode() not in blob and b"AKIA-planted-id" not in blob
