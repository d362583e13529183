"""An overwrite loses nothing: predict --overwrite onto its input, over a foreign folder, or
failing half-way; ingest --overwrite deletes only the shard folders it replaced."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from medbalance.errors import ConfigError, DataError
from shards import ingest

from safety_support import files_under, image_folder


@pytest.mark.ray
def test_predict_overwrite_onto_its_own_input_deletes_nothing(ray_cluster, checkpoint, tmp_path):
    from ray_jobs.classifier.prediction import predict

    images = image_folder(tmp_path / "images", 3)
    (images / "notes.txt").write_text("not an image, not ours to delete")
    before = files_under(tmp_path)
    for output in (images, images / "preds", tmp_path):  # is, lies inside, contains the input
        with pytest.raises(ConfigError, match="overlaps --input"):
            predict(checkpoint, str(images), str(output), overwrite=True)
    assert files_under(tmp_path) == before


@pytest.mark.ray
def test_predict_overwrite_never_deletes_a_foreign_folder(ray_cluster, checkpoint, tmp_path):
    from ray_jobs.classifier.prediction import predict

    images = image_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.csv").write_text("someone else's file")
    with pytest.raises(ConfigError, match="not a medbalance predictions folder"):
        predict(checkpoint, str(images), str(out), overwrite=True)
    assert (out / "report.csv").read_text() == "someone else's file"


@pytest.mark.ray
def test_failing_overwrite_keeps_the_previous_predictions(ray_cluster, checkpoint, tmp_path):
    from ray_jobs.classifier.prediction import SUCCESS, predict, read_predictions

    out = tmp_path / "preds"
    first = predict(checkpoint, str(image_folder(tmp_path / "a", 3)), str(out))
    kept = files_under(out)
    broken = image_folder(tmp_path / "b", 2)
    (broken / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="broken.png"):
        predict(checkpoint, str(broken), str(out), overwrite=True)
    assert files_under(out) == kept                       # nothing lost, nothing half-written
    assert read_predictions(str(out)).num_rows == first["rows"] == 3

    second = predict(checkpoint, str(image_folder(tmp_path / "c", 5)), str(out), overwrite=True)
    table = read_predictions(str(out))
    assert table.num_rows == second["rows"] == 5
    assert sorted(table["source"].to_pylist()) == [f"img{i}.png" for i in range(5)]
    assert json.loads((out / SUCCESS).read_text())["files"] == second["files"]
    # the first run's files are gone; a plain recursive reader sees the new ones only
    assert not any(f.split("/")[0] in {p.split("/")[0] for p in first["files"]} for f in files_under(out))
    assert pq.read_table(out).num_rows == 5


def test_ingest_overwrite_only_deletes_shard_folders(small_npz, tmp_path):
    """An --overwrite removes the replaced dataset's shards-* folders and nothing else."""
    uri = tmp_path / "data"
    ingest(str(small_npz), str(uri), workers=1)
    (uri / "my-notes.txt").write_text("keep me")
    manifest = json.loads((uri / "manifest.json").read_text())
    manifest["shards"][0]["path"] = "elsewhere/" + manifest["shards"][0]["path"].split("/", 1)[1]
    (uri / "elsewhere").mkdir()
    (uri / "elsewhere" / "precious").write_text("not a shard folder")
    (uri / "manifest.json").write_text(json.dumps(manifest))
    ingest(str(small_npz), str(uri), workers=1, overwrite=True)
    assert (uri / "my-notes.txt").read_text() == "keep me"
    assert (uri / "elsewhere" / "precious").exists()
