"""Evaluate a checkpoint on a split: report.json, report.md and plots.

    python -m ray_jobs.evaluate --checkpoint runs/r18-cws/checkpoint_... --data runs/data/retina \
        --split test --out runs/r18-cws/eval [--calibrate] [--num-actors 2] [--gpu]

``--checkpoint`` also takes a run folder (its ``result.json``'s best checkpoint is used).
``--calibrate`` fits temperature scaling on the val split's logits (LBFGS) and reports ECE and Brier
before and after. ``--out`` may be local or ``s3://``: the report is written to a local temp folder
and copied there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

from medbalance.errors import ConfigError, MedbalanceError
from ray_jobs.checkpoint import load_checkpoint
from ray_jobs.cli import add_verbose_flag, run_main
from shards import storage


def resolve_checkpoint(uri: str) -> str:
    """A checkpoint directory/file as given, or a run folder's best checkpoint."""
    fs, path = storage.resolve(uri)
    if storage.exists(fs, f"{path}/result.json", uri):
        best = json.loads(storage.read_bytes(fs, f"{path}/result.json", uri))["best_checkpoint"]
        if not best:
            raise ConfigError(f"{uri}/result.json names no best checkpoint (did the run finish an epoch?)")
        return best
    return uri


def copy_dir(local_dir: str, out_uri: str) -> None:
    """Copy a local folder's files to a storage URI (each file written atomically)."""
    fs, root = storage.resolve(out_uri)
    storage.ensure_dir(fs, root, out_uri)
    for name in sorted(os.listdir(local_dir)):
        with open(os.path.join(local_dir, name), "rb") as f:
            storage.write_bytes_atomic(fs, f"{root}/{name}", f.read(), storage.join(out_uri, name))


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
    from ray_jobs.inference import split_logits
    from shards import check_shards

    storage.check_folder(out, "--out")
    checkpoint = resolve_checkpoint(checkpoint)
    state = load_checkpoint(checkpoint)
    manifest = check_shards(data, splits=[split] + (["val"] if calibrate else []))
    if manifest.class_names != state["class_names"]:
        raise ConfigError(f"{data} has classes {manifest.class_names} but the checkpoint was trained on "
                          f"{state['class_names']}")
    image_size = state["config"]["data"]["image_size"]
    from ray_jobs.ray_runtime import run_as_task

    # Ray starts only now, after the checks above; the scoring pipeline runs as a Ray task.
    from ray_jobs.data import InputSpec

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
    title = f"{state['config']['model']} + {state['config']['loss']} on {split}"
    extra = {"checkpoint": checkpoint, "data": data, "split": split, "epoch": state.get("epoch"),
             "synthetic_in_training": synthetic_in_training(state)}
    with tempfile.TemporaryDirectory() as tmp:
        report = write_report(tmp, probs, targets, manifest.class_names, title=title, extra=extra,
                              calibration=calibration)
        copy_dir(tmp, out)
    return report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint dir/file, or a run folder")
    p.add_argument("--data", required=True, help="dataset URI")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", required=True, help="report folder (local or s3://)")
    p.add_argument("--calibrate", action="store_true", help="temperature scaling fitted on val")
    p.add_argument("--num-actors", type=int, default=1, help="model replicas in the Ray Data actor pool")
    p.add_argument("--gpu", action="store_true")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from metrics.report import format_table
    args = get_args_parser().parse_args(argv)
    report = evaluate(args.checkpoint, args.data, args.split, args.out, calibrate=args.calibrate,
                      num_actors=args.num_actors, use_gpu=args.gpu)
    print(format_table(report))
    synthetic = report["extra"]["synthetic_in_training"]
    print("synthetic images in training: " + (str(synthetic["unknown"]) if "unknown" in synthetic else
          f"{synthetic['total']} ({', '.join(f'{c}: {n}' for c, n in synthetic['per_class'].items() if n) or 'none'})"))
    print(f"report: {storage.join(args.out, 'report.json')} (Markdown: report.md; plots: "
          "confusion_matrix.png, reliability_diagram.png, per_class_recall.png)")
    return 0


if __name__ == "__main__":
    from ray_jobs import evaluate as _module
    sys.exit(run_main(_module.main))
