"""Sweep efficiency: TPE + ASHA vs random search without early stopping, side by side in one run.

    python bench/sweep_efficiency.py                          # 6 trials x 4 epochs each arm, 28 px
    python bench/sweep_efficiency.py --trials 12 --epochs 8 --image-size 32 --json runs/bench/sweep.json

Both arms run ``ray_jobs.sweeps.search.sweep`` (the real job: Tune trials that fit ``ray_jobs.train``'s loop
on the bundled RetinaMNIST, ingested into a temp dir) over the same search space
(``configs/sweep-cws.yaml``: CWS weight log-uniform 0.01-10, learning rate log-uniform 0.005-0.2),
the same base config (``--model``, ``--epochs``, ``--image-size``, 1 worker per trial, training
seed 0) and the same searcher seed:

* **random**: Optuna's random sampler, no scheduler: every trial runs every epoch, so the budget
  is ``trials x epochs`` trial-epochs;
* **tpe+asha**: Optuna's TPE sampler and ASHA (grace period 1, reduction factor 3) with the same
  number of trials; ASHA stops trials that trail, so it spends fewer trial-epochs.

Printed: the best validation macro-F1 each arm reached, the trial-epochs each spent (and the
fraction of the random arm's budget), and each arm's wall time. The goal: TPE + ASHA reaches a
better best score on half the trial-epochs. Scores are on the 1,080-image val split; with few
trials the difference between arms is within the noise of a single run, so read it with the
trial counts. The same parameters can score differently in the two arms: on RetinaMNIST at 4
epochs by about 0.1 macro-F1, as much as most differences between parameters. ``--reproducible``
(seeded data order, deterministic kernels) narrows that; the augmentation in the Ray Data decode
tasks is not seeded, so it does not remove it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _common  # first: puts the checkout on sys.path

REPO = Path(__file__).resolve().parents[1]


def arm(name: str, data: str, storage: str, args, search: str, scheduler: str) -> dict:
    from ray_jobs.runtime import configs as config_lib
    from ray_jobs.sweeps.config import SweepConfig
    from ray_jobs.sweeps.search import sweep

    cfg = config_lib.load_config(SweepConfig, str(REPO / "configs" / "sweep-cws.yaml"), [
        f"name={name}", f"storage={storage}", f"trials={args.trials}", f"seed={args.seed}", f"search={search}",
        f"scheduler.name={scheduler}", "scheduler.grace_period=1", "scheduler.reduction_factor=3",
        "points_to_evaluate=[]", f"base.data.uri={data}", f"base.model={args.model}", f"base.epochs={args.epochs}",
        f"base.data.image_size={args.image_size}", "base.num_workers=1", "base.seed=0",
        f"base.reproducible={str(args.reproducible).lower()}", f"max_concurrent_trials={args.concurrent}",
        "status_interval=300"])
    started = time.perf_counter()
    result = sweep(cfg)
    wall = time.perf_counter() - started
    rows = result["rows"]
    return {"arm": name, "best_val_macro_f1": result["best"]["best_val_macro_f1"] if result["best"] else None,
            "trial_epochs": sum(int(r["epochs_run"]) for r in rows), "trials": len(rows),
            "stopped_early": sum(r["status"] == "stopped early" for r in rows), "wall_s": round(wall, 1),
            "best_params": {k: result["best"][k] for k in cfg.space} if result["best"] else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="a RetinaMNIST shard dataset (default: ingest data/retinamnist into a temp dir)")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--seed", type=int, default=0, help="both searchers' seed")
    p.add_argument("--concurrent", type=int, default=0, help="trials at once (0: what the machine fits)")
    p.add_argument("--reproducible", action="store_true",
                   help="seeded data order and deterministic kernels (base.reproducible): less noise between "
                        "the arms (augmentation is still unseeded)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    os.environ.setdefault("RAY_TMPDIR", "/tmp/mbray-bench")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    from ray_jobs.runtime.ray_setup import configure_logging

    configure_logging(verbose=False)
    from shards import ingest

    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        data = args.data or str(Path(tmp) / "retina")
        if not args.data:
            ingest(str(REPO / "data" / "retinamnist" / "retinamnist.npz"), data, workers=1)
        random_arm = arm("random", data, tmp, args, "random", "none")
        tpe_arm = arm("tpe-asha", data, tmp, args, "tpe", "asha")
    budget = args.trials * args.epochs
    print(f"\nbudget: {args.trials} trials x {args.epochs} epochs = {budget} trial-epochs for random search; "
          f"{args.model}, {args.image_size} px, 1 worker per trial; machine {_common.machine()}")
    _common.print_table(
        ["arm", "best val macro-F1", "trial-epochs", "of budget", "stopped early", "wall s"],
        [[a["arm"], f"{a['best_val_macro_f1']:.4f}", a["trial_epochs"], f"{a['trial_epochs'] / budget:.2f}",
          a["stopped_early"], a["wall_s"]] for a in (random_arm, tpe_arm)])
    better = tpe_arm["best_val_macro_f1"] >= random_arm["best_val_macro_f1"]
    half = tpe_arm["trial_epochs"] <= budget / 2
    print(f"goal (TPE+ASHA better on <= half the trial-epochs): {'met' if better and half else 'not met'} "
          f"(better: {better}, trial-epochs ratio {tpe_arm['trial_epochs'] / budget:.2f}, "
          f"wall-time ratio {tpe_arm['wall_s'] / random_arm['wall_s']:.2f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"budget": budget, "args": vars(args), "random": random_arm,
                                               "tpe_asha": tpe_arm, "machine": _common.machine()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
