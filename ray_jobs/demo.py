"""The main job on the embedded default: ingest RetinaMNIST, train ADSR-ResNet-18 with CE + CWS on
2 Ray workers, evaluate on test, print the metrics and where the report and plots are.

    python -m ray_jobs.demo [--data-root data] [--out runs] [--set epochs=2 ...] [--fresh] [--verbose]

Local Ray (started in-process), local Parquet shards, the RetinaMNIST file bundled in ``data/``;
``make demo`` runs it. The training settings are ``configs/demo.yaml``; ``--set`` overrides them.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ray_jobs.runtime.cli import add_verbose_flag, parser, run_main

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from metrics.report import format_table
    from medbalance.errors import DataError
    from ray_jobs.classifier.config import TrainConfig
    from ray_jobs.classifier.driver import fit
    from ray_jobs.classifier.evaluation import evaluate
    from ray_jobs.runtime import configs as config_lib
    from shards import ingest, read_manifest, summary_table
    from shards.storage import join

    p = parser("medbalance demo", __doc__)
    p.add_argument("--data-root", default=str(REPO / "data"), help="folder holding retinamnist/retinamnist.npz")
    p.add_argument("--out", default=str(REPO / "runs"), help="where data, runs and reports go")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of configs/demo.yaml, e.g. epochs=2 (repeatable)")
    p.add_argument("--fresh", action="store_true",
                   help="train a new run (its name gets the time) instead of resuming/reusing the last one")
    add_verbose_flag(p)
    args = p.parse_args(argv)
    started = time.perf_counter()

    data_uri = join(args.out, "data", "retinamnist")
    print(f"[1/3] ingest {args.data_root}/retinamnist/retinamnist.npz -> {data_uri}", flush=True)
    try:
        manifest = read_manifest(data_uri)
        print("      (already there; reusing it)")
    except DataError:  # no dataset yet: make it
        manifest = ingest(f"{args.data_root}/retinamnist/retinamnist.npz", data_uri, overwrite=True)
    print(summary_table(manifest), flush=True)

    cfg = config_lib.load_config(TrainConfig, str(REPO / "configs" / "demo.yaml"),
                                 [f"data.uri={data_uri}", f"storage={join(args.out, 'demo')}", *args.overrides])
    if args.fresh:
        cfg.name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[2/3] train {cfg.model} + {cfg.loss} on {cfg.num_workers} Ray workers, {cfg.epochs} epochs "
          f"-> {join(cfg.storage, cfg.name)}", flush=True)
    summary = fit(cfg, resume="auto")

    out = join(cfg.storage, cfg.name, "eval-test")
    print(f"[3/3] evaluate {summary['best_checkpoint']} on test (temperature scaling fitted on val)", flush=True)
    report = evaluate(summary["best_checkpoint"], data_uri, "test", out, calibrate=True)
    print(format_table(report))
    cal = report.get("calibration", {})
    if cal:
        print(f"temperature {cal['temperature']:.3f}: ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}, "
              f"Brier {cal['brier_before']:.4f} -> {cal['brier_after']:.4f} (test metrics above are after scaling)")
    print(f"report: {out}/report.json  {out}/report.md")
    print(f"plots:  {out}/confusion_matrix.png  {out}/reliability_diagram.png  {out}/per_class_recall.png")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    from ray_jobs import demo as _module
    sys.exit(run_main(_module.main))
