"""Ingest job: images (folder, MedMNIST npz, CSV) -> Parquet shards + manifest; or verify them.

    python -m ray_jobs.prepare --input PATH --output URI [--format auto|folder|npz|csv]
                               [--val 0.1 --test 0.2 --seed 0] [--classes A,B,...]
                               [--small-classes error|train-only] [--shard-mb 128]
                               [--workers N] [--overwrite]
                               [--window auto|min-max|percentile:P1,P2|fixed:LO,HI]
                               [--window-scope image|dataset] [--frames first|middle|last|N]
    python -m ray_jobs.prepare --verify URI

16-bit and float PNG/TIFF and DICOM (``.dcm``) are stored losslessly; ``--window`` says how their
values become the model's [0, 1] input (per image, or ``--window-scope dataset``: one window from the
train split), and is recorded in the manifest with the train split's pixel mean/std.

Encoding runs in ``--workers`` processes (default: every core of this machine). Ends with the
per-class table (counts per split, share, imbalance ratio). Exit status 2 on bad input, naming the
file or row; nothing is left at the output then.
"""
from __future__ import annotations

import argparse
import sys
import time

from ray_jobs.runtime.cli import add_verbose_flag, parser, run_main
from shards import ingest, summary_table, verify


def get_args_parser() -> argparse.ArgumentParser:
    p = parser("medbalance prepare", __doc__)
    p.add_argument("--input", help="image folder, .npz or .csv (local path or s3://)")
    p.add_argument("--output", help="dataset URI: local path, file:// or s3://bucket/prefix")
    p.add_argument("--format", default="auto", choices=["auto", "folder", "npz", "csv"],
                   help="input kind (auto: from the path)")
    p.add_argument("--val", type=float, default=0.1, help="val fraction when the input has no splits")
    p.add_argument("--test", type=float, default=0.2, help="test fraction when the input has no splits")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the shuffle within splits")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names in label order (npz/csv labels are checked against it)")
    p.add_argument("--small-classes", default="error", choices=["error", "train-only"],
                   help="a class too small for every split: refuse (default) or keep it in train only")
    p.add_argument("--shard-mb", type=float, default=128.0, help="target shard size in MB")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at --output")
    p.add_argument("--window", default="auto",
                   help="16-bit/float/DICOM intensities -> [0, 1]: auto (DICOM's own window, else "
                        "min-max), min-max, percentile:P1,P2 or fixed:LO,HI (default auto)")
    p.add_argument("--window-scope", default="image", choices=["image", "dataset"],
                   help="min-max/percentile per image, or one window from the train split (dataset)")
    p.add_argument("--frames", default=None, metavar="first|middle|last|N",
                   help="which page/frame of multi-page TIFF / multi-frame DICOM files to take "
                        "(default: refuse such files)")
    p.add_argument("--verify", metavar="URI", default=None,
                   help="re-read a dataset: checksums, rows and every image; exit 2 on damage")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.verify:
        started = time.perf_counter()
        report = verify(args.verify)
        print(f"OK {args.verify}: {report.shards} shard(s), {report.rows} rows, "
              f"{report.bytes / 1e6:.1f} MB verified in {time.perf_counter() - started:.1f} s")
        if report.unlisted_dirs:
            print(f"note: {len(report.unlisted_dirs)} shard folder(s) that the manifest does not list, "
                  f"left by an interrupted ingest: {', '.join(report.unlisted_dirs[:5])}; they are not "
                  "part of the dataset. Re-run the ingest with --overwrite to remove them, or delete them")
        return 0
    if not args.input or not args.output:
        get_args_parser().error("--input and --output are required (or use --verify URI)")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    started = time.perf_counter()
    manifest = ingest(args.input, args.output, fmt=args.format, val=args.val, test=args.test,
                      seed=args.seed, classes=classes, small_classes=args.small_classes,
                      shard_bytes=int(args.shard_mb * 1024 * 1024), overwrite=args.overwrite,
                      workers=args.workers, window=args.window, window_scope=args.window_scope,
                      frames=args.frames)
    seconds = time.perf_counter() - started
    rows = sum(s.rows for s in manifest.shards)
    print(summary_table(manifest))
    intensity = manifest.intensity or {}
    if intensity.get("windowed_rows"):
        how = (f"from {intensity['requested']} over the train split" if intensity["scope"] == "dataset"
               else "the same for every image" if intensity["window"].startswith("fixed")
               else "each DICOM's own window, else the image's min-max" if intensity["window"] == "auto"
               else "per image")
        print(f"{intensity['windowed_rows']} image(s) are 16-bit, float or DICOM grey: window "
              f"{intensity['window']} ({how})" + (f"; frames {intensity['frames']}" if intensity.get("frames") else ""))
    skipped = manifest.provenance.get("num_skipped_files", 0)
    print(f"wrote {rows} images in {len(manifest.shards)} shard(s) to {args.output} in {seconds:.1f} s "
          f"({rows / max(seconds, 1e-9):.0f} images/s)" + (f"; skipped {skipped} non-image file(s)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
