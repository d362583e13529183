"""Distributed classifier training on Ray Train (DDP on CPU/gloo or GPU/nccl).

    python -m ray_jobs.train --data runs/data/retina --model adsr_resnet18 --loss cws \
        --epochs 10 --batch-size 32 --image-size 64 --num-workers 2 --storage runs --name r18-cws
    python -m ray_jobs.train --config configs/demo.yaml --set optim.lr=0.05 --loss-params weight=0.5

The command line only: the work is done by ``ray_jobs.classifier.driver``.
"""
from __future__ import annotations

import argparse
import json
import sys

from ray_jobs.classifier.config import TrainConfig
from ray_jobs.classifier.driver import fit, run_dir
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.cli import add_config_flags, add_run_flags, config_or_print, parser, run_main
from ray_jobs.runtime.run_dir import RESULT_FILE
from shards import storage


def get_args_parser() -> argparse.ArgumentParser:
    from losses import list_losses
    from models import list_models

    d = TrainConfig()
    p = parser("medbalance train", __doc__)
    add_config_flags(p, "configs/*.yaml", "optim.lr=0.05")
    p.add_argument("--data", metavar="URI", help="dataset made by `medbalance prepare` (data.uri)")
    p.add_argument("--model", choices=list_models(), metavar="MODEL",
                   help=f"one of {', '.join(list_models())} (default: the config's, {d.model})")
    p.add_argument("--loss", choices=list_losses(), metavar="LOSS",
                   help=f"one of {', '.join(list_losses())} (default: the config's, {d.loss})")
    p.add_argument("--loss-params", nargs="*", default=[], metavar="K=V",
                   help="loss hyperparameters, e.g. weight=0.5 (loss_params)")
    p.add_argument("--epochs", type=int, help=f"epochs to train (default: the config's, {d.epochs})")
    p.add_argument("--batch-size", type=int,
                   help=f"images per worker and step (data.batch_size; default: the config's, {d.data.batch_size})")
    p.add_argument("--image-size", type=int,
                   help=f"side the images are resized to (data.image_size; default: the config's, {d.data.image_size})")
    p.add_argument("--num-workers", type=int,
                   help=f"Ray Train DDP workers (default: the config's, {d.num_workers})")
    add_run_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {"data.uri": ("data", args.data), "model": ("model", args.model), "loss": ("loss", args.loss),
             "epochs": ("epochs", args.epochs), "data.batch_size": ("batch-size", args.batch_size),
             "data.image_size": ("image-size", args.image_size), "num_workers": ("num-workers", args.num_workers),
             "storage": ("storage", args.storage), "name": ("name", args.name),
             "use_gpu": ("gpu", True if args.gpu else None)}
    overrides: list = [(f"{k}={v}", f"--{flag} {v}") for k, (flag, v) in flags.items() if v is not None]
    overrides += [(f"loss_params.{kv}", f"--loss-params {kv}") for kv in args.loss_params]
    return config_lib.load_config(TrainConfig, args.config, overrides + args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = config_or_print(args, TrainConfig, config_from_args)
    if cfg is None:
        return 0
    summary = fit(cfg, resume="resume" if args.resume else "fresh" if args.fresh else "auto")
    print(json.dumps({k: summary[k] for k in ("best_checkpoint", "epochs", "best_metrics")}, indent=2, default=float))
    print(f"result: {storage.join(run_dir(cfg).uri, RESULT_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
