"""The classifier's training run on Ray Train (DDP on CPU/gloo or GPU/nccl): ``fit(cfg)``.

``fit()`` resolves the run folder, builds the Ray Data pipelines (``ray_jobs.classifier.pipeline``)
and fits a ``TorchTrainer`` whose workers run ``ray_jobs.classifier.worker.train_loop_per_worker``.
At the end ``<storage>/<name>/result.json`` holds ``best_checkpoint`` (a URI that evaluate accepts),
``best_metrics`` and ``epochs``. The job ``python -m ray_jobs.train`` and the sweeps' trials call it.

A rerun with the same ``--storage`` and ``--name`` resumes from the last checkpoint (the job says
so); ``--fresh`` refuses a name that has results, ``--resume`` refuses one that has none. A lost
worker is replaced and training restarts from the last checkpoint (``max_failures``).
"""
from __future__ import annotations

import os
import time


from medbalance.errors import ConfigError, DataError
from ray_jobs.classifier.config import TrainConfig
from ray_jobs.classifier.pipeline import build_datasets, input_spec
from ray_jobs.classifier.worker import train_loop_per_worker
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.data_errors import data_error_message
from ray_jobs.runtime.faults import for_run
from ray_jobs.runtime.progress import say
from ray_jobs.runtime.ray_setup import init_ray
from ray_jobs.runtime.run_dir import RESULT_FILE, RunDir, checkpoint_uri
from ray_jobs.runtime.training_run import RunSpec, raise_for_status, torch_trainer
from shards import storage


def run_dir(cfg: TrainConfig) -> RunDir:
    return RunDir(cfg.storage, cfg.name)


def prepare_run(cfg: TrainConfig, resume: str = "auto"):
    """What a training run needs before its workers start, for ``fit`` and the sweep's trials.

    Checks the dataset (every shard there, with its size) and the run folder (``resume``:
    ``auto``, ``resume`` or ``fresh``), then connects to Ray (``init_ray``), plans the CPUs per
    worker and builds the train/val pipelines.

    Returns:
        ``(manifest, loop_config, datasets)``: the loop's config dict for ``train_loop_per_worker``.
    """
    from shards import check_shards

    if not cfg.data.uri:
        raise ConfigError("no dataset: pass --data URI (a dataset made by ray_jobs.prepare)")
    storage.check_folder(cfg.storage, "--storage")
    manifest = check_shards(cfg.data.uri, splits=["train", "val"])
    if "val" not in manifest.splits():
        raise ConfigError(f"{cfg.data.uri} has no val split; re-run prepare with --val > 0")
    spec = input_spec(cfg, manifest)
    weights = cfg.pretrained_path()
    if weights and not os.path.isfile(weights):
        raise ConfigError(f"pretrained = {weights!r}: no such file (on this machine; on a cluster every "
                          "node needs it at that path); give a torchvision state dict saved with "
                          "torch.save(model.state_dict(), PATH), or pretrained=scratch")
    run = run_dir(cfg)
    existing = run.check_resume(resume)
    if existing:
        say(f"{run.uri} has results: resuming from its last checkpoint (use another --name to start over)")
    from ray_jobs.runtime.resources import plan_cpus

    init_ray()  # only now: every check above runs in seconds, before Ray starts

    cfg.cpus_per_worker = plan_cpus(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker)
    loop_config = config_lib.to_dict(cfg)
    # Synthetic rows (a dataset version made by ray_jobs.gan synthesize) count when they are trained on.
    loop_config.update(class_names=manifest.class_names,
                       class_counts=manifest.class_counts("train", include_synthetic=cfg.data.include_synthetic),
                       input_spec=spec.to_dict(), resume_from=run.latest_checkpoint() if existing else None)
    failure = None
    try:
        datasets = build_datasets(cfg, manifest, spec)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 (reading the shards into the object store failed)
        failure = data_error_message(exc, cfg.data.uri)
        if failure is None:
            raise
    if failure:  # outside the except block, so the failed Ray Data executor is freed now
        raise DataError(failure)
    return manifest, loop_config, datasets


def make_trainer(cfg: TrainConfig, loop_config: dict, datasets: dict, callbacks: list | None = None):
    """The ``TorchTrainer`` of one run (``runtime.training_run``: its storage is ``cfg.storage``,
    its name ``cfg.name``; checkpoints ranked by ``cfg.checkpoint_metric``). Only train is split
    between the workers; validation is scored whole (see ``step.evaluate_shard``)."""
    spec = RunSpec(name=cfg.name, storage=cfg.storage, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                   cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures,
                   keep_checkpoints=cfg.keep_checkpoints, log_level=cfg.log_level,
                   placement_strategy=cfg.placement_strategy, score=(cfg.checkpoint_metric, cfg.checkpoint_mode))
    return torch_trainer(train_loop_per_worker, loop_config, spec, datasets=datasets, split=["train"],
                         callbacks=callbacks)


def summarize(cfg: TrainConfig, result, manifest, seconds: float) -> dict:
    """``result.json``'s content from a Ray Train ``Result``."""
    outcome = result.return_value or {}
    best = result.get_best_checkpoint(cfg.checkpoint_metric, cfg.checkpoint_mode) if result.checkpoint else None
    best_metrics = next((m for c, m in result.best_checkpoints if best and c.path == best.path), {})
    return {
        "name": cfg.name, "status": outcome.get("status", "ok"), "message": outcome.get("message", ""),
        "best_checkpoint": checkpoint_uri(cfg.storage, best) if best else None,
        "best_metrics": best_metrics,
        "last_checkpoint": checkpoint_uri(cfg.storage, result.checkpoint) if result.checkpoint else None,
        "epochs": int(result.metrics["epoch"]) + 1 if result.metrics else 0,
        "epochs_requested": cfg.epochs,
        "started_at_epoch": outcome.get("start_epoch", 0),
        "worker_nodes": outcome.get("worker_nodes", []),
        "checkpoint_metric": cfg.checkpoint_metric,
        "seconds": round(seconds, 1),
        "class_names": manifest.class_names, "data": cfg.data.uri,
    }


def fit(cfg: TrainConfig, resume: str = "auto", callbacks: list | None = None, faults: dict | None = None) -> dict:
    """Train ``cfg`` on the connected Ray cluster; write and return ``result.json``'s content.

    Args:
        resume: ``auto`` (resume if the run has results), ``resume`` (must have), ``fresh``
            (must not have).
        callbacks: Ray Train ``UserCallback``s for the run's ``RunConfig`` (a sweep's trials pass
            Tune's ``TuneReportCallback``).
        faults: test-only hooks for the workers (``runtime.faults``; None: ``MEDBALANCE_TEST_FAULTS``).
    """
    manifest, loop_config, datasets = prepare_run(cfg, resume)
    loop_config["faults"] = for_run(faults, config_lib.to_dict(cfg))
    started = time.perf_counter()
    result = make_trainer(cfg, loop_config, datasets, callbacks=callbacks).fit()
    summary = summarize(cfg, result, manifest, time.perf_counter() - started)
    run = run_dir(cfg)
    run.write_bytes("config.yaml", config_lib.dump_yaml(cfg).encode())
    run.write_json(RESULT_FILE, summary)
    raise_for_status(summary["status"], summary["message"], summary["last_checkpoint"])
    return summary
