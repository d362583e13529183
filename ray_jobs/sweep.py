"""Hyperparameter sweep on Ray Tune + Optuna: every trial a Ray Train DDP run, with early stopping.

    python -m ray_jobs.sweep --config configs/sweep-cws.yaml --data runs/data/retina --trials 20
    python -m ray_jobs.sweep --config configs/sweep-fafl.yaml --data s3://b/isic --storage s3://b/sweeps \
        --name fafl-isic --num-workers 2 --epochs 30 --set scheduler.grace_period=5
    python -m ray_jobs.sweep --config configs/sweep-cws.yaml --name cws --resume   # after an interruption

The command line only: the work is done by ``ray_jobs.sweeps.search``.
"""
from __future__ import annotations

import argparse
import sys

from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.cli import add_config_flags, add_verbose_flag, config_or_print, parser, run_main
from ray_jobs.sweeps.config import SweepConfig
from ray_jobs.sweeps.search import TRIALS_FILE, sweep
from shards import storage


def get_args_parser() -> argparse.ArgumentParser:
    d = SweepConfig()
    p = parser("medbalance sweep", __doc__)
    add_config_flags(p, "configs/sweep-*.yaml", "trials=8 or base.optim.lr=0.05")
    p.add_argument("--data", metavar="URI", help="dataset URI (base.data.uri)")
    p.add_argument("--model", help=f"base.model (default: the config's, {d.base.model})")
    p.add_argument("--trials", type=int, help=f"trials to run (default: the config's, {d.trials})")
    p.add_argument("--epochs", type=int, help=f"epochs per trial (base.epochs; ASHA's max_t; default: {d.base.epochs})")
    p.add_argument("--image-size", type=int, help=f"base.data.image_size (default: {d.base.data.image_size})")
    p.add_argument("--num-workers", type=int,
                   help=f"Ray Train workers per trial (base.num_workers; default: {d.base.num_workers})")
    p.add_argument("--storage", help=f"where sweeps go: local path or s3://bucket/prefix (default: {d.storage})")
    p.add_argument("--name", help=f"sweep name: results go to <storage>/<name>/ (default: {d.name})")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this name")
    add_verbose_flag(p)
    return p


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    flags = {"base.data.uri": args.data, "base.model": args.model, "trials": args.trials,
             "base.epochs": args.epochs, "base.data.image_size": args.image_size,
             "base.num_workers": args.num_workers, "storage": args.storage, "name": args.name}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    return config_lib.load_config(SweepConfig, args.config, overrides + args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = config_or_print(args, SweepConfig, config_from_args)
    if cfg is None:
        return 0
    result = sweep(cfg, resume=args.resume)
    print(f"trials: {storage.join(result['uri'], TRIALS_FILE)}")
    if result["best_config"]:
        print(f"best config: {result['best_config']}  (python -m ray_jobs.train --config {result['best_config']})")
    if result["plots"]:
        print(f"plots: {', '.join(result['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
