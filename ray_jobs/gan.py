"""GCGAN for minority classes on Ray: train, synthesize a dataset version, measure image quality.

    python -m ray_jobs.gan train --data runs/data/bccd --classes auto --image-size 256 \\
        --iterations 20000 --batch-size 8 --num-workers 2 --storage runs --name gan-bccd [--gpu]
    python -m ray_jobs.gan synthesize --checkpoint runs/gan-bccd --output runs/data/bccd-gan30 \\
        --preset add30                  # or --per-class N, or --balance; [--classes A,B]
    python -m ray_jobs.gan quality --data runs/data/bccd-gan30 --classifier runs/r18 \\
        --out runs/gan-bccd/quality     # or --extractor FEATURES.pt

``train``: one Ray Train DDP run per class (``ray_jobs/gcgan/driver.py``, worker loop in
``ray_jobs/gcgan/worker.py``), several classes at once when the cluster has room; checkpoints and
sample grids every ``--checkpoint-every`` iterations; ``<storage>/<name>/result.json`` names each
class's checkpoint. A rerun with the same storage and name resumes.
``synthesize``: the EMA generators write synthetic train rows into a NEW dataset version whose
manifest includes the real shards by reference (``ray_jobs/gcgan/synthesize.py``).
``quality``: FID, KID and nearest-real-neighbour distances per class (``ray_jobs/gcgan/quality_report.py``).
"""
from __future__ import annotations

import argparse
import json
import sys

from ray_jobs.gcgan.config import GanConfig
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.cli import (HelpWithDefaults, add_config_flags, add_run_flags, add_verbose_flag, config_or_print,
                                  parser, run_main)
from ray_jobs.runtime.run_dir import RESULT_FILE
from shards import storage

PRESETS = {"add15": 15, "add30": 30, "add45": 45, "add60": 60}  # the DIM paper's "Add15/30/45/60"


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one GCGAN per class (Ray Train DDP)", formatter_class=HelpWithDefaults)
    add_config_flags(p, "configs/gcgan_paper.yaml", "lr=1e-4")
    p.add_argument("--data", help="shard dataset URI")
    p.add_argument("--classes", help="comma-separated class names, or auto (every class below the median count)")
    d = GanConfig()
    p.add_argument("--image-size", type=int, help=f"32 .. 1024, a power of two (default: the config's, {d.image_size})")
    p.add_argument("--iterations", type=int, help=f"iterations per class (default: the config's, {d.iterations})")
    p.add_argument("--batch-size", type=int, help=f"images per worker and step (default: the config's, {d.batch_size})")
    p.add_argument("--num-workers", type=int, help=f"DDP workers per class (default: the config's, {d.num_workers})")
    p.add_argument("--concurrent", type=int, help="class runs at once (default: as many as fit)")
    p.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints and sample grids")
    p.add_argument("--lpips-weights", help="torchvision vgg16 state-dict file: LPIPS-VGG reconstruction loss "
                                           "(default: L1)")
    add_run_flags(p)


def _synthesize_parser(sub) -> None:
    p = sub.add_parser("synthesize", help="write a dataset version: real shards by reference + synthetic ones",
                       formatter_class=HelpWithDefaults)
    p.add_argument("--checkpoint", required=True, help="a GAN run folder (its result.json) or one class's checkpoint")
    p.add_argument("--output", required=True, help="URI of the new dataset version")
    p.add_argument("--data", help="the dataset to include (default: the one the GAN was trained on)")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--per-class", type=int, help="synthetic images per class")
    amount.add_argument("--balance", action="store_true",
                        help="per class, as many as bring its train count to the largest class's")
    amount.add_argument("--preset", choices=sorted(PRESETS), help="the DIM paper's settings: add 15/30/45/60 per class")
    p.add_argument("--classes", help="comma-separated subset of the trained classes (default: all)")
    p.add_argument("--bn-mode", choices=["train", "eval"], default=None,
                   help="BatchNorm while sampling (default: the run's sample_bn_mode, train as the authors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise the generators sample")
    p.add_argument("--gpu", action="store_true", help="sample on a GPU")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset version already at --output")
    add_verbose_flag(p)


def _quality_parser(sub) -> None:
    p = sub.add_parser("quality", help="FID, KID and nearest-real-neighbour check per class",
                       formatter_class=HelpWithDefaults)
    p.add_argument("--data", required=True, help="a dataset version with synthetic rows (synthesize's output)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--extractor", help="feature extractor file: TorchScript (.pt) or torch.export (.pt2); "
                                            "float B x 3 x H x W in [0, 1] -> B x D")
    source.add_argument("--classifier", help="a medbalance classifier checkpoint (or run folder): its forward_features")
    p.add_argument("--out", required=True, help="report folder (local or s3://)")
    p.add_argument("--classes", help="comma-separated classes (default: every class with synthetic rows)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side the extractor sees (default: the classifier's training size, else 224)")
    p.add_argument("--pixel-size", type=int, default=64, help="side for the pixel-space neighbour distances")
    p.add_argument("--pairs", type=int, default=8, help="closest synthetic/real pairs in the PNG")
    add_verbose_flag(p)


def get_args_parser() -> argparse.ArgumentParser:
    p = parser("medbalance gan", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _synthesize_parser(sub)
    _quality_parser(sub)
    return p


def config_from_args(args: argparse.Namespace) -> GanConfig:
    flags = {"data": args.data, "classes": args.classes, "image_size": args.image_size,
             "iterations": args.iterations, "batch_size": args.batch_size, "num_workers": args.num_workers,
             "concurrent": args.concurrent, "checkpoint_every": args.checkpoint_every,
             "lpips_weights": args.lpips_weights, "storage": args.storage, "name": args.name,
             "use_gpu": True if args.gpu else None}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    return config_lib.load_config(GanConfig, args.config, overrides + args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "train":
        from ray_jobs.gcgan.driver import fit_classes

        cfg = config_or_print(args, GanConfig, config_from_args)
        if cfg is None:
            return 0
        summary = fit_classes(cfg, resume="resume" if args.resume else "fresh" if args.fresh else "auto")
        print(json.dumps({"checkpoint": summary["checkpoint"],
                          "sample_grids": {n: (r["sample_grids"] or [None])[-1] for n, r in summary["runs"].items()},
                          "reconstruction_loss": summary["reconstruction_loss"]}, indent=2))
        print(f"result: {storage.join(cfg.storage, cfg.name, RESULT_FILE)}")
    elif args.command == "synthesize":
        from ray_jobs.gcgan.synthesize import synthesize

        per_class = PRESETS[args.preset] if args.preset else args.per_class
        manifest = synthesize(args.checkpoint, args.output, per_class=per_class, balance=args.balance,
                              data=args.data, classes=args.classes, bn_mode=args.bn_mode, seed=args.seed,
                              use_gpu=args.gpu, overwrite=args.overwrite)
        added = dict(zip(manifest.class_names, manifest.synthetic_class_counts("train")))
        print(f"dataset version {args.output}: synthetic train images per class {added}; real shards "
              f"included by reference from {', '.join(r['uri'] for r in manifest.references)}")
    else:
        from ray_jobs.gcgan.quality_report import quality

        report = quality(args.data, args.out, extractor=args.extractor, classifier=args.classifier,
                         classes=args.classes, image_size=args.image_size, pixel_size=args.pixel_size,
                         pairs=args.pairs)
        from ray_jobs.gcgan.quality_report import format_report

        print(format_report(report))
        print(f"report: {storage.join(args.out, 'quality.json')}")
    return 0


if __name__ == "__main__":
    # Run from the importable module so Ray pickles the worker functions by reference.
    from ray_jobs import gan as _module
    sys.exit(run_main(_module.main))
