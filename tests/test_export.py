"""ray_jobs.export: the ONNX model (under onnxruntime), the torch.export program and predict give the
same probabilities on the same images, for a ResNet, an ADSR-Net, LRF-CNN and a 1-channel 16-bit
dataset; the files carry the metadata; the job's command line works.

The checkpoints are untrained, made here without Ray, at 16 px; the images are 20 x 23 px, so the
exported model's resize is exercised. Each run has a calibration.json (T = 1.7), so the exported
probabilities and predict's are both the calibrated ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from medbalance import __version__
from medbalance.errors import ConfigError
from ray_jobs.classifier.calibration import write_calibration
from ray_jobs.classifier.config import DataSection, TrainConfig
from ray_jobs.classifier.pipeline import InputSpec
from ray_jobs.runtime.checkpoint import save_checkpoint
from ray_jobs.runtime.configs import to_dict
from shards import ingest, read_manifest
from shards.reader import decode_to_chw

from conftest import REPO

CLASSES = ["a", "b", "c"]
IMAGE_SIZE = 16
TEMPERATURE = 1.7
TOLERANCE = 1e-4


def make_checkpoint(folder: Path, model: str, spec: InputSpec) -> str:
    """An untrained checkpoint of ``model`` with input ``spec`` and a val-fitted calibration.json."""
    from models import create_model

    folder.mkdir(parents=True)
    cfg = TrainConfig(model=model, data=DataSection(image_size=IMAGE_SIZE, channels=spec.channels))
    torch.manual_seed(0)
    weights = create_model(model, num_classes=len(CLASSES), in_chans=spec.channels).state_dict()
    save_checkpoint({"model": weights, "config": to_dict(cfg), "class_names": CLASSES, "epoch": 0,
                     "input": spec.to_dict()}, str(folder))
    write_calibration(str(folder), "made-by-the-test", TEMPERATURE, fitted={})
    return str(folder)


def rgb_images(root: Path, count: int = 4) -> tuple[str, dict[str, np.ndarray]]:
    """``count`` random 20 x 23 RGB PNGs -> (folder, source -> decoded 3 x 20 x 23 uint8)."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    decoded = {}
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 23, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        decoded[f"img{i}.png"] = decode_to_chw((root / f"img{i}.png").read_bytes(), channels=3)
    return str(root), decoded


def grey16_dataset(root: Path) -> tuple[str, dict[str, np.ndarray], InputSpec]:
    """A 1-channel 16-bit shard dataset (20 x 23 uint16 PNGs, window fixed:1000,50000) -> (URI,
    source -> the rows decoded as predict decodes them (1 x 20 x 23 float32 in [0, 1]), its InputSpec)."""
    rng = np.random.default_rng(2)
    for cls in CLASSES:
        (root / "in" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(200, 60000, (20, 23)).astype(np.uint16)).save(root / "in" / cls / f"{i}.png")
    uri = str(root / "data")
    ingest(str(root / "in"), uri, val=0, test=0, workers=1, window="fixed:1000,50000")
    manifest = read_manifest(uri)
    assert manifest.windowed
    spec = InputSpec(channels=1, depth=16, window=manifest.window, mean=(0.3,), std=(0.2,))
    decoded = {}
    for shard in manifest.shards_of("train"):
        table = pq.read_table(Path(uri) / shard.path, columns=["image", "source"])
        for data, source in zip(table["image"].to_pylist(), table["source"].to_pylist()):
            decoded[source] = decode_to_chw(data, window=spec.window, channels=1, as_float=True)
    return uri, decoded, spec


def predicted(checkpoint: str, input_uri: str, output: Path) -> tuple[dict[str, np.ndarray], dict]:
    """predict's probabilities by source, and its _SUCCESS.json."""
    from ray_jobs.classifier.prediction import predict, read_predictions

    success = predict(checkpoint, input_uri, str(output))
    table = read_predictions(str(output))
    probs = {s: np.asarray(p, np.float32) for s, p in zip(table["source"].to_pylist(),
                                                           table["probabilities"].to_pylist())}
    return probs, success


def exported(checkpoint: str, tmp_path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """Probabilities of ``images`` (N x C x H x W) from the ONNX model and the torch.export program,
    with each file's metadata."""
    import onnxruntime as ort

    from ray_jobs.classifier.export import export_model, read_torch_export

    export_model(checkpoint, "onnx", str(tmp_path / "model.onnx"))
    export_model(checkpoint, "torch-export", str(tmp_path / "model.pt2"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_probs = session.run(None, {session.get_inputs()[0].name: images})[0]
    program, torch_meta = read_torch_export(str(tmp_path / "model.pt2"))
    with torch.no_grad():
        torch_probs = program.module()(torch.from_numpy(images)).numpy()
    return onnx_probs, torch_probs, session.get_modelmeta().custom_metadata_map, torch_meta


@pytest.mark.ray
@pytest.mark.parametrize("case", ["resnet18", "adsr_resnet18", "lrf_cnn", "grey16_resnet18"])
def test_onnx_torch_export_and_predict_agree(ray_cluster, tmp_path, case):
    if case.startswith("grey16"):
        input_uri, decoded, spec = grey16_dataset(tmp_path)
        model = "resnet18"
    else:
        (input_uri, decoded), spec, model = rgb_images(tmp_path / "images"), InputSpec(), case
    checkpoint = make_checkpoint(tmp_path / "run", model, spec)
    sources = sorted(decoded)
    images = np.stack([decoded[s] for s in sources])
    assert images.dtype == (np.float32 if spec.depth == 16 else np.uint8)

    by_source, success = predicted(checkpoint, input_uri, tmp_path / "preds")
    assert success["temperature"] == TEMPERATURE
    predict_probs = np.stack([by_source[s] for s in sources])
    onnx_probs, torch_probs, onnx_meta, torch_meta = exported(checkpoint, tmp_path, images)

    figures = {"onnx-torch.export": float(np.abs(onnx_probs - torch_probs).max()),
               "onnx-predict": float(np.abs(onnx_probs - predict_probs).max()),
               "torch.export-predict": float(np.abs(torch_probs - predict_probs).max())}
    print(case, figures)
    assert onnx_probs.shape == (len(sources), len(CLASSES))
    np.testing.assert_allclose(onnx_probs.sum(axis=1), 1.0, atol=1e-5)
    assert max(figures.values()) < TOLERANCE, figures
    # the metadata
    assert torch_meta == json.loads(onnx_meta["medbalance"])
    assert json.loads(onnx_meta["class_names"]) == CLASSES == torch_meta["class_names"]
    assert torch_meta["input_spec"] == spec.to_dict() and torch_meta["image_size"] == IMAGE_SIZE
    assert float(onnx_meta["temperature"]) == TEMPERATURE and onnx_meta["medbalance_version"] == __version__
    assert torch_meta["output"] == "probabilities"


def test_export_logits_and_no_calibration(tmp_path):
    """``logits=True``: the raw logits, whose softmax(z / T) is the default export's output; and the
    job's command line writes a file that says what it holds."""
    from ray_jobs.classifier.export import export_model, read_torch_export

    checkpoint = make_checkpoint(tmp_path / "run", "resnet18", InputSpec())
    images = torch.from_numpy(np.stack(list(rgb_images(tmp_path / "images")[1].values())))
    export_model(checkpoint, "torch-export", str(tmp_path / "logits.pt2"), logits=True)
    export_model(checkpoint, "torch-export", str(tmp_path / "probs.pt2"))
    logits_program, meta = read_torch_export(str(tmp_path / "logits.pt2"))
    probs_program, _ = read_torch_export(str(tmp_path / "probs.pt2"))
    with torch.no_grad():
        logits, probs = logits_program.module()(images), probs_program.module()(images)
    assert meta["output"] == "logits"
    torch.testing.assert_close(torch.softmax(logits / TEMPERATURE, dim=1), probs, atol=1e-6, rtol=0)

    from ray_jobs.export import main

    assert main(["--checkpoint", checkpoint, "--format", "torch-export", "--out", str(tmp_path / "plain.pt2"),
                 "--no-calibration"]) == 0
    plain, meta = read_torch_export(str(tmp_path / "plain.pt2"))
    assert meta["temperature"] is None and meta["temperature_source"] == "--no-calibration"
    with torch.no_grad():
        torch.testing.assert_close(plain.module()(images), torch.softmax(logits, dim=1), atol=1e-6, rtol=0)


def test_export_refuses_a_folder_and_a_test_fitted_temperature(tmp_path):
    from ray_jobs.classifier.export import export_model

    checkpoint = make_checkpoint(tmp_path / "run", "resnet18", InputSpec())
    with pytest.raises(ConfigError, match="is a folder"):
        export_model(checkpoint, "onnx", str(tmp_path))
    calibration = Path(checkpoint) / "calibration.json"
    content = json.loads(calibration.read_text())
    calibration.write_text(json.dumps({**content, "split": "test"}))
    with pytest.raises(ConfigError, match=str(calibration)):
        export_model(checkpoint, "onnx", str(tmp_path / "model.onnx"))
    assert not (tmp_path / "model.onnx").exists()


def test_readme_documents_export():
    readme = (REPO / "README.md").read_text()
    assert "## Export" in readme and "python -m ray_jobs.export" in readme and "onnxruntime" in readme
