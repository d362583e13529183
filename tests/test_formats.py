"""Medical image formats: 16-bit and float PNG/TIFF, multi-page TIFF, DICOM; windows; dataset stats.

Every expected pixel is computed here with numpy from the values written, then compared with what the
readers (ShardDataset, the Ray Data pipeline's preprocess_batch, the uint8 decoder) return after
ingest. The DICOM files are made here with pydicom (nothing is downloaded); each carries planted
patient data that must appear nowhere in the output.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from medbalance.errors import DataError
from ray_jobs.classifier.pipeline import InputSpec, normalize, preprocess_batch
from ray_jobs.runtime.cli import run_main
from shards import ShardDataset, ingest, read_manifest, verify
from shards.image import decode_image

PLANTED = {"PatientName": "Planted^Patient^Name", "PatientID": "PID-PLANTED-7731", "PatientBirthDate": "19410203",
           "StudyDate": "19870412", "InstitutionName": "Planted General Hospital",
           "ReferringPhysicianName": "Planted^Doctor", "AccessionNumber": "ACC-PLANTED-55"}


# ----------------------------------------------------------------------------- helpers
def reference(values: np.ndarray, lo: float, hi: float, invert: bool = False) -> np.ndarray:
    unit = np.clip((values.astype(np.float64) - lo) / (hi - lo), 0, 1)
    return 1 - unit if invert else unit


def save(path: Path, array: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def dicom_bytes(stored: np.ndarray, *, photometric: str = "MONOCHROME2", slope=None, intercept=None,
                center=None, width=None, signed: bool = False) -> bytes:
    """A small DICOM file (Explicit VR Little Endian) with planted identifying tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for tag, value in PLANTED.items():
        setattr(ds, tag, value)
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CT", photometric, 1
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16 if signed else 12, 15 if signed else 11
    ds.PixelRepresentation = int(signed)
    ds.PixelSpacing = [0.7, 0.7]
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def units_by_source(uri: str, split: str = "train", channels: int = 1) -> dict[str, np.ndarray]:
    ds = ShardDataset(uri, split, channels=channels)
    return {source: ds[i][0].numpy() for i, source in enumerate(ds.sources)}


# ----------------------------------------------------------------------------- 16-bit PNG / TIFF
@pytest.fixture(scope="module")
def grey16(tmp_path_factory):
    """Two classes x 3 random 16 x 16 uint16 images, as PNG and as TIFF."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("grey16")
    arrays = {}
    for cls in ("a", "b"):
        for i in range(3):
            arrays[f"{cls}/{i}"] = rng.integers(200, 60000, (16, 16)).astype(np.uint16)
    for suffix in ("png", "tif"):
        for key, array in arrays.items():
            save(root / suffix / f"{key}.{suffix}", array)
    return root, arrays


@pytest.mark.parametrize("suffix", ["png", "tif"])
@pytest.mark.parametrize("window", ["auto", "min-max", "percentile:2,98", "fixed:1000,50000"])
def test_16bit_round_trip_equals_numpy_reference(grey16, tmp_path, suffix, window):
    root, arrays = grey16
    uri = str(tmp_path / "ds")
    manifest = ingest(str(root / suffix), uri, val=0, test=0, workers=1, window=window)
    assert manifest.windowed and manifest.window == window and manifest.intensity["windowed_rows"] == 6
    units = units_by_source(uri)
    for source, unit in units.items():
        values = arrays[source.rsplit(".", 1)[0]]
        if window in ("auto", "min-max"):
            lo, hi = values.min(), values.max()
        elif window.startswith("percentile"):
            lo, hi = np.percentile(values, [2, 98])
        else:
            lo, hi = 1000, 50000
        expected = reference(values, lo, hi)
        assert unit.dtype == np.float32 and unit.shape == (1, 16, 16)
        np.testing.assert_allclose(unit[0], expected, atol=1e-6)
        # 3 channels: grey repeated
        # stored losslessly: the shard's 16-bit PNG decodes to the very values written
    table = pq.read_table(tmp_path / "ds" / manifest.shards[0].path)
    for data, source in zip(table["image"].to_pylist(), table["source"].to_pylist()):
        stored = np.asarray(Image.open(io.BytesIO(data)))
        assert stored.dtype == np.uint16
        np.testing.assert_array_equal(stored, arrays[source.rsplit(".", 1)[0]])
        if suffix == "png":  # a 16-bit PNG is kept byte for byte
            assert data == (root / suffix / source).read_bytes()

    # The training pipeline: 16 bits carried as int16, then normalize() gives (u - mean) / std.
    batch = {"image": table["image"].to_numpy(zero_copy_only=False), "label": table["label"].to_numpy(),
             "source": table["source"].to_numpy(zero_copy_only=False)}
    spec = InputSpec(channels=1, depth=16, window=manifest.window, mean=(0.25,), std=(0.5,))
    out = preprocess_batch(batch, image_size=16, augment="none", train=False, spec=spec, keep_source=True)
    assert out["image"].dtype == np.int16 and out["image"].shape == (len(batch["label"]), 1, 16, 16)
    normalized = normalize(torch.from_numpy(out["image"]), spec.mean, spec.std).numpy()
    for image, source in zip(normalized, out["source"]):
        expected = (units[source][0] - 0.25) / 0.5
        np.testing.assert_allclose(image[0], expected, atol=2 / 65535 / 0.5)
    # uint8 readers (verify, GAN) get the same window rounded to 8 bits, 3 channels from ShardDataset
    first = batch["image"][0]
    np.testing.assert_array_equal(decode_image(first, window=manifest.window)[:, :, 0],
                                  np.rint(units[batch["source"][0]][0] * 255).astype(np.uint8))
    assert ShardDataset(uri, "train")[0][0].shape == (3, 16, 16)


def test_float_tiff_kept_exactly_and_multipage_tiff_needs_frames(tmp_path):
    rng = np.random.default_rng(1)
    values = {f"c{k}/f{i}": (rng.normal(0, 300, (12, 12))).astype(np.float32) for k in range(2) for i in range(2)}
    for key, array in values.items():
        save(tmp_path / "float" / f"{key}.tif", array)
    uri = str(tmp_path / "ds-float")
    ingest(str(tmp_path / "float"), uri, val=0, test=0, workers=1, window="fixed:-500,500")
    for source, unit in units_by_source(uri).items():
        np.testing.assert_allclose(unit[0], reference(values[source[:-4]], -500, 500), atol=1e-6)
    table = pq.read_table(next((tmp_path / "ds-float").glob("shards-*/train-*.parquet")))
    stored = {s: np.asarray(Image.open(io.BytesIO(d))) for s, d in zip(table["source"].to_pylist(),
                                                                       table["image"].to_pylist())}
    for source, array in stored.items():  # float32 TIFF in the shard: bit-identical values
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, values[source[:-4]])

    pages = [rng.integers(0, 4000, (8, 8)).astype(np.uint16) for _ in range(3)]
    for k in range(2):
        for i in range(2):
            path = tmp_path / "pages" / f"c{k}" / f"p{i}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pages[0]).save(path, save_all=True, append_images=[Image.fromarray(p) for p in pages[1:]])
    with pytest.raises(DataError, match=r"c0/p0.tif: has 3 pages \(a multi-page TIFF\); pass --frames first\|middle\|last\|N"):
        ingest(str(tmp_path / "pages"), str(tmp_path / "ds-pages"), val=0, test=0, workers=1)
    assert not (tmp_path / "ds-pages" / "manifest.json").exists()
    manifest = ingest(str(tmp_path / "pages"), str(tmp_path / "ds-pages"), val=0, test=0, workers=1, frames="last")
    assert manifest.intensity["frames"] == "last"
    for unit in units_by_source(str(tmp_path / "ds-pages")).values():
        np.testing.assert_allclose(unit[0], reference(pages[2], pages[2].min(), pages[2].max()), atol=1e-6)


def test_dataset_window_and_pixel_stats_come_from_the_train_split_only(tmp_path):
    rng = np.random.default_rng(2)
    train = {f"train/{c}/{i}": rng.integers(1000, 5000, (16, 16)).astype(np.uint16) for c in "ab" for i in range(4)}
    others = {f"{s}/{c}/0": np.full((16, 16), 65000 if s == "val" else 0, np.uint16) for s in ("val", "test") for c in "ab"}
    for key, array in {**train, **others}.items():
        save(tmp_path / "in" / f"{key}.png", array)
    uri = str(tmp_path / "ds")
    manifest = ingest(str(tmp_path / "in"), uri, workers=1, window="percentile:1,99", window_scope="dataset")
    pooled = np.concatenate([a.ravel() for a in train.values()]).astype(np.float64)
    lo, hi = np.percentile(pooled, [1, 99])  # val/test (0 and 65000) must not move it
    kind, numbers = manifest.window.split(":")
    assert kind == "fixed" and manifest.intensity["requested"] == "percentile:1,99"
    np.testing.assert_allclose([float(v) for v in numbers.split(",")], [lo, hi], rtol=1e-9)
    units = np.concatenate([reference(a, lo, hi).ravel() for a in train.values()])
    stats = manifest.pixel_stats
    np.testing.assert_allclose(stats["grey"]["mean"], [units.mean()], atol=1e-6)
    np.testing.assert_allclose(stats["grey"]["std"], [units.std()], atol=1e-6)
    np.testing.assert_allclose(stats["rgb"]["mean"], [units.mean()] * 3, atol=1e-6)
    for source, unit in units_by_source(uri, "val").items():  # val read through the train window
        np.testing.assert_allclose(unit[0], reference(others[source[:-4]], lo, hi), atol=1e-6)


def test_pixel_stats_of_an_rgb_dataset(tmp_path):
    rng = np.random.default_rng(3)
    images = {f"{c}/{i}": rng.integers(0, 256, (10, 12, 3)).astype(np.uint8) for c in "ab" for i in range(3)}
    for key, array in images.items():
        save(tmp_path / "in" / f"{key}.png", array)
    manifest = ingest(str(tmp_path / "in"), str(tmp_path / "ds"), val=0, test=0, workers=1)
    assert not manifest.windowed and manifest.window == "auto"
    rgb = np.concatenate([a.reshape(-1, 3) for a in images.values()]).astype(np.float64) / 255
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(manifest.pixel_stats["rgb"]["mean"], rgb.mean(0), atol=1e-6)
    np.testing.assert_allclose(manifest.pixel_stats["rgb"]["std"], rgb.std(0), atol=1e-6)
    np.testing.assert_allclose(manifest.pixel_stats["grey"]["mean"], [grey.mean()], atol=1e-6)


@pytest.mark.parametrize("text", ["percentile:99,1", "fixed:5", "min-max:1,2", "gamma", "percentile:1,101"])
def test_bad_window_specs_are_refused(tmp_path, text):
    with pytest.raises(DataError, match="--window"):
        ingest(str(tmp_path), str(tmp_path / "out"), window=text)


# ----------------------------------------------------------------------------- DICOM
@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory):
    """CT-like files: MONOCHROME2 with rescale + window, MONOCHROME1, signed without window."""
    rng = np.random.default_rng(4)
    root = tmp_path_factory.mktemp("dicom") / "in"
    files = {}
    for cls in ("lesion", "normal"):
        for i in range(3):
            stored = rng.integers(0, 4000, (16, 16)).astype(np.uint16)
            kind = ("mono2", "mono1", "signed")[i]
            if kind == "mono2":
                data = dicom_bytes(stored, slope=2, intercept=-1024, center=40, width=400)
                values, own, invert = stored * 2.0 - 1024, (40 - 0.5 - 399 / 2, 40 - 0.5 + 399 / 2), False
            elif kind == "mono1":
                data = dicom_bytes(stored, photometric="MONOCHROME1", slope=1, intercept=0, center=2000, width=1000)
                values, own, invert = stored * 1.0, (2000 - 0.5 - 999 / 2, 2000 - 0.5 + 999 / 2), True
            else:
                stored = stored.astype(np.int16) - 2000
                data = dicom_bytes(stored, signed=True)
                values, own, invert = stored.astype(np.float64), None, False
            path = root / cls / f"{kind}{i}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files[f"{cls}/{kind}{i}.dcm"] = (values, own, invert)
    return root, files


def test_dicom_rescale_window_monochrome1_and_no_identifying_tag(dicom_folder, tmp_path, capsys, caplog):
    root, files = dicom_folder
    uri = tmp_path / "ds"
    caplog.set_level(logging.DEBUG)
    from ray_jobs import prepare

    assert run_main(prepare.main, ["--input", str(root), "--output", str(uri), "--val", "0", "--test", "0",
                                   "--workers", "1", "-v"]) == 0
    printed = capsys.readouterr()
    manifest = read_manifest(str(uri))
    assert manifest.intensity["windowed_rows"] == 6 and manifest.extra_columns == ["pixel_map", "dicom"]
    for source, unit in units_by_source(str(uri)).items():
        values, own, invert = files[source]
        lo, hi = own if own else (values.min(), values.max())  # auto: the file's window, else min-max
        np.testing.assert_allclose(unit[0], reference(values, lo, hi, invert), atol=1e-6)
    table = pq.read_table(next(uri.glob("shards-*/train-*.parquet")))
    meta = table["dicom"].to_pylist()[0]
    assert meta == {"modality": "CT", "rows": 16, "columns": 16, "pixel_spacing": [0.7, 0.7],
                    "photometric": meta["photometric"], "bits_stored": meta["bits_stored"], "frames": 1, "frame": 0}
    # No identifying tag anywhere: every byte under the dataset, and everything printed or logged.
    written = b"".join(p.read_bytes() for p in uri.rglob("*") if p.is_file())
    text = printed.out + printed.err + caplog.text
    for value in PLANTED.values():
        for needle in {value, value.replace("^", " "), value.split("^")[0]}:
            assert needle.encode() not in written, f"{needle!r} found in the dataset"
            assert needle not in text, f"{needle!r} found in the job's output"
    assert verify(str(uri)).rows == 6

    # --window fixed: in Modality units (HU), the files' own windows ignored; MONOCHROME1 still inverted
    fixed = ingest(str(root), str(tmp_path / "fixed"), val=0, test=0, workers=1, window="fixed:-500,1500")
    assert fixed.window == "fixed:-500,1500"
    for source, unit in units_by_source(str(tmp_path / "fixed")).items():
        values, _, invert = files[source]
        np.testing.assert_allclose(unit[0], reference(values, -500, 1500, invert), atol=1e-6)


def test_dicom_multiframe_refused_unless_frames(tmp_path):
    frames = np.stack([np.full((8, 8), v, np.uint16) + np.arange(64, dtype=np.uint16).reshape(8, 8)
                       for v in (0, 100, 2000)])
    for cls in ("a", "b"):
        (tmp_path / "in" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "in" / cls / f"cine{i}.dcm").write_bytes(dicom_bytes(frames))
    with pytest.raises(DataError, match=r"a/cine0.dcm: has 3 frames; pass --frames first\|middle\|last\|N"):
        ingest(str(tmp_path / "in"), str(tmp_path / "ds"), val=0, test=0, workers=1)
    assert not (tmp_path / "ds" / "manifest.json").exists()
    with pytest.raises(DataError, match=r"--frames 3 is out of range: the file has 3 frames"):
        ingest(str(tmp_path / "in"), str(tmp_path / "ds"), val=0, test=0, workers=1, frames="3")
    manifest = ingest(str(tmp_path / "in"), str(tmp_path / "ds"), val=0, test=0, workers=1, frames="middle")
    assert manifest.intensity["frames"] == "middle"
    table = pq.read_table(next((tmp_path / "ds").glob("shards-*/train-*.parquet")))
    assert {m["frame"] for m in table["dicom"].to_pylist()} == {1}
    for unit in units_by_source(str(tmp_path / "ds")).values():
        np.testing.assert_allclose(unit[0], reference(frames[1], frames[1].min(), frames[1].max()), atol=1e-6)


def test_old_datasets_without_the_new_columns_still_read(tmp_path, retina_npz):
    """A dataset as the first format wrote it (no pixel_map/dicom columns, no intensity keys)."""
    import json

    import pyarrow as pa

    from shards.schema import SCHEMA

    npz = np.load(retina_npz)
    small = tmp_path / "s.npz"
    np.savez(small, train_images=npz["train_images"][:20], train_labels=npz["train_labels"][:20])
    uri = tmp_path / "ds"
    ingest(str(small), str(uri), workers=1)
    manifest_path = uri / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    for key in ("intensity", "pixel_stats", "extra_columns"):
        raw.pop(key)
    for shard in raw["shards"]:
        path = uri / shard["path"]
        table = pq.read_table(path).select(SCHEMA.names).cast(SCHEMA)
        pq.write_table(table, path)
        shard["bytes"] = path.stat().st_size
        import hashlib
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(raw))
    manifest = read_manifest(str(uri))
    assert manifest.extra_columns == [] and not manifest.windowed and manifest.window == "auto"
    image, label = ShardDataset(str(uri), "train")[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 28, 28)
    assert verify(str(uri)).rows == 20
    assert pa is not None


@pytest.mark.ray
@pytest.mark.slow
def test_grey_dicom_trains_on_one_channel_and_predict_prepares_originals_alike(ray_cluster, dicom_folder, tmp_path):
    """in_chans=1, 16-bit batches, dataset mean/std, through Ray Train; then predict on the original
    .dcm files gives the same probabilities as predict on the shards (same window, channels, norm)."""
    from ray_jobs.classifier.config import TrainConfig
    from ray_jobs.classifier.driver import fit
    from ray_jobs.classifier.prediction import predict, read_predictions
    from ray_jobs.runtime import configs as config_lib
    from ray_jobs.runtime.checkpoint import load_checkpoint

    root, _ = dicom_folder
    uri = str(tmp_path / "ds")
    manifest = ingest(str(root), uri, val=0.34, test=0, workers=1, small_classes="error")
    cfg = config_lib.load_config(TrainConfig, base={
        "name": "grey", "storage": str(tmp_path / "runs"), "model": "resnet18", "loss": "ce", "epochs": 1,
        "num_workers": 2, "data": {"uri": uri, "image_size": 64, "augment": "light", "batch_size": 2,
                                   "channels": 1, "normalize": "dataset"}})
    summary = fit(cfg, resume="fresh")
    state = load_checkpoint(summary["best_checkpoint"])
    assert state["input"] == {"channels": 1, "depth": 16, "window": "auto", "frames": None,
                              "mean": manifest.pixel_stats["grey"]["mean"], "std": manifest.pixel_stats["grey"]["std"]}
    assert state["model"]["conv1.weight"].shape[1] == 1
    predict(summary["best_checkpoint"], uri, str(tmp_path / "from-shards"))
    predict(summary["best_checkpoint"], str(root), str(tmp_path / "from-files"))
    by_source = {}
    for name in ("from-shards", "from-files"):
        table = read_predictions(str(tmp_path / name))
        by_source[name] = dict(zip(table["source"].to_pylist(), table["probabilities"].to_pylist()))
    assert sorted(by_source["from-shards"]) == sorted(by_source["from-files"]) and len(by_source["from-files"]) == 6
    for source, probs in by_source["from-files"].items():
        np.testing.assert_allclose(probs, by_source["from-shards"][source], atol=1e-6)


def test_dicom_voi_lut_sequence_is_applied(tmp_path):
    """A VOI LUT (a table, not a linear window) is what a viewer shows: applied at ingest (pydicom)."""
    import pydicom
    from pydicom.dataset import Dataset

    stored = np.arange(256, dtype=np.uint16).reshape(16, 16)
    lut = (255 - np.arange(256)) * 16  # an inverting 12-bit table over the stored values 0..255
    for cls in ("a", "b"):
        ds = pydicom.dcmread(io.BytesIO(dicom_bytes(stored)))
        item = Dataset()
        item.LUTDescriptor = [256, 0, 12]
        item.add_new(0x00283006, "US", lut.astype(np.uint16).tolist())  # LUTData, 16-bit entries
        ds.VOILUTSequence = [item]
        (tmp_path / "in" / cls).mkdir(parents=True)
        ds.save_as(tmp_path / "in" / cls / "lut.dcm", enforce_file_format=True)
    uri = str(tmp_path / "ds")
    ingest(str(tmp_path / "in"), uri, val=0, test=0, workers=1)
    for unit in units_by_source(uri).values():
        np.testing.assert_allclose(unit[0], lut.reshape(16, 16) / 4095, atol=1e-6)
