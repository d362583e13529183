"""Sweeps (Ray Tune + Optuna + ASHA) and method comparisons on a real local Ray.

The Ray tests use the session cluster (conftest.ray_cluster) and a small data set made here that a
network learns in one epoch (each class its own colour), so that "a learning rate that cannot learn"
is reliably worse and ASHA has something to stop.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from medbalance.errors import ConfigError
from metrics.comparison import paired_difference, summarize, to_markdown
from ray_jobs.classifier.config import TrainConfig
from ray_jobs.runtime.resources import TRIAL_DRIVER_CPUS, plan_cpus, plan_trials
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.faults import ENV as FAULTS_ENV
from ray_jobs.sweeps.config import SweepConfig
from ray_jobs.sweeps.search_space import parse_space
from shards import ingest

from conftest import REPO, kill_driver_when, run_ray_job_submit

COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40], [200, 40, 200]])


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> str:
    """5 imbalanced classes of 28x28 noisy solid colours (train 60/40/25/15/10, val 6 each)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, counts in (("train", (60, 40, 25, 15, 10)), ("val", (6,) * 5), ("test", (6,) * 5)):
        labels = np.repeat(np.arange(5), counts)
        images = COLOURS[labels][:, None, None, :] + rng.normal(0, 25, (len(labels), 28, 28, 3))
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    root = tmp_path_factory.mktemp("colours")
    np.savez(root / "colours.npz", **arrays)
    ingest(str(root / "colours.npz"), str(root / "shards"), workers=1)
    return str(root / "shards")


BASE = {"model": "resnet18", "loss": "cws", "epochs": 2, "num_workers": 1,
        "data": {"image_size": 28, "augment": "none", "batch_size": 16, "eval_batch_size": 64},
        "optim": {"lr": 0.05, "warmup_epochs": 0.0}}


# The trial at this learning rate hits a NaN loss at epoch 1 (a test hook the sweep's driver reads
# from its environment and applies to the trials whose config matches: ray_jobs.runtime.faults).
NAN_LR = 0.0031
NAN_TRIAL = {FAULTS_ENV: json.dumps({"when": {"optim.lr": NAN_LR}, "nan_epoch": 1})}


def write_sweep(path: Path, data: str, **over) -> str:
    """A sweep preset: 4 trials tried in a fixed order (points_to_evaluate): a learning rate that
    learns, one that cannot (1e-6), one that learns and then hits a NaN loss, and one that cannot.
    ASHA watches the training loss: after one epoch it separates the two learning rates clearly,
    while a random network's val macro-F1 on these colours is anywhere in 0.03-0.5."""
    good, bad = 0.003, 1e-6
    doc = {"name": "s", "trials": 4, "seed": 0, "max_concurrent_trials": 2, "status_interval": 30,
           "metric": "train_loss", "mode": "min",
           # Two parameters (as before the NaN hook left the space): Optuna's parallel-coordinate and
           # importance plots need two; the CWS weight stays at its default in every point.
           "space": {"optim.lr": {"type": "loguniform", "low": 1e-6, "high": 0.5},
                     "loss_params.weight": {"type": "uniform", "low": 0.5, "high": 2.0}},
           "points_to_evaluate": [{"optim.lr": lr, "loss_params.weight": 1.0} for lr in (good, bad, NAN_LR, bad)],
           "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
           "base": {**BASE, "data": {**BASE["data"], "uri": data}}}
    config_lib.merge(doc, over)
    path.write_text(yaml.safe_dump(doc))
    return str(path)


# ----------------------------------------------------------------------------- no Ray needed
@pytest.mark.parametrize("space, message", [
    ({"optim.lrr": {"type": "loguniform", "low": 0.01, "high": 0.1}}, r"optim\.lrr.*unknown key"),
    ({"loss_params.wieght": {"type": "uniform", "low": 0.0, "high": 1.0}}, r"loss_params\.wieght=0\.0.*loss 'cws' has no option\(s\) \['wieght'\]"),
    ({"loss_params.weight": {"type": "loguniform", "low": 10.0, "high": 0.01}}, r"loss_params\.weight: low \(10.0\) must be below high"),
    ({"loss_params.weight": {"type": "uniform", "low": -1.0, "high": 1.0}}, r"loss_params\.weight=-1\.0.*outside"),
    ({"optim.lr": {"type": "normal", "low": 0.0, "high": 1.0}}, r"optim\.lr: unknown type 'normal'"),
    ({"model": {"type": "choice", "values": ["resnet18", "resnet19"]}}, r"model='resnet19'.*expected one of .*resnet18"),
    ({"num_workers": {"type": "int", "low": 1, "high": 4}}, r"num_workers: set by the sweep"),
])
def test_bad_space_fails_before_any_trial(tmp_path, colour_data, space, message):
    from ray_jobs import sweep

    preset = write_sweep(tmp_path / "sweep.yaml", colour_data)
    doc = yaml.safe_load(Path(preset).read_text())
    doc["space"], doc["points_to_evaluate"] = space, []
    Path(preset).write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=message):
        sweep.main(["--config", preset, "--storage", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists(), "nothing may be written before the space is checked"


def test_rerun_refused_without_resume_and_resume_needs_a_sweep(tmp_path, colour_data):
    from ray_jobs import sweep

    preset = write_sweep(tmp_path / "sweep.yaml", colour_data)
    with pytest.raises(ConfigError, match="has no sweep to resume"):
        sweep.main(["--config", preset, "--storage", str(tmp_path / "runs"), "--resume"])
    (tmp_path / "runs" / "s").mkdir(parents=True)
    (tmp_path / "runs" / "s" / "sweep.yaml").write_text(yaml.safe_dump(yaml.safe_load(Path(preset).read_text())))
    with pytest.raises(ConfigError, match=r"already has results; add --resume"):
        sweep.main(["--config", preset, "--storage", str(tmp_path / "runs")])


def test_space_becomes_optuna_distributions():
    space = parse_space({"loss_params.weight": {"type": "loguniform", "low": 0.01, "high": 10},
                         "epochs": {"type": "int", "low": 2, "high": 4},
                         "data.sampling": {"type": "choice", "values": ["none", "sqrt"]}}, TrainConfig())
    assert space["loss_params.weight"].log and space["loss_params.weight"].low == 0.01
    assert (space["epochs"].low, space["epochs"].high) == (2, 4)
    assert list(space["data.sampling"].choices) == ["none", "sqrt"]
    for preset in ("configs/sweep-cws.yaml", "configs/sweep-fafl.yaml"):
        cfg = config_lib.load_config(SweepConfig, str(REPO / preset))
        assert parse_space(cfg.space, cfg.base, [100, 50, 20, 10, 5])


def test_plan_trials_leaves_cpus_to_data():
    # 2 CPUs: 1 reserved for Ray Data, one trial of 1 worker gets the rest less its driver.
    assert plan_trials(1, False, 4, total_cpus=2, total_gpus=0) == (1, round(1 - TRIAL_DRIVER_CPUS, 2))
    concurrent, cpus = plan_trials(2, False, 8, total_cpus=16, total_gpus=0)
    assert concurrent == 5 and concurrent * (2 * cpus + TRIAL_DRIVER_CPUS) <= 12 + 1e-6
    assert plan_trials(1, False, 3, total_cpus=16, total_gpus=0)[0] == 3          # no more than trials
    # two nodes of 2 CPUs: 1.45 CPUs per worker would leave 0.5 free on each node, where no 1-CPU
    # data task fits (the two-node sweep hung so); whole-CPU footprints leave a CPU on each
    assert plan_trials(1, False, 2, total_cpus=4, total_gpus=0) == (2, round(1 - TRIAL_DRIVER_CPUS, 2))
    assert plan_cpus(2, False, total_cpus=4) == 1.0 and plan_cpus(2, False, total_cpus=2) == 0.5
    assert plan_trials(2, True, 8, total_cpus=32, total_gpus=4)[0] == 2           # 2 GPUs per trial
    with pytest.raises(ConfigError, match="too few"):
        plan_trials(2, False, 8, max_concurrent=8, total_cpus=2, total_gpus=0)


def test_paired_comparison_by_hand():
    method = {0: 0.50, 1: 0.60, 2: 0.55}
    base = {0: 0.40, 1: 0.45, 2: 0.50}
    paired = paired_difference(method, base)
    diffs = [0.10, 0.15, 0.05]
    mean, sd = sum(diffs) / 3, 0.05                                  # sd of (0.10, 0.15, 0.05) = 0.05
    half = 4.302652729749462 * sd / math.sqrt(3)                     # t(0.975, 2) = 4.3027
    assert paired["n"] == 3 and paired["diff"] == pytest.approx(mean)
    assert (paired["low"], paired["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    runs = [{"method": m, "seed": s, "macro_f1": v[s], "balanced_accuracy": v[s], "ece": 0.1, "brier": 0.5,
             "auc_macro": 0.7} for m, v in (("base", base), ("new", method)) for s in v]
    rows = summarize(runs, baseline="base")
    assert [r["method"] for r in rows] == ["base", "new"]
    assert rows[0]["macro_f1_std"] == pytest.approx(0.05) and rows[1]["macro_f1_diff"] == pytest.approx(mean)
    table = to_markdown(rows, "base")
    assert "| new | 3 | 0.5500 ± 0.0500 |" in table and "Δ Macro-F1" in table
    with pytest.raises(ConfigError, match="baseline 'other'"):
        summarize(runs, baseline="other")


# ----------------------------------------------------------------------------- on Ray
def _newest_experiment_state(tune_dir: Path) -> list[dict]:
    states = sorted(tune_dir.glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):  # being replaced
        return []
    return [json.loads(t[0]) for t in data["trial_data"]]


def _submit(ray_cluster, args: list[str], timeout: int = 900, job_env: dict | None = None) -> str:
    runtime_env = {"excludes": [".git", ".venv", "runs", "*.parquet", "*.npz", ".pytest_cache"],
                   **({"env_vars": job_env} if job_env else {})}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, "-m", *args]
    out = run_ray_job_submit(cmd, env=ray_cluster["env"], timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return out.stdout + out.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_killed_resumed_through_job_submit(ray_cluster, colour_data, tmp_path):
    """A 4-trial sweep whose driver is killed after its first trial, resumed with `ray job submit
    ... --resume`: no finished trial reruns, the restored searcher holds every finished trial, ASHA
    stops a trial that cannot learn, a NaN trial is recorded as failed, and the best config trains."""
    preset = write_sweep(tmp_path / "sweep.yaml", colour_data)
    runs = tmp_path / "runs"
    args = ["ray_jobs.sweep", "--config", preset, "--storage", str(runs), "--name", "s"]
    kill_driver_when([sys.executable, "-m", *args], {**ray_cluster["env"], **NAN_TRIAL}, tmp_path / "driver.log",
                     lambda: any(t["status"] in ("TERMINATED", "ERROR")
                                 for t in _newest_experiment_state(runs / "s" / "tune")),
                     "finished trial", timeout=600)
    before = _newest_experiment_state(runs / "s" / "tune")
    finished = {t["trial_id"] for t in before if t["status"] in ("TERMINATED", "ERROR")}
    stamps = {p: os.stat(p).st_mtime_ns for t in finished for p in glob.glob(str(runs / "s" / "trials" / t / "*"))}
    assert not (runs / "s" / "trials.csv").exists()
    time.sleep(3)  # let Ray reap the dead driver's trials

    # Without --resume the name is refused; with it the sweep goes on.
    refused = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=ray_cluster["env"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "already has results; add --resume" in refused.stderr
    out = _submit(ray_cluster, args + ["--resume"], job_env=NAN_TRIAL)

    restored = re.search(r"restored the Optuna searcher: its study holds (\d+) finished trial", out)
    assert restored, out[-4000:]
    assert int(restored.group(1)) == len(finished) >= 1
    asha = json.loads((runs / "s" / "asha_rungs.json").read_text())   # ASHA's state, kept across the kill
    assert len({trial for bracket in asha["rungs"] for _, recorded in bracket for trial in recorded}) == 4
    for path, stamp in stamps.items():  # finished trials were not trained again
        assert os.stat(path).st_mtime_ns == stamp, path
    with open(runs / "s" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    by_status = {}
    for row in rows:
        by_status.setdefault(row["status"], []).append(row)
    assert set(by_status) == {"finished", "stopped early", "failed"}, rows
    assert all(float(r["optim.lr"]) < 1e-5 for r in by_status["stopped early"])
    assert set(asha["stopped"]) == {r["trial_id"] for r in by_status["stopped early"]}  # what ASHA stopped
    [failed] = by_status["failed"]
    assert "non-finite loss" in failed["message"] and "epoch 1 step 0" in failed["message"]
    # Both learning rates may finish (ASHA can only stop a trial behind one already at its rung).
    done = min(by_status["finished"], key=lambda r: float(r["best_train_loss"]))
    assert int(done["epochs_run"]) == 2 and float(done["optim.lr"]) == pytest.approx(0.003)
    assert float(done["best_train_loss"]) < min(float(r["best_train_loss"]) for r in by_status["stopped early"])
    for name in ("optimization_history.png", "slice.png", "learning_curves.png", "parallel_coordinate.png"):
        assert (runs / "s" / "plots" / name).stat().st_size > 0
    assert yaml.safe_load((runs / "s" / "sweep.yaml").read_text())["trials"] == 4
    assert "trial_id" in out and "stopped early" in out  # the table was printed

    # best_config.yaml is a training config as it is (here shortened to one epoch).
    from ray_jobs.classifier.driver import fit
    best = config_lib.load_config(TrainConfig, str(runs / "s" / "best_config.yaml"), ["epochs=1", "name=best-run"])
    assert best.optim.lr == pytest.approx(float(done["optim.lr"]))
    summary = fit(best, resume="fresh")
    assert summary["status"] == "ok" and summary["epochs"] == 1


@pytest.mark.ray
@pytest.mark.slow
def test_compare_grid_through_job_submit(ray_cluster, colour_data, tmp_path):
    """2 methods x 2 seeds -> a table with 2 rows, std over seeds and a paired difference."""
    preset = tmp_path / "compare.yaml"
    preset.write_text(yaml.safe_dump({
        "name": "c", "seeds": [0, 1], "baseline": "r18+ce", "max_concurrent_trials": 2,
        "methods": {"r18+ce": {"model": "resnet18", "loss": "ce"},
                    "r18+cws": {"model": "resnet18", "loss": "cws", "loss_params": {"weight": 1.0},
                                "data": colour_data}},
        "base": {**BASE, "epochs": 1, "data": {**BASE["data"], "uri": colour_data}}}))
    out = _submit(ray_cluster, ["ray_jobs.compare", "--config", str(preset), "--storage", str(tmp_path / "runs")])
    folder = tmp_path / "runs" / "c"
    with open(folder / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["r18+ce", "r18+cws"]
    for row in table:
        assert row["seeds"] == "2" and row["macro_f1_std"] not in ("", "nan")
    assert table[1]["macro_f1_diff"] not in ("", "nan") and float(table[1]["macro_f1_low"]) <= float(table[1]["macro_f1_high"])
    with open(folder / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 4 and all(r["status"] == "finished" and Path(r["report"]).exists() for r in runs)
    markdown = (folder / "comparison.md").read_text()
    assert "| r18+ce | 2 |" in markdown and "Paired difference vs **r18+ce**" in markdown
    assert "| Method | Seeds | Macro-F1 | B-ACC | ECE | Brier | AUC |" in out
