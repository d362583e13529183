"""``medbalance <job> ...``: every job as a subcommand (``python -m ray_jobs <job>`` is the same).

    medbalance --version
    medbalance train --config configs/demo.yaml --data runs/data/retina --print-config
    medbalance gan synthesize --checkpoint runs/gan-bccd --output runs/data/bccd-gan30 --preset add30

``python -m ray_jobs.<job>`` keeps working: both run the job's own ``main`` through
``runtime.cli.run_main`` (one-line errors, exit status 2, SIGTERM clean-up).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import medbalance

JOBS = {
    "prepare": "ingest images (folders, .npz, CSV; 16-bit, DICOM) into Parquet shards",
    "train": "train a classifier on Ray Train (DDP)",
    "evaluate": "score a checkpoint on a split: macro-F1, B-ACC, ECE, Brier, AUC, plots",
    "predict": "write predictions for a dataset or an image folder",
    "export": "export a trained classifier (ONNX or torch.export) with its preprocessing",
    "sweep": "search hyperparameters with Ray Tune + Optuna (TPE, ASHA)",
    "compare": "compare methods over seeds: mean ± std and paired differences",
    "gan": "GCGAN: train per class, synthesize a dataset version, measure quality",
    "demo": "the main job on the embedded local Ray and the bundled data",
}


def usage() -> str:
    width = max(map(len, JOBS))
    lines = ["usage: medbalance [--version] <job> [--help | job flags]", "",
             "Imbalanced medical image classification on Ray: every job as a subcommand.", "", "jobs:"]
    lines += [f"  {job:<{width}}  {text}" for job, text in JOBS.items() if _available(job)]
    lines += ["", "`medbalance <job> --help` lists a job's flags."]
    return "\n".join(lines)


def _available(job: str) -> bool:
    return importlib.util.find_spec(f"ray_jobs.{job}") is not None


def main(argv: list[str] | None = None) -> int:
    """Dispatch to ``ray_jobs.<job>.main``; returns the exit status."""
    from ray_jobs.runtime.cli import run_main

    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"medbalance {medbalance.__version__}")
        return 0
    job, rest = args[0], args[1:]
    if job not in JOBS or not _available(job):
        print(f"medbalance: unknown job {job!r}; one of {', '.join(j for j in JOBS if _available(j))}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"ray_jobs.{job}")
    if argv is None:  # the process's entry point: argparse and the exit watchdog read sys.argv
        sys.argv = [f"medbalance {job}", *rest]
        return run_main(module.main)
    return run_main(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
