"""Evaluate a checkpoint on a split: report.json, report.md and plots.

    python -m ray_jobs.evaluate --checkpoint runs/r18-cws/checkpoint_... --data runs/data/retina \
        --split test --out runs/r18-cws/eval [--calibrate] [--num-actors 2] [--gpu]

``--checkpoint`` also takes a run folder (its ``result.json``'s best checkpoint is used).
``--calibrate`` fits temperature scaling on the val split's logits (LBFGS), reports ECE and Brier
before and after, and keeps the temperature in ``<run>/calibration.json``
(``ray_jobs.classifier.calibration``), which predict and export then apply. ``--out`` may be local or ``s3://``: the report is written to a local temp folder
and copied there.
"""
from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch

from medbalance.errors import ConfigError, MedbalanceError
from ray_jobs.classifier.calibration import calibration_path, write_calibration
from ray_jobs.runtime.checkpoint import load_checkpoint, resolve_checkpoint
from shards import storage


def synthetic_in_training(state: dict) -> dict:
    """How many synthetic (GAN) images of each class the checkpoint's training run saw, from the
    manifest of the dataset it trained on: ``{"per_class": {...}, "total": N}`` (zeros when
    ``data.include_synthetic`` was off), or ``{"unknown": reason}`` if that manifest is unreadable."""
    from shards import read_manifest

    data_cfg = state["config"].get("data", {})
    try:
        manifest = read_manifest(data_cfg["uri"])
    except (KeyError, MedbalanceError) as exc:
        return {"unknown": f"the training data's manifest cannot be read ({exc})"}
    counts = manifest.synthetic_class_counts("train")
    if not data_cfg.get("include_synthetic", True):
        counts = [0] * len(counts)
    return {"data": data_cfg["uri"], "per_class": dict(zip(manifest.class_names, counts)), "total": sum(counts)}


def evaluate(checkpoint: str, data: str, split: str, out: str, *, calibrate: bool = False,
             num_actors: int = 1, use_gpu: bool = False) -> dict:
    """Compute the report of ``checkpoint`` on ``split``; returns the report dict."""
    from metrics.calibration import calibration_summary, fit_temperature
    from metrics.report import write_report
    from ray_jobs.classifier.inference import split_logits
    from shards import check_shards

    storage.check_folder(out, "--out")
    checkpoint = resolve_checkpoint(checkpoint)
    state = load_checkpoint(checkpoint)
    manifest = check_shards(data, splits=[split] + (["val"] if calibrate else []))
    if manifest.class_names != state["class_names"]:
        raise ConfigError(f"{data} has classes {manifest.class_names} but the checkpoint was trained on "
                          f"{state['class_names']}")
    image_size = state["config"]["data"]["image_size"]
    from ray_jobs.runtime.ray_setup import run_as_task

    # Ray starts only now, after the checks above; the scoring pipeline runs as a Ray task.
    from ray_jobs.classifier.pipeline import InputSpec

    spec = InputSpec.from_dict(state.get("input"))
    if manifest.windowed and manifest.window != spec.window:
        print(f"note: {data} has window {manifest.window} but the checkpoint was trained with {spec.window}; "
              "applying the checkpoint's", file=sys.stderr)
    kwargs = dict(num_actors=num_actors, use_gpu=use_gpu, spec=spec)
    logits, targets = (np.array(a) for a in run_as_task(split_logits, checkpoint, data, split, image_size,
                                                        **kwargs))  # writable copies
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    calibration = None
    if calibrate:
        val_logits, val_targets = (np.array(a) for a in run_as_task(split_logits, checkpoint, data, "val",
                                                                    image_size, **kwargs))
        temperature = fit_temperature(val_logits, val_targets)
        calibration = calibration_summary(logits, targets, temperature)
        probs = torch.softmax(torch.from_numpy(logits) / temperature, dim=1).numpy()
        fitted = calibration_summary(val_logits, val_targets, temperature)
    title = f"{state['config']['model']} + {state['config']['loss']} on {split}"
    extra = {"checkpoint": checkpoint, "data": data, "split": split, "epoch": state.get("epoch"),
             "synthetic_in_training": synthetic_in_training(state)}
    if calibrate:
        extra["calibration_file"] = calibration_path(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        report = write_report(tmp, probs, targets, manifest.class_names, title=title, extra=extra,
                              calibration=calibration)
        storage.copy_dir(tmp, out)
    if calibrate:  # kept for predict and export, once the report is out
        write_calibration(checkpoint, data, temperature, fitted, evaluated=calibration, evaluated_split=split)
    return report
