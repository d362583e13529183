"""Calibration kept: ``evaluate --calibrate`` writes ``<run>/calibration.json``, ``predict`` applies it
(``softmax(logits / T)``) and records it in ``_SUCCESS.json``, ``--no-calibration`` opts out, and a
temperature fitted on the test split, or for another checkpoint, is refused.

Real Ray (the session cluster), an untrained resnet18 made without Ray, a slice of RetinaMNIST.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medbalance.errors import ConfigError
from ray_jobs.classifier.calibration import CALIBRATION_FILE, run_folder, write_calibration
from ray_jobs.classifier.config import DataSection, TrainConfig
from ray_jobs.runtime.checkpoint import save_checkpoint
from ray_jobs.runtime.configs import to_dict
from shards import ingest

CLASSES = ["0", "1", "2", "3", "4"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, retina_npz) -> str:
    """RetinaMNIST, 4 images of every class in every split, as shards."""
    npz = np.load(retina_npz)
    arrays = {}
    for split in ("train", "val", "test"):
        labels = npz[f"{split}_labels"][:, 0]
        keep = np.concatenate([np.flatnonzero(labels == c)[:4] for c in range(5)])
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = npz[f"{split}_images"][keep], labels[keep, None]
    root = tmp_path_factory.mktemp("calibration")
    np.savez(root / "small.npz", **arrays)
    ingest(str(root / "small.npz"), str(root / "data"), workers=1)
    return str(root / "data")


@pytest.fixture
def run(tmp_path) -> tuple[Path, str]:
    """A run folder holding one untrained resnet18 checkpoint, named as Ray Train names them."""
    from models import create_model

    checkpoint = tmp_path / "run" / "checkpoint_2025-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    cfg = TrainConfig(model="resnet18", data=DataSection(image_size=28))
    save_checkpoint({"model": create_model("resnet18", num_classes=5).state_dict(), "config": to_dict(cfg),
                     "class_names": CLASSES, "epoch": 0}, str(checkpoint))
    (tmp_path / "run" / "result.json").write_text(json.dumps({"best_checkpoint": str(checkpoint)}))
    return tmp_path / "run", str(checkpoint)


def image_folder(root: Path, count: int = 3) -> str:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return str(root)


def test_run_folder_of_a_checkpoint():
    assert run_folder("runs/r18/checkpoint_2025-01-01") == "runs/r18"
    assert run_folder("s3://b/runs/r18/checkpoint_2025-01-01/checkpoint.pt") == "s3://b/runs/r18"
    assert run_folder("/tmp/hand-made/") == "/tmp/hand-made"  # not Ray Train's: its own run folder


@pytest.mark.ray
def test_evaluate_keeps_the_temperature_and_predict_applies_it(ray_cluster, dataset, run, tmp_path, capsys):
    from ray_jobs.classifier.evaluation import evaluate
    from ray_jobs.classifier.prediction import predict, read_predictions

    run_dir, checkpoint = run
    report = evaluate(str(run_dir), dataset, "test", str(tmp_path / "eval"), calibrate=True)
    kept = json.loads((run_dir / CALIBRATION_FILE).read_text())
    temperature = report["calibration"]["temperature"]
    assert kept["temperature"] == temperature and kept["split"] == "val" and kept["checkpoint"] == checkpoint
    assert set(kept["val"]) >= {"ece_before", "ece_after", "brier_before", "brier_after"}
    assert kept["test"]["ece_after"] == report["calibration"]["ece_after"]
    assert abs(temperature - 1.0) > 1e-3  # else the comparison below shows nothing

    images = image_folder(tmp_path / "images")
    calibrated = predict(str(run_dir), images, str(tmp_path / "calibrated"))
    assert f"temperature {temperature:.4f} from {run_dir / CALIBRATION_FILE}" in capsys.readouterr().out
    plain = predict(str(run_dir), images, str(tmp_path / "plain"), calibration=False)
    assert "calibration: none applied (--no-calibration)" in capsys.readouterr().out
    assert (calibrated["temperature"], calibrated["temperature_source"]) == (temperature,
                                                                             str(run_dir / CALIBRATION_FILE))
    assert (plain["temperature"], plain["temperature_source"]) == (None, "--no-calibration")
    assert json.loads((tmp_path / "calibrated" / "_SUCCESS.json").read_text())["temperature"] == temperature

    def probabilities(output: str) -> np.ndarray:
        table = read_predictions(output).sort_by("source")
        return np.asarray(table["probabilities"].to_pylist(), np.float64)

    p_plain, p_calibrated = probabilities(str(tmp_path / "plain")), probabilities(str(tmp_path / "calibrated"))
    # softmax(z) -> log gives z up to a per-row constant, and softmax ignores that constant
    z = np.log(p_plain) / temperature
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(p_calibrated, expected, atol=2e-6, rtol=0)
    assert np.abs(p_calibrated - p_plain).max() > 1e-4


@pytest.mark.ray
def test_a_run_without_calibration_says_so_and_records_null(ray_cluster, run, tmp_path, capsys):
    from ray_jobs.classifier.prediction import predict

    run_dir, _ = run
    success = predict(str(run_dir), image_folder(tmp_path / "images", 1), str(tmp_path / "preds"))
    assert success["temperature"] is None and success["temperature_source"].startswith("none: no ")
    assert "calibration: none applied" in capsys.readouterr().out


@pytest.mark.parametrize("fault", ["test split", "other checkpoint", "not JSON", "negative"])
def test_an_unusable_calibration_is_refused_naming_the_file(run, tmp_path, fault):
    """Refused before Ray starts (no cluster needed), with nothing written."""
    from ray_jobs.classifier.prediction import predict

    run_dir, checkpoint = run
    path = Path(write_calibration(checkpoint, "data", 1.5, fitted={}))
    content = json.loads(path.read_text())
    if fault == "test split":
        path.write_text(json.dumps({**content, "split": "test"}))
    elif fault == "other checkpoint":
        path.write_text(json.dumps({**content, "checkpoint_name": "checkpoint_1999-01-01"}))
    elif fault == "not JSON":
        path.write_text("{")
    else:
        path.write_text(json.dumps({**content, "temperature": -1}))
    with pytest.raises(ConfigError, match=str(path)) as info:
        predict(str(run_dir), image_folder(tmp_path / "images", 1), str(tmp_path / "preds"))
    if fault == "test split":
        assert "'test' split" in str(info.value)
    assert "--no-calibration" in str(info.value)
    assert not (tmp_path / "preds").exists()
