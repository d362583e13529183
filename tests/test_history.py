"""A run's learning curve: metrics.csv, TensorBoard events and learning_curves.png, rewritten whole
after each report, on local storage and on S3, and trimmed when a run resumes."""
from __future__ import annotations

import csv
import io
import math
import struct

import pytest

from ray_jobs.runtime.history import CURVES_FILE, EVENTS_FILE, GAN_PANELS, METRICS_FILE, TENSORBOARD_DIR, RunHistory
from shards import storage


def epoch(i: int, loss: float) -> dict:
    return {"epoch": i, "train_loss": loss, "val_macro_f1": 0.2 + 0.1 * i, "val_balanced_accuracy": 0.25 + 0.1 * i,
            "val_ece": 0.3 - 0.05 * i, "val_brier": 0.7, "val_auc_macro": float("nan"), "lr": 0.01}


def scalars(event_file: bytes) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a TensorBoard event file (TFRecord framing; tensorboardX's Event proto)."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, list[tuple[int, float]]] = {}
    at = 0
    while at < len(event_file):
        (length,) = struct.unpack("<Q", event_file[at:at + 8])
        event = Event.FromString(event_file[at + 12:at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def read(uri: str, name: str) -> bytes:
    fs, path = storage.resolve(uri)
    return storage.read_bytes(fs, f"{path}/{name}", uri)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_each_epoch_rewrites_the_three_files_and_a_resume_replaces_the_unfinished_rows(request, tmp_path, where):
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    run = storage.join(root, "runs", "r1")
    history = RunHistory(run, "epoch")
    for i, loss in enumerate([1.5, 1.2, 0.9]):
        history.append(epoch(i, loss))
    rows = list(csv.DictReader(io.StringIO(read(run, METRICS_FILE).decode())))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2] and float(rows[2]["train_loss"]) == 0.9
    assert list(rows[0])[:2] == ["epoch", "train_loss"] and math.isnan(float(rows[0]["val_auc_macro"]))
    tb = scalars(read(run, f"{TENSORBOARD_DIR}/{EVENTS_FILE}"))
    assert tb["train_loss"] == [(0, 1.5), (1, pytest.approx(1.2)), (2, pytest.approx(0.9))]
    assert "val_auc_macro" not in tb                             # NaN is left out, not drawn as 0
    assert read(run, CURVES_FILE)[:8] == b"\x89PNG\r\n\x1a\n"

    # A run killed after epoch 2's row but resumed from epoch 1's checkpoint: rows 1 and 2 are redone.
    resumed = RunHistory(run, "epoch")
    assert [r["epoch"] for r in resumed.rows] == [0, 1, 2]
    resumed.append(epoch(1, 1.1))
    rows = list(csv.DictReader(io.StringIO(read(run, METRICS_FILE).decode())))
    assert [(int(r["epoch"]), float(r["train_loss"])) for r in rows] == [(0, 1.5), (1, 1.1)]
    assert [s for s, _ in scalars(read(run, f"{TENSORBOARD_DIR}/{EVENTS_FILE}"))["train_loss"]] == [0, 1]


def test_gan_curves_and_a_damaged_file_starts_over(tmp_path):
    run = str(tmp_path / "gan" / "Monocyte")
    (tmp_path / "gan" / "Monocyte").mkdir(parents=True)
    (tmp_path / "gan" / "Monocyte" / METRICS_FILE).write_text("iteration,loss_d\n10,not-a-number\n")
    history = RunHistory(run, "iteration", GAN_PANELS)
    assert history.rows == []
    for it in (10, 20):
        history.append({"iteration": it, "loss_d": 1.0 / it, "loss_d_real": 0.5, "loss_d_fake": 0.5, "loss_g": 2.0,
                        "iterations_per_s": 3.0})
    assert history.columns()[0] == "iteration" and (tmp_path / "gan" / "Monocyte" / CURVES_FILE).stat().st_size > 5000


def test_rows_with_different_metrics_survive_a_resume(tmp_path):
    run = str(tmp_path / "r")
    history = RunHistory(run, "epoch")
    history.append({"epoch": 0, "train_loss": 1.0, "flag": True})
    history.append({"epoch": 1, "train_loss": 0.8, "val_auc_macro": 0.7})   # a metric epoch 0 did not report
    resumed = RunHistory(run, "epoch")
    assert resumed.rows == [{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.8, "val_auc_macro": 0.7}]
