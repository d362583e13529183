"""Ray Tune machinery shared by the sweep and the method comparison: one trial = one training run.

Under Ray 2.60 (Train V2) a trial is a small function trainable, :func:`run_trial`, that builds the
trial's ``TrainConfig`` and calls ``ray_jobs.classifier.driver.fit`` (the same ``train_loop_per_worker``, data
pipelines and run folder as the training job) with :class:`EpochReport` in the ``RunConfig``
callbacks, so every epoch's validation metrics reach Tune while the run trains. The trial driver
holds :data:`~ray_jobs.runtime.resources.TRIAL_DRIVER_CPUS`; its workers hold what
:func:`~ray_jobs.runtime.resources.plan_trials` gave them.

Layout of a sweep or comparison folder ``<storage>/<name>/``::

    tune/                 Tune's experiment (state, searcher state, one folder per trial)
    trials/<run name>/    each trial's training run: checkpoints, config.yaml, result.json

A trial's run name is its Tune trial id (a sweep) or ``<method>-seed<k>`` (a comparison).
"""
from __future__ import annotations

import json
import math
import os
import re

from medbalance.errors import ConfigError
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.progress import say
from ray_jobs.runtime.run_dir import RESULT_FILE, RunDir
from ray_jobs.sweeps.search_space import build_config
from shards import storage

TUNE_DIR, TRIALS_DIR = "tune", "trials"
CLOCK = "epochs_done"   # ASHA's time attribute: epochs finished (epoch + 1), exact after a resume


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (trial drivers run in their own working folder); URIs as given."""
    if not uri or storage.is_remote(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri))


def run_name(params: dict, trial_id: str) -> str:
    """The training run's folder name under ``trials/``."""
    if "method" in params:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{params['method']}-seed{params.get('seed', 0)}")
    return trial_id


def trial_config(params: dict, base: dict, methods: dict | None, trials_uri: str, trial_id: str):
    """The ``TrainConfig`` of one trial: ``base`` <- its method's overlay <- its dotted params."""
    tree = json.loads(json.dumps(base))
    params = dict(params)
    method = params.pop("method", None)
    if method is not None:
        config_lib.merge(tree, (methods or {})[method])
    params.update(storage=trials_uri, name=run_name({"method": method, **params} if method else params,
                                                    trial_id))
    return build_config(tree, params, f"trial {trial_id}")


def _finished_summary(cfg) -> dict | None:
    """``result.json`` of a run that already trained every epoch (the sweep's driver was killed
    after the trial ended but before Tune recorded it), else None."""
    run = RunDir(cfg.storage, cfg.name)
    fs, path = storage.resolve(run.uri)
    if not storage.exists(fs, f"{path}/{RESULT_FILE}", run.uri):
        return None
    summary = run.read_json(RESULT_FILE)
    done = summary.get("status") == "ok" and summary.get("epochs") == cfg.epochs and summary.get("best_metrics")
    return summary if done else None


def run_trial(config: dict, *, base: dict, methods: dict | None, trials_uri: str, faults: dict | None = None) -> None:
    """Tune function trainable: train one trial's config with ``ray_jobs.classifier.driver.fit``.

    A non-finite loss, damaged data or a worker that keeps failing raises, and Tune records the trial
    as failed with that message. A run that already finished is reported again, not retrained.
    ``faults``: the sweep driver's test hooks (``runtime.faults``), applied where their ``when`` fits.
    """
    from ray import tune

    from ray_jobs.classifier import driver

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(config, base, methods, trials_uri, trial_id)
    done = _finished_summary(cfg)
    if done:
        tune.report({**done["best_metrics"], CLOCK: done["epochs"]})
        return
    driver.fit(cfg, resume="auto", callbacks=[_epoch_report_callback()], faults=faults or {})


def _epoch_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReport(TuneReportCallback):
        """Tune's Train callback, adding :data:`CLOCK` to every report (from the loop's ``epoch``)."""

        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            first[CLOCK] = int(first["epoch"]) + 1
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReport()  # defined here so that importing this module does not import Ray


def asha(metric: str, mode: str, max_epochs: int, grace_period: int, reduction_factor: float, state_uri: str):
    """Ray Tune's ASHA on :data:`CLOCK`, with three changes.

    * A trial at its last epoch (its own ``epochs`` where the space searches it) is never stopped. Tune stops a trial by ending its actor; at the
      last epoch the trial is about to end by itself, and letting it do so lets ``fit`` write the
      run's ``result.json`` and Ray Train remove the run's placement group at once (a trial ASHA
      stops earlier leaves that to Ray Train's ``PlacementGroupCleaner``).
    * Its rungs (every trial's value at each milestone) are kept in ``state_uri`` after each
      decision and read back after ``Tuner.restore``: Tune restores a scheduler as it was pickled
      at the start of the experiment (``TuneController`` does not snapshot it), so a resumed sweep
      would otherwise let the next trials pass every rung unopposed.
    * The trials it stopped are recorded there too (:func:`stopped_by_asha`): a trial's status in
      ``trials.csv`` says "stopped early" only when ASHA stopped it.
    """
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    class ResumableASHA(AsyncHyperBandScheduler):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._state_uri, self._loaded, self._stopped = state_uri, False, set()

        def _load(self) -> None:
            if self._loaded:
                return
            self._loaded = True
            saved = read_asha_state(self._state_uri)
            self._stopped = set(saved["stopped"])
            for bracket, rungs in zip(self._brackets, saved["rungs"]):
                bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]

        def _save(self) -> None:
            fs, path = storage.resolve(self._state_uri)
            state = {"rungs": [[[m, r] for m, r in bracket._rungs] for bracket in self._brackets],
                     "stopped": sorted(self._stopped)}
            storage.write_bytes_atomic(fs, path, json.dumps(state).encode(), self._state_uri)

        def on_trial_add(self, tune_controller, trial):
            self._load()
            super().on_trial_add(tune_controller, trial)

        def stopped_trials(self) -> set[str]:
            self._load()
            return set(self._stopped)

        def on_trial_result(self, tune_controller, trial, result):
            self._load()
            decision = super().on_trial_result(tune_controller, trial, result)
            if result.get(CLOCK, 0) >= int(trial.config.get("epochs", max_epochs)):   # its own last epoch
                decision = TrialScheduler.CONTINUE
            if decision == TrialScheduler.STOP:
                self._stopped.add(trial.trial_id)
            self._save()
            return decision

    return ResumableASHA(time_attr=CLOCK, metric=metric, mode=mode, max_t=max_epochs,
                         grace_period=grace_period, reduction_factor=reduction_factor)


def read_asha_state(state_uri: str) -> dict:
    """``{"rungs": [...], "stopped": [trial ids]}`` saved by :func:`asha` (empty when none; the rungs
    alone, as sweeps before the stopped list saved them, read with no stopped trials)."""
    fs, path = storage.resolve(state_uri)
    if not storage.exists(fs, path, state_uri):
        return {"rungs": [], "stopped": []}
    saved = json.loads(storage.read_bytes(fs, path, state_uri))
    return saved if isinstance(saved, dict) else {"rungs": saved, "stopped": []}


def stopped_by_asha(state_uri: str) -> set[str]:
    """Ids of the trials ASHA stopped early."""
    return set(read_asha_state(state_uri)["stopped"])


def trial_dirname(trial) -> str:
    """Tune's folder of a trial: its id (the default name embeds every parameter)."""
    return trial.trial_id


def trial_lines(metric: str, mode: str, keys: list[str], scheduler=None):
    """The Tune callback that prints one line per finished, stopped or failed trial.

    A trial is "stopped early" only when ``scheduler`` (:func:`asha`, or None) stopped it; one that
    ended on its own ran all of its epochs (its own ``epochs`` where the space or method sets it).
    """
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self):
            self.best: dict[str, tuple[float, int]] = {}
            self.started = 0

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started += 1

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return
            old = self.best.get(trial.trial_id)
            if old is None or (value > old[0] if mode == "max" else value < old[0]):
                self.best[trial.trial_id] = (float(value), int(result.get(CLOCK, 0)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            epochs = int((trial.last_result or {}).get(CLOCK, 0))
            stopped = scheduler is not None and trial.trial_id in scheduler.stopped_trials()
            status = f"stopped early by ASHA after {epochs} epoch(s)" if stopped else f"finished ({epochs} epochs)"
            best = self.best.get(trial.trial_id)
            score = f"best {metric} {best[0]:.4f} (epoch {best[1]})" if best else f"no {metric}"
            say(f"trial {trial.trial_id} {status}: {score}; {describe(trial.config, keys)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            say(f"trial {trial.trial_id} failed; {describe(trial.config, keys)} (reason in trials.csv)")

    return TrialLines()


def describe(params: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={_short(params.get(k))}" for k in keys)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def experiment_uri(sweep_uri: str) -> str:
    return storage.join(sweep_uri, TUNE_DIR)


def has_experiment(sweep_uri: str) -> bool:
    """True when ``<sweep>/tune`` holds a Tune experiment that ``Tuner.restore`` can continue."""
    fs, path = storage.resolve(experiment_uri(sweep_uri))
    if not storage.exists(fs, path, experiment_uri(sweep_uri)):
        return False
    from ray.tune import Tuner

    return Tuner.can_restore(path, storage_filesystem=fs)


def check_resume(sweep_uri: str, resume: bool, has_files: bool) -> bool:
    """Refuse a rerun over results without ``--resume`` and a ``--resume`` with nothing to resume."""
    existing = has_files or has_experiment(sweep_uri)
    if existing and not resume:
        raise ConfigError(f"{sweep_uri} already has results; add --resume to continue it, or choose "
                          "another --name")
    if resume and not existing:
        raise ConfigError(f"--resume: {sweep_uri} has no sweep to resume")
    return existing


def resolve_resume(folder: RunDir, cfg, resume: bool, filename: str):
    """Apply the resume rules to a sweep/comparison folder; returns the config to run.

    Without ``--resume`` a folder with results (its saved config or a Tune experiment) is refused;
    with it, the saved config is used (changed settings are named and ignored).
    """
    import yaml

    fs, path = storage.resolve(folder.uri)
    saved = None
    if storage.exists(fs, f"{path}/{filename}", folder.uri):
        text = storage.read_bytes(fs, f"{path}/{filename}", storage.join(folder.uri, filename))
        saved = config_lib.load_config(type(cfg), base=yaml.safe_load(text))
    check_resume(folder.uri, resume, has_files=saved is not None)
    if saved is None:
        return cfg
    changed = _differences(config_lib.to_dict(cfg), config_lib.to_dict(saved))
    if changed:
        say(f"resuming {folder.uri} with its saved {filename}; ignoring the changed {', '.join(changed)}")
    return saved


def _differences(new: dict, old: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in new.items():
        other = old.get(key)
        if isinstance(value, dict) and isinstance(other, dict) and key not in ("space", "methods"):
            out += _differences(value, other, f"{prefix}{key}.")
        elif value != other:
            out.append(f"{prefix}{key}")
    return out


# Credentials Ray Tune copies from the driver's environment into every trial's runtime_env
# (ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE). A runtime_env is written, whole, into the
# runtime-env agent's log on every node, so the secret would end up in plain text in Ray's logs.
# Trials reach S3 as every other Ray process of the job does: the node's own environment or
# instance role (on the embedded Ray, the workers inherit the driver's environment).
_SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def keep_credentials_out_of_trial_envs() -> None:
    """Stop Ray Tune from putting the AWS credentials into the trials' runtime_env (see above)."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # another Ray layout: tests/test_cluster.py's secret grep would say so
        return
    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(propagated, set):
        propagated.difference_update(_SECRET_ENV_VARS)


def run_tuner(*, sweep_uri: str, base: dict, methods: dict | None, param_space: dict, search_alg,
              scheduler, num_samples: int, concurrent: int, resume: bool, callbacks: list,
              status_interval: float, metric: str, mode: str, keys: list[str]):
    """Fit a new Tune experiment under ``<sweep>/tune``, or restore and continue it; returns the
    ``ResultGrid`` of every trial."""
    import functools

    from ray import tune
    from ray.tune import CLIReporter

    from ray_jobs.runtime.faults import from_environment
    from ray_jobs.runtime.resources import TRIAL_DRIVER_CPUS

    # Tune's classic reporter: one status table at most every `status_interval` seconds, no
    # per-trial result tables (the callbacks print one line per finished trial instead).
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    keep_credentials_out_of_trial_envs()
    trainable = tune.with_resources(
        functools.partial(run_trial, base=base, methods=methods,
                          trials_uri=storage.join(sweep_uri, TRIALS_DIR), faults=from_environment()),
        {"CPU": TRIAL_DRIVER_CPUS})
    fs, path = storage.resolve(sweep_uri)
    storage.ensure_dir(fs, path, sweep_uri)
    if resume:
        tuner = tune.Tuner.restore(f"{path}/{TUNE_DIR}", trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False, storage_filesystem=fs)
    else:
        reporter = CLIReporter(max_report_frequency=int(status_interval), metric_columns=[metric, CLOCK],
                               parameter_columns=keys, metric=metric, mode=mode, sort_by_metric=True,
                               max_progress_rows=20, max_error_rows=5)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=concurrent, trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=path, storage_filesystem=fs,
                                      callbacks=callbacks, progress_reporter=reporter, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)))
    return tuner.fit()


def fit_or_leave_nothing(folder: RunDir, fresh: bool, lines, files: list[str], fit):
    """Run ``fit()``; when a new sweep or comparison fails before its first trial started (the
    searcher refused the space, the cluster cannot place a trial), delete what it wrote in its own
    folder (``files``, Tune's experiment and the trials' folders), so the same command runs again
    instead of asking for ``--resume`` of a sweep that never ran.

    Args:
        folder: the sweep's or comparison's folder.
        fresh: False when resuming (a resumed run keeps everything).
        lines: the :func:`trial_lines` callback passed to the tuner (it counts started trials).
        files: the entries of ``folder`` this job wrote before ``fit`` (its saved config, ASHA state).
    """
    from shards.deletion import OutputTree

    try:
        return fit()
    except BaseException:
        if fresh and lines.started == 0:
            fs, path = storage.resolve(folder.uri)
            OutputTree(fs, path, folder.uri).discard([*files, TUNE_DIR, TRIALS_DIR])
        raise
