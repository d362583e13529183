"""Method comparison: named methods x seeds as Ray Tune trials, each best checkpoint evaluated on
test, one table of mean ± std over seeds and a paired comparison against a baseline.

    python -m ray_jobs.compare --config configs/compare-retina.yaml --data runs/data/retina
    python -m ray_jobs.compare --config configs/compare-retina.yaml --seeds 0 1 2 3 4 --epochs 30 \
        --storage s3://b/compare --name retina-5seeds
    python -m ray_jobs.compare --config configs/compare-retina.yaml --resume   # after an interruption

The command line only: the work is done by ``ray_jobs.sweeps.comparison``.
"""
from __future__ import annotations

import argparse
import sys

from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.cli import add_config_flags, add_verbose_flag, config_or_print, parser, run_main
from ray_jobs.sweeps.comparison import RUNS_FILE, TABLE_CSV, TABLE_MD, compare
from ray_jobs.sweeps.config import CompareConfig
from shards import storage


def get_args_parser() -> argparse.ArgumentParser:
    d = CompareConfig()
    p = parser("medbalance compare", __doc__)
    add_config_flags(p, "configs/compare-*.yaml", "base.optim.lr=0.05 or methods.r18.loss=focal")
    p.add_argument("--data", metavar="URI", help="dataset of every method without its own (base.data.uri)")
    p.add_argument("--seeds", type=int, nargs="+", help=f"seeds per method (default: the config's, {d.seeds})")
    p.add_argument("--baseline", help="the method the others are compared with (default: the first)")
    p.add_argument("--epochs", type=int, help=f"base.epochs (default: {d.base.epochs})")
    p.add_argument("--image-size", type=int, help=f"base.data.image_size (default: {d.base.data.image_size})")
    p.add_argument("--num-workers", type=int,
                   help=f"Ray Train workers per run (base.num_workers; default: {d.base.num_workers})")
    p.add_argument("--storage", help=f"local path or s3://bucket/prefix (default: {d.storage})")
    p.add_argument("--name", help=f"results go to <storage>/<name>/ (default: {d.name})")
    p.add_argument("--resume", action="store_true", help="continue an interrupted comparison of this name")
    add_verbose_flag(p)
    return p


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    flags = {"base.data.uri": args.data, "baseline": args.baseline, "base.epochs": args.epochs,
             "base.data.image_size": args.image_size, "base.num_workers": args.num_workers,
             "storage": args.storage, "name": args.name,
             "seeds": f"[{', '.join(map(str, args.seeds))}]" if args.seeds else None}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    return config_lib.load_config(CompareConfig, args.config, overrides + args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = config_or_print(args, CompareConfig, config_from_args)
    if cfg is None:
        return 0
    result = compare(cfg, resume=args.resume)
    print(f"table: {storage.join(result['uri'], TABLE_MD)} (CSV: {TABLE_CSV}; per run: {RUNS_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
