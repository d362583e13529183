"""Export a trained classifier as ONNX or a torch.export program, ready to serve.

    python -m ray_jobs.export --checkpoint runs/r18-cws --format onnx --out runs/r18-cws/model.onnx
    python -m ray_jobs.export --checkpoint CKPT --format torch-export --out model.pt2 [--logits]

The model takes decoded images (N x C x H x W, uint8; float32 in [0, 1] for 16-bit data), resizes
and normalises them as predict does, and returns probabilities, calibrated with the run's
calibration.json when it has one (logits with --logits). The command line only: the work is done
by ``ray_jobs.classifier.export``.
"""
from __future__ import annotations

import argparse
import sys

from ray_jobs.classifier.export import FORMATS, export_model
from ray_jobs.runtime.cli import add_verbose_flag, parser, run_main


def get_args_parser() -> argparse.ArgumentParser:
    p = parser("medbalance export", __doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir/file, or a run folder (its best checkpoint)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx (metadata in metadata_props) or torch-export (a .pt2 archive, metadata in "
                        "its extra file medbalance.json)")
    p.add_argument("--out", required=True, help="the file to write (local or s3://); replaced atomically")
    p.add_argument("--logits", action="store_true", help="output logits instead of probabilities")
    p.add_argument("--no-calibration", action="store_true",
                   help="ignore the run's calibration.json: probabilities are softmax(logits)")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    meta = export_model(args.checkpoint, args.format, args.out, logits=args.logits,
                        calibration=not args.no_calibration)
    spec = meta["input_spec"]
    print(f"wrote {args.format} model {args.out}: input images N x {spec['channels']} x H x W "
          f"({meta['input_dtype']}), resized to {meta['image_size']} px; output N x {len(meta['class_names'])} "
          f"{meta['output']} ({', '.join(meta['class_names'])})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
