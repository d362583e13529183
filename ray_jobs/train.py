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
from ray_jobs.runtime.cli import add_run_flags, run_main
from ray_jobs.runtime.run_dir import RESULT_FILE
from shards import storage


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML preset (configs/*.yaml); flags below override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. optim.lr=0.05 (repeatable)")
    p.add_argument("--data", help="dataset URI (data.uri)")
    p.add_argument("--model")
    p.add_argument("--loss")
    p.add_argument("--loss-params", nargs="*", default=[], metavar="K=V", help="loss hyperparameters")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per worker (data.batch_size)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--num-workers", type=int)
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
    cfg = config_from_args(args)
    summary = fit(cfg, resume="resume" if args.resume else "fresh" if args.fresh else "auto")
    print(json.dumps({k: summary[k] for k in ("best_checkpoint", "epochs", "best_metrics")}, indent=2, default=float))
    print(f"result: {storage.join(run_dir(cfg).uri, RESULT_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
