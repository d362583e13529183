"""Shard format, ingest, readers, verify and storage: round trips of the shared data sets
(local and through a real S3 server) and every bad input of the foundation issue."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from medbalance.errors import DataError, StorageError
from shards import ShardDataset, ingest, ray_dataset, read_manifest, storage, verify
from shards.schema import MANIFEST_NAME

from conftest import REPO, s3_env

BCCD_COUNTS = {"Neutrophil": 207, "Eosinophil": 88, "Lymphocyte": 33, "Monocyte": 20, "Basophil": 3}
RETINA_COUNTS = [714, 186, 326, 282, 92]
RETINA_SPLITS = {"train": 1080, "val": 120, "test": 400}


def class_totals(manifest) -> dict[str, int]:
    totals = Counter()
    for per_class in manifest.counts.values():
        totals.update(per_class)
    return dict(totals)


def listing(uri: str) -> list[str]:
    """Every file under a dataset URI (relative), to check that nothing was left behind."""
    fs, root = storage.resolve(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)


# ----------------------------------------------------------------------------- round trips
def check_retina(uri: str, npz_path: Path) -> None:
    manifest = read_manifest(uri)
    assert manifest.class_names == ["0", "1", "2", "3", "4"]
    assert {s: sum(c.values()) for s, c in manifest.counts.items()} == RETINA_SPLITS
    assert [class_totals(manifest)[str(i)] for i in range(5)] == RETINA_COUNTS
    npz = np.load(npz_path)
    for split in ("train", "test"):
        ds = ShardDataset(uri, split)
        assert len(ds) == RETINA_SPLITS[split]
        for index in range(0, len(ds), 37):
            image, label = ds[index]
            src_split, src_row = ds.sources[index].split(":")
            assert src_split == split
            source = npz[f"{split}_images"][int(src_row)]
            assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 28, 28)
            np.testing.assert_array_equal(image.numpy().transpose(1, 2, 0), source)
            assert label == int(npz[f"{split}_labels"][int(src_row)][0])


def check_bccd(uri: str, bccd_dir: Path) -> None:
    manifest = read_manifest(uri)
    assert sorted(manifest.class_names) == sorted(BCCD_COUNTS)
    assert class_totals(manifest) == BCCD_COUNTS
    for split in ("train", "val", "test"):
        assert all(n >= 1 for n in manifest.counts[split].values()), split  # every class in every split
        ds = ShardDataset(uri, split)
        for index in range(0, len(ds), 11):
            image, label = ds[index]
            rel = ds.sources[index]
            assert rel.split("/")[0] == manifest.class_names[label]
            with Image.open(bccd_dir / rel) as src:
                expected = np.asarray(src.convert("RGB"))
            np.testing.assert_array_equal(image.numpy().transpose(1, 2, 0), expected)
    # JPEG bytes are kept as they are.
    ds = ShardDataset(uri, "train")
    assert ds.images[0] == (bccd_dir / ds.sources[0]).read_bytes()


def test_retinamnist_round_trip_keeps_official_splits(tmp_path, retina_npz):
    uri = str(tmp_path / "retina")
    ingest(str(retina_npz), uri, workers=2)
    check_retina(uri, retina_npz)
    assert verify(uri).rows == 1600


def test_bccd_round_trip_stratified(tmp_path, bccd_dir):
    uri = str(tmp_path / "bccd")
    manifest = ingest(str(bccd_dir), uri, val=0.1, test=0.2, seed=3, workers=2)
    check_bccd(uri, bccd_dir)
    assert manifest.provenance["seed"] == 3 and manifest.provenance["split_ratios"] == {"val": 0.1, "test": 0.2}
    # Same seed, same split.
    again = ingest(str(bccd_dir), str(tmp_path / "bccd2"), val=0.1, test=0.2, seed=3, workers=1)
    assert again.counts == manifest.counts
    assert sorted(ShardDataset(str(tmp_path / "bccd2"), "test").sources) == sorted(ShardDataset(uri, "test").sources)


def test_small_shards_split_and_all_listed(tmp_path, bccd_dir):
    uri = str(tmp_path / "bccd")
    manifest = ingest(str(bccd_dir), uri, shard_bytes=200_000, workers=1)
    assert len(manifest.shards) > 5
    assert sum(s.rows for s in manifest.shards) == 351
    assert sorted(s.path for s in manifest.shards) == [p for p in listing(uri) if p.endswith(".parquet")]


@pytest.mark.s3
def test_round_trip_through_s3(s3_bucket, bccd_dir, retina_npz):
    ingest(str(retina_npz), f"{s3_bucket}/retina", workers=2)
    check_retina(f"{s3_bucket}/retina", retina_npz)
    ingest(str(bccd_dir), f"{s3_bucket}/data/bccd", workers=2)
    check_bccd(f"{s3_bucket}/data/bccd", bccd_dir)
    assert verify(f"{s3_bucket}/data/bccd").rows == 351


@pytest.mark.s3
def test_s3_input_folder_and_cli(s3_server, s3_bucket, bccd_dir, tmp_path):
    """An image folder in a bucket, ingested by the CLI with only the AWS_* variables set."""
    fs = s3_server["fs"]
    bucket = s3_bucket[len("s3://"):]
    for cls in ("Monocyte", "Basophil"):
        files = sorted((bccd_dir / cls).iterdir())
        for f in files[:2] if cls == "Basophil" else files:  # 2 Basophils: too few for 3 splits
            with fs.open_output_stream(f"{bucket}/raw/{cls}/{f.name}") as out:
                out.write(f.read_bytes())
    env = {**os.environ, **s3_env(s3_server)}
    out = subprocess.run([sys.executable, "-m", "ray_jobs.prepare", "--input", f"{s3_bucket}/raw",
                          "--output", f"{s3_bucket}/ds", "--small-classes", "train-only", "--workers", "1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Basophil" in out.stdout and "imbalance ratio" in out.stdout
    manifest = read_manifest(f"{s3_bucket}/ds")
    assert manifest.counts["train"]["Basophil"] == 2 and manifest.counts["test"]["Basophil"] == 0
    assert sum(manifest.counts[s]["Monocyte"] for s in manifest.counts) == 20


@pytest.mark.s3
def test_unreachable_s3_gets_a_clear_error(monkeypatch, tmp_path):
    from conftest import free_port
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises((StorageError, DataError), match="AWS_ENDPOINT_URL"):
        read_manifest("s3://nobucket/ds")


@pytest.mark.ray
def test_ray_dataset_reads_one_split(ray_cluster, tmp_path, retina_npz):
    uri = str(tmp_path / "retina")
    ingest(str(retina_npz), uri, workers=1)
    ds = ray_dataset(uri, "val")
    assert ds.count() == 120
    batch = ds.take_batch(8)
    from shards import decode_to_chw
    assert decode_to_chw(batch["image"][0]).shape == (3, 28, 28)
    assert set(np.asarray(batch["label"]).tolist()) <= set(range(5))


# ----------------------------------------------------------------------------- bad input
def make_folder(root: Path, counts: dict[str, int], size=(12, 10)) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def assert_nothing_written(uri: str) -> None:
    files = listing(uri)
    assert MANIFEST_NAME not in files and not [f for f in files if f.endswith(".parquet")], files


def test_undecodable_image_names_the_file(tmp_path):
    src = make_folder(tmp_path / "in", {"a": 6, "b": 6})
    (src / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match=r"b/broken\.png.*cannot decode"):
        ingest(str(src), out, workers=2)
    assert_nothing_written(out)


def test_other_formats_are_stored_as_png(tmp_path):
    src = make_folder(tmp_path / "in", {"a": 3, "b": 3})
    pixels = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)
    Image.fromarray(pixels).save(src / "a" / "x.bmp")
    uri = str(tmp_path / "out")
    ingest(str(src), uri, val=0, test=0, workers=1)
    ds = ShardDataset(uri, "train")
    i = ds.sources.index("a/x.bmp")
    assert ds.images[i].startswith(b"\x89PNG")
    np.testing.assert_array_equal(ds[i][0].numpy().transpose(1, 2, 0), pixels)


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("path,label\n" + "\n".join(rows) + "\n")
    return path


def test_csv_round_trip_with_splits(tmp_path):
    make_folder(tmp_path / "in", {"a": 4, "b": 4})
    csv = tmp_path / "in" / "list.csv"
    csv.write_text("path,label,split\n" + "\n".join(
        f"{c}/{i}.png,{c},{'train' if i < 2 else 'val' if i == 2 else 'test'}"
        for c in "ab" for i in range(4)) + "\n")
    uri = str(tmp_path / "out")
    manifest = ingest(str(csv), uri, workers=1)
    assert manifest.counts == {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}}


def test_csv_missing_file_names_the_row(tmp_path):
    src = make_folder(tmp_path / "in", {"a": 4, "b": 4})
    csv = write_csv(src / "list.csv", ["a/0.png,a", "a/1.png,a", "b/404.png,b"])
    with pytest.raises(DataError, match=r"line 4: file .*b/404\.png does not exist"):
        ingest(str(csv), str(tmp_path / "out"), workers=1)
    assert_nothing_written(str(tmp_path / "out"))


def test_csv_label_outside_class_list(tmp_path):
    src = make_folder(tmp_path / "in", {"a": 2, "b": 2})
    csv = write_csv(src / "list.csv", ["a/0.png,a", "b/0.png,b", "b/1.png,zebra"])
    with pytest.raises(DataError, match=r"line 4: label 'zebra' is not in the class list"):
        ingest(str(csv), str(tmp_path / "out"), classes=["a", "b"], workers=1)
    assert_nothing_written(str(tmp_path / "out"))


def test_npz_label_outside_class_list(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    npz = tmp_path / "x.npz"
    np.savez(npz, train_images=images, train_labels=np.array([[0], [1], [2], [7]]))
    with pytest.raises(DataError, match=r"train_labels row 3 is 7, outside the 3 classes"):
        ingest(str(npz), str(tmp_path / "out"), classes=["a", "b", "c"])
    assert_nothing_written(str(tmp_path / "out"))


@pytest.mark.parametrize("bad", ["../outside/x.png", "/etc/passwd", "link/x.png"])
def test_csv_path_escaping_the_root(tmp_path, bad):
    root = make_folder(tmp_path / "in", {"a": 2})
    outside = make_folder(tmp_path / "outside", {"x": 1})
    (root / "link").symlink_to(outside / "x")
    (outside / "x" / "x.png").write_bytes((outside / "x" / "0.png").read_bytes())
    csv = write_csv(root / "list.csv", ["a/0.png,a", f"{bad},a"])
    with pytest.raises(DataError, match=r"line 3: path .*(absolute|leaves the CSV's folder|outside the CSV's folder)"):
        ingest(str(csv), str(tmp_path / "out"), workers=1)
    assert_nothing_written(str(tmp_path / "out"))


def test_empty_class_folder(tmp_path):
    src = make_folder(tmp_path / "in", {"a": 3, "b": 3})
    (src / "empty").mkdir()
    (src / "empty" / ".DS_Store").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"class folder .*empty holds no images"):
        ingest(str(src), str(tmp_path / "out"))
    assert_nothing_written(str(tmp_path / "out"))


def test_class_too_small_for_every_split(tmp_path):
    src = make_folder(tmp_path / "in", {"big": 20, "tiny": 2})
    with pytest.raises(DataError, match=r"class 'tiny' has 2 image\(s\), too few.*--small-classes train-only"):
        ingest(str(src), str(tmp_path / "out"), val=0.1, test=0.2)
    assert_nothing_written(str(tmp_path / "out"))
    manifest = ingest(str(src), str(tmp_path / "out"), val=0.1, test=0.2, small_classes="train-only")
    assert manifest.counts["train"]["tiny"] == 2
    assert manifest.counts["val"]["tiny"] == 0 and manifest.counts["test"]["tiny"] == 0


def test_existing_output_refused_then_replaced_without_mixing(tmp_path):
    out = str(tmp_path / "out")
    ingest(str(make_folder(tmp_path / "one", {"a": 5, "b": 5})), out)
    before = listing(out)
    src2 = make_folder(tmp_path / "two", {"x": 6, "y": 6, "z": 6})
    with pytest.raises(DataError, match="already holds a dataset.*--overwrite"):
        ingest(str(src2), out)
    assert listing(out) == before
    # A failing overwrite leaves the old dataset whole.
    (src2 / "z" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot decode"):
        ingest(str(src2), out, overwrite=True)
    assert listing(out) == before and verify(out).rows == 10
    (src2 / "z" / "bad.png").unlink()
    ingest(str(src2), out, overwrite=True)
    after = listing(out)
    assert read_manifest(out).class_names == ["x", "y", "z"]
    assert not set(before) & set(after) - {MANIFEST_NAME}  # no old shard left next to the new ones
    assert verify(out).rows == 18


def test_reader_refuses_folder_without_manifest(tmp_path):
    out = str(tmp_path / "out")
    ingest(str(make_folder(tmp_path / "in", {"a": 5, "b": 5})), out)
    os.remove(os.path.join(out, MANIFEST_NAME))
    with pytest.raises(DataError, match="manifest.json does not exist"):
        ShardDataset(out, "train")


def flip_byte(path: str, offset: int) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_verify_catches_one_flipped_byte(tmp_path):
    out = str(tmp_path / "out")
    ingest(str(make_folder(tmp_path / "in", {"a": 5, "b": 5})), out, val=0, test=0)
    manifest = read_manifest(out)
    shard = os.path.join(out, manifest.shards[0].path)
    image = ShardDataset(out, "train").images[2]
    offset = open(shard, "rb").read().find(image) + len(image) // 2
    flip_byte(shard, offset)
    with pytest.raises(DataError, match=rf"{manifest.shards[0].path} row \d+ .*do not match their sha256"):
        verify(out)
    # And through the CLI: non-zero exit, the shard named.
    out_cli = subprocess.run([sys.executable, "-m", "ray_jobs.prepare", "--verify", out], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert out_cli.returncode == 2 and manifest.shards[0].path in out_cli.stderr


def test_verify_catches_a_flipped_byte_outside_the_images(tmp_path):
    out = str(tmp_path / "out")
    ingest(str(make_folder(tmp_path / "in", {"a": 5, "b": 5})), out, val=0, test=0)
    shard = os.path.join(out, read_manifest(out).shards[0].path)
    flip_byte(shard, os.path.getsize(shard) - 20)  # in the Parquet footer
    with pytest.raises(DataError, match="corrupt"):
        verify(out)


def test_cli_bad_input_exits_2_with_message(tmp_path):
    src = make_folder(tmp_path / "in", {"a": 3})
    (src / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = subprocess.run([sys.executable, "-m", "ray_jobs.prepare", "--input", str(src), "--output",
                          str(tmp_path / "out"), "--val", "0", "--test", "0", "--workers", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "a/broken.jpg" in out.stderr and "Traceback" not in out.stderr
    assert_nothing_written(str(tmp_path / "out"))


def test_manifest_records_provenance(tmp_path):
    out = str(tmp_path / "out")
    ingest(str(make_folder(tmp_path / "in", {"a": 5, "b": 5})), out, seed=7)
    raw = json.loads(open(os.path.join(out, MANIFEST_NAME)).read())
    assert raw["format_version"] == 1
    assert raw["provenance"]["seed"] == 7 and raw["provenance"]["medbalance_version"]
    assert all({"path", "rows", "bytes", "sha256", "split"} <= set(s) for s in raw["shards"])


COPY_FILES_UP_AND_DOWN = """
import pathlib, sys
import pyarrow
import pyarrow.fs as pafs
from shards import storage
pyarrow.set_io_thread_count(2)  # a small pool: every pool thread busy at once, as on a loaded driver
src, uri = pathlib.Path(sys.argv[1]), sys.argv[2]
for i in range(40):
    (src / f"f{i:02d}.json").write_text("x" * (i + 1))
fs, path = storage.resolve(uri)
local = pafs.LocalFileSystem()
pafs.copy_files(str(src), path, source_filesystem=local, destination_filesystem=fs, use_threads=True)
back = src.parent / "back"
back.mkdir()
pafs.copy_files(path, str(back), source_filesystem=fs, destination_filesystem=local, use_threads=True)
assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in src.iterdir())
print("ok")
"""


@pytest.mark.s3
def test_threaded_copy_files_through_the_s3_filesystem_does_not_hang(s3_server, s3_bucket, tmp_path):
    """Ray Train and Tune sync folders with ``pyarrow.fs.copy_files(use_threads=True)``, which calls
    the S3 filesystem from pyarrow's I/O thread pool. With every pool thread inside an upload (here:
    a pool of 2 and 40 files) an upload that waits for work queued on that same pool never ends: a
    Tune experiment-state sync to S3 hung so on the two-node cluster. It must finish in seconds."""
    (tmp_path / "src").mkdir()
    out = subprocess.run([sys.executable, "-c", COPY_FILES_UP_AND_DOWN, str(tmp_path / "src"), f"{s3_bucket}/sync"],
                         cwd=REPO, env={**os.environ, **s3_env(s3_server)}, capture_output=True, text=True,
                         timeout=45)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
