"""Evaluate a checkpoint on a split: report.json, report.md and plots.

    python -m ray_jobs.evaluate --checkpoint runs/r18-cws/checkpoint_... --data runs/data/retina \
        --split test --out runs/r18-cws/eval [--calibrate] [--num-actors 2] [--gpu]

The command line only: the work is done by ``ray_jobs.classifier.evaluation``.
"""
from __future__ import annotations

import argparse
import sys

from ray_jobs.classifier.evaluation import evaluate
from ray_jobs.runtime.cli import add_verbose_flag, parser, run_main
from shards import storage


def get_args_parser() -> argparse.ArgumentParser:
    p = parser("medbalance evaluate", __doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir/file, or a run folder")
    p.add_argument("--data", required=True, help="dataset URI")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="the split to score")
    p.add_argument("--out", required=True, help="report folder (local or s3://)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit temperature scaling on val and keep it in <run>/calibration.json (the checkpoint "
                        "folder's parent for a checkpoint_* folder), applied by predict and export")
    p.add_argument("--num-actors", type=int, default=1, help="model replicas in the Ray Data actor pool")
    p.add_argument("--gpu", action="store_true", help="one GPU per model replica (default: CPU)")
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
    if "calibration_file" in report["extra"]:
        print(f"temperature {report['calibration']['temperature']:.4f} (fitted on val) kept in "
              f"{report['extra']['calibration_file']}: predict and export apply it")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
