"""Batch prediction over shards or an image folder, with a Ray Data actor pool (CPU or GPU).

    python -m ray_jobs.predict --checkpoint runs/r18-cws --input runs/data/retina \
        --output runs/r18-cws/predictions [--split test] [--num-actors 2] [--gpu] [--overwrite] \
        [--no-calibration]
    python -m ray_jobs.predict --checkpoint CKPT --input /path/to/images --output s3://b/preds

The command line only: the work is done by ``ray_jobs.classifier.prediction``.
"""
from __future__ import annotations

import argparse
import sys

from ray_jobs.classifier.prediction import predict
from ray_jobs.runtime.cli import add_verbose_flag, parser, run_main


def get_args_parser() -> argparse.ArgumentParser:
    p = parser("medbalance predict", __doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir/file, or a run folder")
    p.add_argument("--input", required=True, help="shard dataset URI or image folder")
    p.add_argument("--output", required=True, help="output folder URI (Parquet)")
    p.add_argument("--split", default=None, help="for shard input: one split (default: all)")
    p.add_argument("--num-actors", type=int, default=1, help="model replicas in the Ray Data actor pool")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call")
    p.add_argument("--gpu", action="store_true", help="one GPU per model replica (default: CPU)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier predictions at --output (only after the new ones are complete)")
    p.add_argument("--no-calibration", action="store_true",
                   help="write softmax(logits), not softmax(logits / T) with the run's calibration.json")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    success = predict(args.checkpoint, args.input, args.output, split=args.split, num_actors=args.num_actors,
                      use_gpu=args.gpu, overwrite=args.overwrite, batch_size=args.batch_size,
                      calibration=not args.no_calibration)
    print(f"wrote {success['rows']} predictions in {len(success['files'])} file(s) to {args.output} "
          f"in {success['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
