"""Damaged shards (missing, truncated, a flipped byte) stop train, evaluate and predict once,
before Ray where they can, naming the shard and `prepare --verify`."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from medbalance.errors import DataError
from ray_jobs.classifier.config import DataSection, TrainConfig
from shards import read_manifest

from safety_support import flip_first_image_byte, run_job


def _damage(uri: str, how: str) -> str:
    """Damage the first train shard: ``missing``, ``truncated`` or ``flipped``; returns its path."""
    shard = read_manifest(uri).shards_of("train")[0].path
    path = Path(uri) / shard
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        flip_first_image_byte(uri)
    return shard


@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_missing_or_truncated_shard_fails_before_ray(dataset, checkpoint, tmp_path, how):
    shard = _damage(dataset, how)
    jobs = {
        "ray_jobs.train": ("--data", dataset, "--model", "resnet18", "--epochs", "1", "--image-size", "28",
                           "--storage", str(tmp_path / "runs"), "--name", "damaged"),
        "ray_jobs.evaluate": ("--checkpoint", checkpoint, "--data", dataset, "--split", "train",
                              "--out", str(tmp_path / "eval")),
        "ray_jobs.predict": ("--checkpoint", checkpoint, "--input", dataset, "--output", str(tmp_path / "pred")),
    }
    for module, args in jobs.items():
        started = time.monotonic()
        out = run_job(module, *args)
        seconds = time.monotonic() - started
        assert out.returncode == 2, (module, out.stdout + out.stderr)
        assert shard in out.stderr and "--verify" in out.stderr, (module, out.stderr)
        assert "Traceback" not in out.stderr
        assert seconds < 15, f"{module} took {seconds:.1f} s to refuse a {how} shard"
    assert not (tmp_path / "pred").exists() and not (tmp_path / "eval").exists()


@pytest.mark.ray
def test_flipped_byte_stops_training_once_naming_the_shard(ray_cluster, dataset, tmp_path):
    from ray_jobs.classifier.driver import fit

    shard = _damage(dataset, "flipped")
    starts = tmp_path / "starts"
    cfg = TrainConfig(name="flipped", storage=str(tmp_path / "runs"), model="resnet18", loss="ce", epochs=2,
                      num_workers=2, max_failures=2,
                      data=DataSection(uri=dataset, image_size=28, augment="none", batch_size=16))
    with pytest.raises(DataError) as info:
        fit(cfg, faults={"start_log": str(starts)})
    message = str(info.value)
    assert shard in message and "--verify" in message and "cannot decode image" in message
    assert "epoch 0" in message
    assert starts.read_text().split() in (["0", "1"], ["1", "0"])  # one attempt: no retries
    assert json.loads((tmp_path / "runs" / "flipped" / "result.json").read_text())["status"] == "data_error"


@pytest.mark.ray
def test_flipped_byte_in_evaluate_and_predict_names_the_shard(ray_cluster, dataset, checkpoint, tmp_path):
    from ray_jobs.classifier.evaluation import evaluate
    from ray_jobs.classifier.prediction import predict

    shard = _damage(dataset, "flipped")
    with pytest.raises(DataError) as info:
        evaluate(checkpoint, dataset, "train", str(tmp_path / "eval"))
    assert shard in str(info.value) and "--verify" in str(info.value)
    with pytest.raises(DataError) as info:
        predict(checkpoint, dataset, str(tmp_path / "pred"), split="train")
    assert shard in str(info.value) and "--verify" in str(info.value)
    assert not any((tmp_path / "pred").glob("**/*.parquet"))
