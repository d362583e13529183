"""Hyperparameter sweep on Ray Tune + Optuna: every trial a Ray Train DDP run, with early stopping.

    python -m ray_jobs.sweep --config configs/sweep-cws.yaml --data runs/data/retina --trials 20
    python -m ray_jobs.sweep --config configs/sweep-fafl.yaml --data s3://b/isic --storage s3://b/sweeps \
        --name fafl-isic --num-workers 2 --epochs 30 --set scheduler.grace_period=5
    python -m ray_jobs.sweep --config configs/sweep-cws.yaml --name cws --resume   # after an interruption

The search (``SweepConfig``, ``ray_jobs.sweeps.config``): Optuna's TPE (or random) sampler, seeded, through
``ray.tune.search.optuna.OptunaSearch``; ASHA (``ASHAScheduler``) stops trials whose validation
metric trails at its rungs. Each trial trains ``base`` with its sampled keys set
(``ray_jobs.sweeps.search_space``), as ``ray_jobs.train`` does, on its own ``num_workers`` workers
(``ray_jobs.sweeps.tuning``); as many trials run at once as the cluster fits with CPUs left to the data
pipelines (``ray_jobs.runtime.resources.plan_trials``).

Results in ``<storage>/<name>/``: ``sweep.yaml`` (the resolved config), ``trials.csv``,
``best_config.yaml`` (``python -m ray_jobs.train --config best_config.yaml`` trains it),
``plots/*.png``, Tune's experiment (``tune/``) and each trial's training run (``trials/<id>/``).
A rerun of a name with results is refused unless ``--resume``: that continues the sweep with
``Tuner.restore`` (finished trials are kept, unfinished ones resume from their last checkpoint, the
searcher keeps every observation).
"""
from __future__ import annotations

import time

from medbalance.errors import ConfigError
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.progress import say
from ray_jobs.runtime.run_dir import RunDir
from ray_jobs.sweeps import tuning
from ray_jobs.sweeps.config import MAX_SEED, SweepConfig
from shards import storage

SWEEP_FILE, TRIALS_FILE, BEST_FILE, PLOTS_DIR = "sweep.yaml", "trials.csv", "best_config.yaml", "plots"
ASHA_FILE = "asha_rungs.json"   # the scheduler's rungs, for --resume (tuning.asha)

# Lines of every trial that would make a wall of logs; the sweep prints one line per trial instead.
QUIET_LINES = (
    r"\[medbalance\] epoch \d+/\d+ loss",   # each trial's per-epoch line
    # A trial that ASHA stopped ends its actor: Ray Train's cleaner then frees its workers' CPUs,
    # and the GCS may note that the already-gone actors could not be killed.
    r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group",
    r"Failed to kill actor \w+, return status: Invalid: KillActor RPC failed",
)


def reported_metrics() -> set[str]:
    """Metrics the training loop reports every epoch that a sweep may optimise."""
    from metrics.classification import MAIN_METRICS

    return {"train_loss"} | {f"val_{k}" for k in MAIN_METRICS}


def check_sweep(cfg: SweepConfig) -> None:
    """What spans the sweep's fields (each field's own range is its rule in ``sweeps.config``;
    the space is checked by ``search_space.parse_space``)."""
    if cfg.metric not in reported_metrics():
        raise ConfigError(f"metric {cfg.metric!r} is not reported by training; use one of "
                          f"{sorted(reported_metrics())}")
    if cfg.scheduler.grace_period > cfg.base.epochs:
        raise ConfigError(f"scheduler.grace_period must be between 1 and base.epochs ({cfg.base.epochs}), "
                          f"got {cfg.scheduler.grace_period}")


def check_seed(seed, key: str) -> None:
    """A seed Optuna, NumPy and torch all accept: an integer in 0 .. 2**32 - 1 (a comparison's
    ``seeds`` list; a single ``seed`` field has the rule in ``sweeps.config``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{key} must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {seed!r}")


def absolute_paths(base) -> None:
    """Local paths of a TrainConfig made absolute: trial drivers run in their own working folder."""
    base.data.uri = tuning.absolute(base.data.uri)
    base.pretrained = tuning.absolute(base.pretrained)


def make_searcher(cfg: SweepConfig, distributions: dict):
    """Optuna TPE (``constant_liar`` for concurrent trials) or random sampling, seeded."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    if cfg.search == "tpe":
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, constant_liar=True,
                                             n_startup_trials=min(10, max(2, cfg.trials // 4)))
    else:
        sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
    class ObservedOptunaSearch(OptunaSearch):
        """``OptunaSearch`` that says, when ``Tuner.restore`` restores it, how many finished trials its
        study holds: a searcher that lost them (ray#30861) would plan the rest of a sweep blind."""

        def restore(self, checkpoint_path: str):
            super().restore(checkpoint_path)
            finished = [t for t in self._ot_study.trials if t.state.is_finished()]
            say(f"restored the Optuna searcher: its study holds {len(finished)} finished trial(s)")

    return ObservedOptunaSearch(space=distributions, metric=cfg.metric, mode=cfg.mode, sampler=sampler,
                                points_to_evaluate=[dict(p) for p in cfg.points_to_evaluate] or None)


def make_scheduler(cfg: SweepConfig, sweep_uri: str):
    if cfg.scheduler.name == "none":
        return None
    return tuning.asha(cfg.metric, cfg.mode, cfg.base.epochs, cfg.scheduler.grace_period,
                       cfg.scheduler.reduction_factor, storage.join(sweep_uri, ASHA_FILE))


def sweep(cfg: SweepConfig, resume: bool = False) -> dict:
    """Run (or continue) the sweep; write and return its results.

    Every value is checked before Ray starts and before anything is written; a new sweep that fails
    before its first trial leaves nothing behind (``tuning.fit_or_leave_nothing``), so the same
    command can be run again.

    Returns:
        ``{"uri", "rows", "best", "best_config", "plots", "seconds"}``.
    """
    from shards import read_manifest

    from ray_jobs.sweeps.search_space import check_points, parse_space

    absolute_paths(cfg.base)
    cfg.storage = tuning.absolute(cfg.storage)
    storage.check_folder(cfg.storage, "--storage")
    folder = RunDir(cfg.storage, cfg.name)
    cfg = tuning.resolve_resume(folder, cfg, resume, SWEEP_FILE)
    check_sweep(cfg)
    if not cfg.base.data.uri:
        raise ConfigError("no dataset: pass --data URI (a dataset made by ray_jobs.prepare) or set base.data.uri")
    class_counts = read_manifest(cfg.base.data.uri).class_counts("train")
    distributions = parse_space(cfg.space, cfg.base, class_counts)
    check_points(cfg.points_to_evaluate, distributions, cfg.base, class_counts)

    from ray_jobs.runtime.resources import plan_trials
    from ray_jobs.runtime.ray_setup import add_quiet_worker_lines, init_ray

    add_quiet_worker_lines(*QUIET_LINES)
    init_ray()
    base = cfg.base
    concurrent, cpus = plan_trials(base.num_workers, base.use_gpu, cfg.trials, cfg.max_concurrent_trials,
                                   base.cpus_per_worker)
    if not resume:  # only now: a sweep the cluster cannot run leaves no saved config behind
        folder.write_bytes(SWEEP_FILE, config_lib.dump_yaml(cfg).encode())
    trial_base = config_lib.to_dict(base)
    trial_base.update(cpus_per_worker=cpus, checkpoint_metric=cfg.metric, checkpoint_mode=cfg.mode)
    keys = list(distributions)
    restore = resume and tuning.has_experiment(folder.uri)
    say(f"sweep {folder.uri}: {cfg.trials} trials of {base.model} + {base.loss}, {base.epochs} epochs each, "
        f"{concurrent} at a time on {base.num_workers} worker(s) x {cpus:g} CPUs; {cfg.search.upper()} "
        f"(seed {cfg.seed}) + {cfg.scheduler.name.upper()} on {cfg.metric} ({cfg.mode})"
        + ("; resuming" if restore else ""))
    started = time.perf_counter()
    scheduler = make_scheduler(cfg, folder.uri)
    lines = tuning.trial_lines(cfg.metric, cfg.mode, keys, scheduler)
    results = tuning.fit_or_leave_nothing(
        folder, not resume, lines, [SWEEP_FILE, ASHA_FILE],
        lambda: tuning.run_tuner(
            sweep_uri=folder.uri, base=trial_base, methods=None, param_space={},
            search_alg=make_searcher(cfg, distributions), scheduler=scheduler, num_samples=cfg.trials,
            concurrent=concurrent, resume=restore, status_interval=cfg.status_interval, metric=cfg.metric,
            mode=cfg.mode, keys=keys, callbacks=[lines]))
    return write_results(cfg, folder, results, distributions, time.perf_counter() - started)


def write_results(cfg: SweepConfig, folder: RunDir, results, distributions: dict, seconds: float) -> dict:
    """trials.csv, best_config.yaml and the plots of a finished sweep."""
    from ray_jobs.sweeps import report
    from ray_jobs.sweeps.search_space import build_config

    keys = list(distributions)
    stopped = tuning.stopped_by_asha(storage.join(folder.uri, ASHA_FILE)) if cfg.scheduler.name == "asha" else set()
    rows, histories = report.trial_rows(results, sweep_uri=folder.uri, metric=cfg.metric, mode=cfg.mode,
                                        keys=keys, stopped=stopped)
    columns = ["trial_id", "status", *keys, f"best_{cfg.metric}", "best_epoch", "epochs_run", "checkpoint",
               "run", "message"]
    folder.write_bytes(TRIALS_FILE, report.csv_bytes(rows, columns))
    best = report.best_row(rows, cfg.metric, cfg.mode)
    best_config = None
    if best is not None:
        best_cfg = build_config(config_lib.to_dict(cfg.base), {k: best[k] for k in keys}, "best trial")
        best_cfg.name, best_cfg.storage = f"{cfg.name}-best", cfg.storage
        header = (f"# Best trial {best['trial_id']} of sweep {folder.uri}: {cfg.metric} "
                  f"{best[f'best_{cfg.metric}']:.4f} at epoch {best['best_epoch']}.\n"
                  f"# Train it: python -m ray_jobs.train --config {BEST_FILE}\n")
        best_config = folder.write_bytes(BEST_FILE, (header + config_lib.dump_yaml(best_cfg)).encode())
    study = report.rebuild_study(rows, histories, distributions, cfg.metric, cfg.mode)
    plots = report.write_plots(study, storage.join(folder.uri, PLOTS_DIR), cfg.metric)
    print(report.table(rows, ["trial_id", "status", *keys, f"best_{cfg.metric}", "best_epoch", "epochs_run",
                              "message"]))
    counts = {s: sum(r["status"] == s for r in rows)
              for s in (report.FINISHED, report.STOPPED, report.FAILED, report.INCOMPLETE)}
    say(f"{len(rows)} trials in {seconds:.0f} s: " + ", ".join(f"{n} {s}" for s, n in counts.items()
                                                               if n or s != report.INCOMPLETE))
    if best is not None:
        say(f"best: trial {best['trial_id']} {cfg.metric} {best[f'best_{cfg.metric}']:.4f} "
            f"({tuning.describe(best, keys)})")
    return {"uri": folder.uri, "rows": rows, "best": best, "best_config": best_config,
            "plots": [storage.join(folder.uri, PLOTS_DIR, p) for p in plots], "seconds": round(seconds, 1)}
