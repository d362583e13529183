"""Distributed training, resume, failures, NaN stop, evaluate and predict on a real local Ray.

One session-scoped Ray (conftest.ray_cluster) and one tiny real data set (a stratified slice of
RetinaMNIST) keep this fast on 2 CPU cores.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from medbalance.errors import ConfigError, TrainingError
from ray_jobs.classifier.config import TrainConfig
from ray_jobs.classifier.driver import fit
from ray_jobs.classifier.evaluation import evaluate
from ray_jobs.classifier.prediction import predict
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.checkpoint import load_checkpoint, model_from_checkpoint
from shards import ingest, read_manifest

from conftest import kill_driver_after_checkpoint, retina_subset

pytestmark = pytest.mark.ray
REPORT_KEYS = {"accuracy", "macro_f1", "balanced_accuracy", "ece", "mce", "brier", "auc_macro", "g_mean",
               "mcc", "kappa", "per_class"}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, retina_npz) -> str:
    """RetinaMNIST, 5 classes, imbalanced: up to 24/6/6 per class for train/val/test."""
    root = tmp_path_factory.mktemp("tiny")
    retina_subset(retina_npz, root / "tiny.npz", {"train": 24, "val": 6, "test": 6}, imbalanced=True)
    uri = str(root / "shards")
    ingest(str(root / "tiny.npz"), uri, workers=1)
    return uri


def make_cfg(data: str, storage_uri: str, name: str, **overrides) -> TrainConfig:
    base = {"name": name, "storage": storage_uri, "model": "resnet18", "loss": "cws", "epochs": 2,
            "num_workers": 2, "data": {"uri": data, "image_size": 28, "augment": "light", "batch_size": 16,
                                       "eval_batch_size": 32},
            "optim": {"lr": 0.01, "warmup_epochs": 0.5}}
    return config_lib.load_config(TrainConfig, base=base, overrides=[f"{k}={v}" for k, v in overrides.items()])


def test_two_worker_run_end_to_end(ray_cluster, tiny_data, tmp_path):
    cfg = make_cfg(tiny_data, str(tmp_path / "runs"), "e2e")
    summary = fit(cfg, resume="fresh")
    assert summary["status"] == "ok" and summary["epochs"] == 2 and summary["started_at_epoch"] == 0
    saved = json.loads((tmp_path / "runs" / "e2e" / "result.json").read_text())
    assert saved["best_checkpoint"] == summary["best_checkpoint"]
    assert {"val_macro_f1", "val_balanced_accuracy", "val_ece", "val_brier", "val_auc_macro"} <= set(saved["best_metrics"])
    assert saved["best_metrics"]["val_num_samples"] == sum(read_manifest(tiny_data).class_counts("val"))
    state = load_checkpoint(summary["best_checkpoint"])  # weights_only=True inside
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "config", "class_names", "class_counts"} <= set(state)
    assert state["class_counts"] == read_manifest(tiny_data).class_counts("train")
    model = model_from_checkpoint(state)
    assert model(torch.zeros(1, 3, 28, 28)).shape == (1, 5)
    assert (tmp_path / "runs" / "e2e" / "config.yaml").exists()
    # The learning curve: one row per epoch, TensorBoard events, the PNG (ray_jobs.runtime.history).
    with open(tmp_path / "runs" / "e2e" / "metrics.csv") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in curve] == [0, 1] and {"train_loss", "val_macro_f1", "lr"} <= set(curve[0])
    assert (tmp_path / "runs" / "e2e" / "tensorboard" / "events.out.tfevents.medbalance").stat().st_size > 0
    assert (tmp_path / "runs" / "e2e" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    # --fresh refuses a name with results.
    with pytest.raises(ConfigError, match="already has results"):
        fit(make_cfg(tiny_data, str(tmp_path / "runs"), "e2e"), resume="fresh")

    # evaluate: every report key, plots, calibration before/after.
    report = evaluate(summary["best_checkpoint"], tiny_data, "test", str(tmp_path / "eval"), calibrate=True)
    written = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert REPORT_KEYS <= set(written) and written["num_samples"] == report["num_samples"]
    assert {"temperature", "ece_before", "ece_after", "brier_before", "brier_after"} <= set(written["calibration"])
    for name in ("report.md", "confusion_matrix.png", "reliability_diagram.png", "per_class_recall.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0

    # predict: one row per input, over shards (all splits) and over an image folder.
    success = predict(str(tmp_path / "runs" / "e2e"), tiny_data, str(tmp_path / "pred"), num_actors=1)
    manifest = read_manifest(tiny_data)
    total = sum(sum(c.values()) for c in manifest.counts.values())
    table = pq.read_table(tmp_path / "pred", ignore_prefixes=["_"])
    assert success["rows"] == table.num_rows == total
    assert sorted(table["source"].to_pylist()) == sorted(
        f"{s}:{i}" for s in manifest.splits() for i in range(sum(manifest.counts[s].values())))
    probs = np.array(table["probabilities"].to_pylist())
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == np.array(table["prediction"].to_pylist())).all()
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image
    for i in range(5):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(folder / f"img{i}.png")
    predict(summary["best_checkpoint"], str(folder), str(tmp_path / "pred2"))
    table2 = pq.read_table(tmp_path / "pred2", ignore_prefixes=["_"])
    assert sorted(table2["source"].to_pylist()) == [f"img{i}.png" for i in range(5)]
    with pytest.raises(ConfigError, match="not empty"):
        predict(summary["best_checkpoint"], str(folder), str(tmp_path / "pred2"))


def test_worker_killed_mid_run_is_replaced(ray_cluster, tiny_data, tmp_path):
    marker = tmp_path / "killed"
    cfg = make_cfg(tiny_data, str(tmp_path / "runs"), "kill", epochs=2, max_failures=2)
    summary = fit(cfg, faults={"kill_rank": 1, "kill_epoch": 1, "marker": str(marker)})
    assert marker.exists(), "the test hook did not kill the worker"
    assert summary["status"] == "ok" and summary["epochs"] == 2


def test_nan_loss_stops_and_keeps_last_checkpoint(ray_cluster, tiny_data, tmp_path):
    cfg = make_cfg(tiny_data, str(tmp_path / "runs"), "nan", epochs=3)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at epoch 1 step 0"):
        fit(cfg, faults={"nan_epoch": 1})
    result = json.loads((tmp_path / "runs" / "nan" / "result.json").read_text())
    assert result["status"] == "non_finite" and result["epochs"] == 1
    state = load_checkpoint(result["last_checkpoint"])
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_after_interrupted_run(ray_cluster, tiny_data, tmp_path):
    """Kill a training driver after its first checkpoint; a rerun with the same name resumes."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "ray_jobs.train", "--data", tiny_data, "--model", "resnet18", "--loss", "ce",
           "--epochs", "3", "--batch-size", "16", "--image-size", "28", "--num-workers", "2",
           "--storage", str(runs), "--name", "interrupted", "--set", "data.augment=none"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"]}
    kill_driver_after_checkpoint(cmd, env, runs / "interrupted", tmp_path / "driver.log")
    assert not (runs / "interrupted" / "result.json").exists()
    time.sleep(3)  # let Ray reap the dead driver's workers
    cfg = make_cfg(tiny_data, str(runs), "interrupted", epochs=3, loss="ce")
    with pytest.raises(ConfigError, match="has no results to resume"):
        fit(make_cfg(tiny_data, str(runs), "never-ran"), resume="resume")
    summary = fit(cfg, resume="resume")
    assert summary["started_at_epoch"] >= 1 and summary["epochs"] == 3
