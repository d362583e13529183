"""The GAN job on a real local Ray: per-class DDP training on bundled BCCD-WBC, concurrency, a lost
worker, a killed driver, a NaN stop; synthesis into a dataset version that verify accepts and the
classifier trains on (real shards untouched, synthetic rows never in val/test); FID/KID and the
memorisation check.

Tiny on purpose (32 px, narrow networks, a few iterations): the Ray plumbing is what is tested
here; the networks are tested in test_gan_models.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from medbalance.errors import ConfigError, DataError, TrainingError
from ray_jobs.gcgan.config import GanConfig
from ray_jobs.gcgan.driver import fit_classes, resolve_classes
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.checkpoint import load_checkpoint
from ray_jobs.runtime.run_dir import RunDir
from shards import ShardDataset, ingest, read_manifest, verify
from shards.image import encode_array_png, sha256_hex
from shards.schema import MANIFEST_NAME, SCHEMA

from conftest import REPO, kill_driver_after_checkpoint

TINY = {"image_size": 32, "batch_size": 2, "ngf": 8, "ndf": 8, "checkpoint_every": 2, "log_every": 100,
        "num_samples": 4}


@pytest.fixture(scope="module")
def bccd(tmp_path_factory, bccd_dir) -> str:
    uri = str(tmp_path_factory.mktemp("bccd") / "shards")
    ingest(str(bccd_dir), uri, workers=1)
    return uri


def gan_cfg(data: str, storage_uri: str, name: str, **overrides) -> GanConfig:
    base = {"data": data, "storage": storage_uri, "name": name, **TINY}
    return config_lib.load_config(GanConfig, base=base, overrides=[f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def tree_digest(root: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def gan_run(ray_cluster, bccd, tmp_path_factory):
    """Monocyte and Basophil, concurrently, 2 workers each; rank 1 of one run dies at iteration 3."""
    runs = tmp_path_factory.mktemp("gan-runs")
    marker = runs / "killed"
    cfg = gan_cfg(bccd, str(runs), "two", classes="Monocyte,Basophil", iterations=4, num_workers=2, concurrent=2,
                  max_failures=2)
    summary = fit_classes(cfg, resume="fresh", faults={"kill_rank": 1, "kill_iteration": 3, "marker": str(marker)})
    return {"summary": summary, "runs": runs, "marker": marker, "cfg": cfg}


# ----------------------------------------------------------------------------- training
@pytest.mark.ray
def test_two_classes_train_concurrently_and_survive_a_lost_worker(gan_run):
    summary, runs = gan_run["summary"], gan_run["runs"]
    assert gan_run["marker"].exists(), "the test hook did not kill a worker"
    saved = json.loads((runs / "two" / "result.json").read_text())
    assert saved["classes"] == ["Monocyte", "Basophil"] and saved["status"] == "ok"
    assert saved["reconstruction_loss"] == "l1" and saved["concurrent"] == 2
    a, b = (saved["runs"][c] for c in saved["classes"])
    assert a["started"] < b["finished"] and b["started"] < a["finished"], "the class runs did not overlap"
    for name, run in saved["runs"].items():
        assert run["status"] == "ok" and run["iterations"] == 4
        state = load_checkpoint(saved["checkpoint"][name], required=("g", "d", "g_ema", "opt_g", "opt_d"))
        assert state["iteration"] == 4 and state["class_name"] == name and state["reconstruction"] == "l1"
        assert {"scaler_g", "scaler_d", "config"} <= set(state)
        grids = [Path(p).name for p in run["sample_grids"]]
        assert grids == ["iter_000002.png", "iter_000004.png"]
        assert Path(run["sample_grids"][-1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        folder = Path(run["sample_grids"][-1]).parents[1]   # the class's run: metrics.csv per checkpoint
        curve = (folder / "metrics.csv").read_text().splitlines()
        assert curve[0].startswith("iteration,") and [line.split(",")[0] for line in curve[1:]] == ["2", "4"]
        assert (folder / "learning_curves.png").stat().st_size > 0 and (folder / "tensorboard").is_dir()
    assert summary["checkpoint"] == saved["checkpoint"]


def test_auto_picks_the_classes_below_the_median(bccd):
    manifest = read_manifest(bccd)  # train counts: Basophil 1, Eosinophil 61, Lymphocyte 23, Monocyte 14, Neutrophil 145
    assert [n for _, n in resolve_classes(manifest, "auto")] == ["Basophil", "Monocyte"]
    with pytest.raises(ConfigError, match="not a class"):
        resolve_classes(manifest, "Monocyte,Platelet")


@pytest.mark.ray
@pytest.mark.slow
def test_killed_driver_resumes_and_a_nan_stops_naming_the_iteration(ray_cluster, bccd, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "ray_jobs.gan", "train", "--data", bccd, "--classes", "Monocyte",
           "--image-size", "32", "--iterations", "40", "--batch-size", "2", "--num-workers", "1",
           "--storage", str(runs), "--name", "killed", "--checkpoint-every", "2",
           "--set", "ngf=8", "--set", "ndf=8", "--set", "num_samples=4"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"]}
    kill_driver_after_checkpoint(cmd, env, runs / "killed" / "Monocyte", tmp_path / "driver.log")
    assert not (runs / "killed" / "result.json").exists()
    time.sleep(3)  # let Ray reap the dead driver's workers
    with pytest.raises(ConfigError, match="already has results"):
        fit_classes(gan_cfg(bccd, str(runs), "killed", classes="Monocyte", iterations=40), resume="fresh")
    newest = load_checkpoint(RunDir(str(runs / "killed"), "Monocyte").latest_checkpoint(), required=("g_ema",))
    resumed_at, nan_at = newest["iteration"], newest["iteration"] + 2
    # The rerun resumes from the newest checkpoint; a NaN two iterations later stops it.
    cfg = gan_cfg(bccd, str(runs), "killed", classes="Monocyte", iterations=40, num_workers=1)
    with pytest.raises(TrainingError, match=rf"non-finite discriminator loss .* at iteration {nan_at} .*Monocyte"):
        fit_classes(cfg, resume="resume", faults={"nan_iteration": nan_at})
    result = json.loads((runs / "killed" / "result.json").read_text())
    run = result["runs"]["Monocyte"]
    assert run["status"] == "non_finite" and run["started_at_iteration"] == resumed_at >= 2
    state = load_checkpoint(result["checkpoint"]["Monocyte"], required=("g_ema",))
    assert state["iteration"] == nan_at  # the last good checkpoint, just before the NaN
    assert all(torch.isfinite(v).all() for v in state["g_ema"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- synthesis -> dataset version
@pytest.mark.ray
def test_synthesize_a_version_that_verify_accepts_and_training_reads(gan_run, bccd, tmp_path):
    from ray_jobs.classifier.config import TrainConfig
    from ray_jobs.classifier.driver import fit
    from ray_jobs.classifier.evaluation import evaluate
    from ray_jobs.gan import main as gan_main
    from ray_jobs.gcgan.quality_report import quality

    before = tree_digest(bccd)
    version = str(tmp_path / "bccd-gan")
    assert gan_main(["synthesize", "--checkpoint", str(gan_run["runs"] / "two"), "--output", version,
                     "--per-class", "6"]) == 0
    manifest, base = read_manifest(version), read_manifest(bccd)
    assert manifest.format_version == 2 and read_manifest(bccd).format_version == 1
    assert manifest.synthetic_class_counts("train") == [6, 0, 0, 6, 0]
    assert manifest.class_counts("train") == [a + b for a, b in zip(base.class_counts("train"), [6, 0, 0, 6, 0])]
    assert manifest.class_counts("train", include_synthetic=False) == base.class_counts("train")
    for split in ("val", "test"):  # exactly the real shards, by reference
        assert [(s.path, s.sha256) for s in manifest.shards_of(split)] == [(s.path, s.sha256) for s in base.shards_of(split)]
        assert all(s.dataset == bccd for s in manifest.shards_of(split)) and manifest.counts[split] == base.counts[split]
    assert not list(Path(version).rglob("val-*.parquet")) and not list(Path(version).rglob("test-*.parquet"))
    report = verify(version)
    assert report.rows == sum(s.rows for s in base.shards) + 12
    train = ShardDataset(version, "train")
    assert train.synthetic.sum() == 12
    sources = [s for s, f in zip(train.sources, train.synthetic) if f]
    assert all(s.startswith(f"gcgan:{gan_run['summary']['checkpoint']['Monocyte']}#") or
               s.startswith(f"gcgan:{gan_run['summary']['checkpoint']['Basophil']}#") for s in sources)
    assert not ShardDataset(version, "val").synthetic.any() and not ShardDataset(version, "test").synthetic.any()
    with pytest.raises(ConfigError, match="new location"):
        gan_main(["synthesize", "--checkpoint", str(gan_run["runs"] / "two"), "--output", bccd, "--preset", "add15"])

    # The classifier trains on real + synthetic train rows; evaluate says how many were synthetic.
    base_cfg = {"name": "on-version", "storage": str(tmp_path / "runs"), "model": "resnet18", "loss": "ce",
                "epochs": 1, "num_workers": 2,
                "data": {"uri": version, "image_size": 28, "augment": "none", "batch_size": 32, "eval_batch_size": 64}}
    summary = fit(config_lib.load_config(TrainConfig, base=base_cfg), resume="fresh")
    assert summary["status"] == "ok"
    state = load_checkpoint(summary["best_checkpoint"])
    assert state["class_counts"] == manifest.class_counts("train")
    assert summary["best_metrics"]["val_num_samples"] == sum(base.counts["val"].values())  # val stays real
    report = evaluate(summary["best_checkpoint"], version, "test", str(tmp_path / "eval"))
    assert report["extra"]["synthetic_in_training"]["per_class"] == {"Basophil": 6, "Eosinophil": 0, "Lymphocyte": 0,
                                                                     "Monocyte": 6, "Neutrophil": 0}
    assert "Synthetic (GAN) images in training: 12" in (tmp_path / "eval" / "report.md").read_text()

    # Quality of the version's synthetic images in the classifier's feature space.
    q = quality(version, str(tmp_path / "quality"), classifier=summary["best_checkpoint"], pixel_size=16)
    assert q["extractor"]["kind"] == "classifier" and q["extractor"]["image_size"] == 28
    mono = q["classes"]["Monocyte"]
    assert mono["n_real"] == 14 and mono["n_synthetic"] == 6 and mono["fid"] is not None
    assert (tmp_path / "quality" / "pairs_Monocyte.png").stat().st_size > 0
    assert q["classes"]["Basophil"]["fid"] is None  # one real image: no FID
    assert tree_digest(bccd) == before  # the real shards and manifest were never touched


# ----------------------------------------------------------------------------- synthetic rows only in train
def _synthetic_shard(path: Path, split: str, label: int = 0, rows: int = 2) -> tuple[int, str]:
    png = encode_array_png(np.zeros((8, 8, 3), np.uint8))
    table = pa.Table.from_pylist([{"image": png, "height": 8, "width": 8, "channels": 3, "label": label,
                                   "split": split, "source": f"fake:{i}", "synthetic": True, "sha256": sha256_hex(png)}
                                  for i in range(rows)], schema=SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    data = path.read_bytes()
    return len(data), sha256_hex(data)


def test_synthetic_rows_outside_train_are_refused(bccd, tmp_path):
    from shards.writer import ShardWriter

    writer = ShardWriter(str(tmp_path / "w"), ["a"])
    with pytest.raises(DataError, match="only be in train"):
        writer.add({"image": b"x", "label": 0, "split": "val", "source": "s", "synthetic": True})
    writer.abort()

    # A manifest that admits synthetic rows in val is refused on read.
    root = tmp_path / "crafted"
    size, digest = _synthetic_shard(root / "shards-x" / "val-00000.parquet", "val")
    raw = json.loads((Path(bccd) / MANIFEST_NAME).read_text())
    raw["format_version"] = 2
    raw["shards"] = [{**s, "dataset": bccd, "synthetic_rows": 0} for s in raw["shards"] if s["split"] != "val"]
    raw["shards"].append({"path": "shards-x/val-00000.parquet", "split": "val", "rows": 2, "bytes": size,
                          "sha256": digest, "dataset": None, "synthetic_rows": 2})
    (root / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(DataError, match="synthetic images may only be in train"):
        read_manifest(str(root))
    # One that hides them (claims 0 synthetic rows) is refused by every reader of the rows.
    raw["shards"][-1]["synthetic_rows"] = 0
    (root / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(DataError, match="synthetic"):
        verify(str(root))
    with pytest.raises(DataError, match="synthetic"):
        ShardDataset(str(root), "val")


@pytest.mark.ray
def test_ray_dataset_refuses_synthetic_val_rows(ray_cluster, bccd, tmp_path):
    from shards import ray_dataset

    root = tmp_path / "crafted"
    size, digest = _synthetic_shard(root / "shards-x" / "val-00000.parquet", "val")
    raw = json.loads((Path(bccd) / MANIFEST_NAME).read_text())
    raw.update(format_version=2, shards=[{"path": "shards-x/val-00000.parquet", "split": "val", "rows": 2,
                                          "bytes": size, "sha256": digest, "dataset": None, "synthetic_rows": 0}])
    (root / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(Exception, match="synthetic row"):
        ray_dataset(str(root), "val", columns=["image", "label"]).take_all()


# ----------------------------------------------------------------------------- FID / KID / memorisation
@pytest.fixture(scope="module")
def extractor_file(tmp_path_factory) -> str:
    """A user-given feature extractor: a small random CNN saved with torch.export (.pt2)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, 2, 1),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    path = tmp_path_factory.mktemp("extractor") / "features.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(net, (torch.rand(2, 3, 64, 64),), dynamic_shapes=({0: batch},)), path)
    return str(path)


def _class_images(uri: str, split: str, label: int, side: int = 64) -> torch.Tensor:
    from torchvision.transforms import v2

    ds = ShardDataset(uri, split, transform=v2.Resize((side, side), antialias=True))
    return torch.stack([ds[i][0] for i in np.flatnonzero(ds.labels == label)])


def test_fid_prefers_held_out_real_images_to_noise(bccd, extractor_file):
    from gan.features import FileExtractor, extract
    from gan.quality import fid_kid

    extractor = FileExtractor(extractor_file)
    neutrophil = read_manifest(bccd).class_names.index("Neutrophil")
    train, test = _class_images(bccd, "train", neutrophil), _class_images(bccd, "test", neutrophil)
    noise = torch.randint(0, 256, test.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    real_f = extract(extractor, train, 64)
    held_out, vs_noise = fid_kid(real_f, extract(extractor, test, 64)), fid_kid(real_f, extract(extractor, noise, 64))
    assert held_out["fid"] < vs_noise["fid"] and held_out["kid_mean"] < vs_noise["kid_mean"]
    assert held_out["kid_subset_size"] == min(50, len(train), len(test))


def test_memorisation_check_flags_copies_of_training_images(bccd, extractor_file):
    from gan.features import FileExtractor, extract
    from gan.quality import neighbour_check, pixels

    extractor = FileExtractor(extractor_file)
    eosinophil = read_manifest(bccd).class_names.index("Eosinophil")
    train, test = _class_images(bccd, "train", eosinophil), _class_images(bccd, "test", eosinophil)
    copies = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:10]].flip(0)
    for real, fake in ((pixels(train, 32), pixels(copies, 32)), (extract(extractor, train, 64), extract(extractor, copies, 64))):
        flagged = neighbour_check(real, fake)
        assert flagged["flagged"] == 10 and flagged["median_ratio"] < 0.01
    for real, fake in ((pixels(train, 32), pixels(test, 32)), (extract(extractor, train, 64), extract(extractor, test, 64))):
        new = neighbour_check(real, fake)
        assert new["flagged_fraction"] < 0.5 and new["median_ratio"] > 0.5   # held-out images are not copies


def test_cli_bad_class_exits_2_before_ray(bccd, tmp_path):
    out = subprocess.run([sys.executable, "-m", "ray_jobs.gan", "train", "--data", bccd, "--classes", "Platelet",
                          "--image-size", "32", "--storage", str(tmp_path), "--name", "bad"],
                         cwd=REPO, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "'Platelet' is not a class" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "bad").exists()
