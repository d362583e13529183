"""The training data path: preprocess_batch, re-sampling rates, and the Ray Data pipelines.

The pipeline tests read real shards (a slice of RetinaMNIST) on the session's real local Ray.
"""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from medbalance.errors import ConfigError
from ray_jobs.classifier.config import DataSection, TrainConfig
from ray_jobs.classifier.pipeline import build_transform, preprocess_batch, sampling_rates
from ray_jobs.classifier.pipeline import build_dataset
from shards import ingest, read_manifest


def png(value: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def batch_of(labels: list[int]) -> dict:
    """Encoded rows whose pixel value is their row index (so a row can be traced)."""
    n = len(labels)
    return {"image": np.array([png(i) for i in range(n)], dtype=object),
            "label": np.array(labels), "source": np.array([f"r{i}" for i in range(n)], dtype=object)}


def test_preprocess_decodes_and_resizes_to_uint8():
    out = preprocess_batch(batch_of([0, 1, 2]), image_size=8, augment="none", train=False, keep_source=True)
    assert out["image"].shape == (3, 3, 8, 8) and out["image"].dtype == np.uint8
    assert out["label"].tolist() == [0, 1, 2] and out["source"].tolist() == ["r0", "r1", "r2"]
    assert [int(img[0, 0, 0]) for img in out["image"]] == [0, 1, 2]


def test_preprocess_shuffle_is_a_seeded_permutation_of_the_rows():
    batch = batch_of(list(range(20)))
    kw = dict(image_size=8, augment="none", train=True, shuffle=True, keep_source=True)
    a, b = preprocess_batch(batch, seed=3, **kw), preprocess_batch(batch, seed=3, **kw)
    assert sorted(a["label"].tolist()) == list(range(20))
    assert a["label"].tolist() != list(range(20))
    assert a["label"].tolist() == b["label"].tolist()
    # pixels, label and source travel together
    assert [int(img[0, 0, 0]) for img in a["image"]] == a["label"].tolist()
    assert [f"r{v}" for v in a["label"]] == a["source"].tolist()


def test_sampling_rates_balance_the_expected_epoch():
    counts = [80, 15, 5, 0]
    assert sampling_rates(counts, "none") is None
    for mode, share in (("class_balanced", [1 / 3] * 3), ("sqrt", np.sqrt([80, 15, 5]) / np.sqrt([80, 15, 5]).sum())):
        rates = sampling_rates(counts, mode)
        expected = np.array(rates[:3]) * counts[:3]
        np.testing.assert_allclose(expected.sum(), sum(counts))          # same epoch size
        np.testing.assert_allclose(expected / expected.sum(), share)     # the mix asked for
        assert rates[3] == 0.0
    with pytest.raises(ConfigError, match="unknown sampling"):
        sampling_rates(counts, "oversample")


def test_preprocess_resampling_follows_the_rates():
    labels = [0] * 200 + [1] * 20
    rates = sampling_rates([200, 20], "class_balanced")
    out = preprocess_batch(batch_of(labels), image_size=4, augment="none", train=True, rates=rates, seed=0)
    per_class = np.bincount(out["label"], minlength=2)
    # expected 110 rows of each class (Poisson: sd ~10)
    assert 70 < per_class[0] < 150 and 70 < per_class[1] < 150


def test_unknown_augment_preset():
    with pytest.raises(ConfigError, match="unknown augment preset"):
        build_transform("heavy", 32, train=True)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, retina_npz) -> str:
    """300 train rows of RetinaMNIST in two shard files, plus val."""
    npz = np.load(retina_npz)
    root = tmp_path_factory.mktemp("datapath")
    np.savez(root / "d.npz", train_images=npz["train_images"][:300], train_labels=npz["train_labels"][:300],
             val_images=npz["val_images"][:50], val_labels=npz["val_labels"][:50])
    uri = str(root / "shards")
    ingest(str(root / "d.npz"), uri, workers=1, shard_bytes=150_000)
    return uri


@pytest.mark.ray
@pytest.mark.parametrize("cache_encoded", [True, False])
def test_train_pipeline_yields_every_row_once_per_epoch_in_a_new_order(ray_cluster, small_shards, cache_encoded):
    manifest = read_manifest(small_shards)
    assert len(manifest.shards_of("train")) >= 2
    cfg = TrainConfig(data=DataSection(uri=small_shards, image_size=16, augment="none", block_rows=32,
                                       cache_encoded=cache_encoded))
    train = build_dataset(cfg, manifest, "train")
    orders = []
    for _ in range(2):
        labels = np.concatenate([b["label"] for b in train.iter_batches(batch_size=50, batch_format="numpy")])
        orders.append(labels)
        assert len(labels) == 300
        np.testing.assert_array_equal(np.bincount(labels, minlength=5), manifest.class_counts("train"))
    assert not np.array_equal(orders[0], orders[1])  # re-shuffled each epoch
    tasks = re.search(r"MapBatches\(preprocess_batch\): (\d+) tasks executed", train.stats())
    assert tasks and int(tasks.group(1)) >= 10  # 300 rows in blocks of <= 32 rows, one task each

    val = build_dataset(cfg, manifest, "val")
    first = next(iter(val.iter_batches(batch_size=8, batch_format="numpy")))
    assert first["image"].shape == (8, 3, 16, 16) and first["image"].dtype == np.uint8
    assert sum(len(b["label"]) for b in val.iter_batches(batch_size=16)) == 50
