"""The classifier's Ray Train worker: ``train_loop_per_worker(config)``, plain PyTorch DDP plus a
few ``ray.train`` calls (its dataset shard, reports, checkpoints). ``ray_jobs.classifier.driver``
starts it on every worker; the sweeps' trials run it through the driver.

Each epoch is ``train_one_epoch`` then ``validate`` (``ray_jobs/classifier/step.py``, over the
``ClassifierStep`` that the benchmark and the DDP test run too), then one report: the metrics
from every worker, a checkpoint from rank 0.

A non-finite loss stops the run, naming epoch and step; the last good checkpoint is kept. A damaged
shard stops it at once (no retries: the same row would fail again), naming the shard.
"""
from __future__ import annotations

import os
import platform

import torch

from ray_jobs.classifier.config import TrainConfig
from ray_jobs.classifier.pipeline import InputSpec
from ray_jobs.classifier.step import ClassifierStep, build_step, train_one_epoch, validate
from ray_jobs.runtime import collectives
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.checkpoint import report, restore_state
from ray_jobs.runtime.history import RunHistory
from ray_jobs.runtime.progress import say
from ray_jobs.runtime.ray_setup import quiet_ray_train
from ray_jobs.runtime.seeding import seed_everything
from shards import storage


def _maybe_inject_fault(hooks: dict, rank: int, epoch: int) -> None:
    """Test hook: kill this worker's process once (``marker`` records that it happened)."""
    if "start_log" in hooks and epoch == -1:  # every start of a worker's loop, one line each
        with open(hooks["start_log"], "a") as f:
            f.write(f"{rank}\n")
        return
    if "marker" not in hooks or rank != hooks.get("kill_rank", 1) or epoch != hooks.get("kill_epoch", 1):
        return
    marker = hooks["marker"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def _resume(step: ClassifierStep, resume_from: str | None, rank: int) -> int:
    """Load the newest checkpoint into ``step`` (``restore_state``); the epoch to start at."""
    state = restore_state(resume_from, map_location=step.device)
    if state is None:
        return 0
    step.load_state_dict(state)
    start_epoch = state["epoch"] + 1
    if rank == 0:
        say(f"resumed from the checkpoint of epoch {state['epoch']}: continuing at epoch {start_epoch}")
    return start_epoch


def epoch_metrics(epoch: int, train: dict, val: dict, lr: float) -> dict:
    """One epoch's report: the train totals summed over all workers (this worker's seconds), the
    ``val_*`` numbers of ``validate`` (None as NaN) and the lr."""
    seen, loss_sum = collectives.gather(
        torch.tensor([train["samples"], train["loss_sum"]], dtype=torch.float64).reshape(1, 2)).sum(0)
    seconds = train["seconds"]
    metrics = {"epoch": epoch, "train_loss": float(loss_sum / max(seen, 1)),
               "train_samples": int(seen), "train_seconds": round(seconds, 3),
               "samples_per_s": float(seen / max(seconds, 1e-9)), "lr": lr}
    metrics.update({f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float)) or v is None})
    return {k: (float("nan") if v is None else v) for k, v in metrics.items()}


def _report_epoch(step: ClassifierStep, cfg: TrainConfig, metrics: dict, seconds: float, extra: dict,
                  history: RunHistory | None) -> None:
    """Every worker reports ``metrics``; rank 0 says them, writes the checkpoint (``extra``: class
    names and counts, the input spec) and adds the epoch to the run's ``history``."""
    if step.rank != 0:
        report(metrics)
        return
    say(f"epoch {metrics['epoch'] + 1}/{cfg.epochs} loss {metrics['train_loss']:.4f} "
        f"val macro-F1 {metrics['val_macro_f1']:.4f} B-ACC {metrics['val_balanced_accuracy']:.4f} "
        f"ECE {metrics['val_ece']:.4f} ({seconds:.1f} s, {metrics['samples_per_s']:.0f} img/s)")
    report(metrics, state={
        **step.state_dict(), "epoch": metrics["epoch"], "config": config_lib.to_dict(cfg),
        "class_names": extra["class_names"], "class_counts": extra["class_counts"],
        "metrics": metrics, "input": extra["input"],
    }, files={"config.yaml": config_lib.dump_yaml(cfg)})
    history.append(metrics)


def train_loop_per_worker(config: dict) -> dict:
    """One Ray Train worker: DDP training with validation, reports and checkpoints each epoch.

    Args:
        config: ``TrainConfig`` as a dict, plus ``class_names``, ``class_counts``, ``input_spec``
            (``ray_jobs.classifier.pipeline.InputSpec`` as a dict) and ``resume_from`` filled in by the driver.

    Returns:
        ``{"status": "ok"|"non_finite"|"data_error", "message": ..., "start_epoch": N}`` (the
        driver reads rank 0's; ``start_epoch`` > 0 when the run resumed from a checkpoint).
    """
    import ray.train
    import ray.train.torch

    class_names, class_counts = config.pop("class_names"), config.pop("class_counts")
    resume_from = config.pop("resume_from", None)
    hooks = config.pop("faults", {})   # test-only (runtime.faults); never part of the config
    spec = InputSpec.from_dict(config.pop("input_spec", None))
    cfg = config_lib.from_dict(TrainConfig, config)
    quiet_ray_train(cfg.log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker or 1)))
    seed_everything(cfg.seed + rank, cfg.reproducible)
    step = build_step(cfg, len(class_names), class_counts, spec, ray.train.torch.get_device(),
                      rank=rank, world=world, wrap=ray.train.torch.prepare_model)
    start_epoch = _resume(step, resume_from, rank)
    history = RunHistory(storage.join(cfg.storage, cfg.name), "epoch") if rank == 0 else None

    _maybe_inject_fault(hooks, rank, -1)
    # Where each rank runs (node id, host), for the run's result: a cluster run can show its spread.
    worker_nodes = collectives.gather_objects({"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                               "host": platform.node()})
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    extra = {"class_names": list(class_names), "class_counts": list(class_counts), "input": spec.to_dict()}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            _maybe_inject_fault(hooks, rank, epoch)
            train = train_one_epoch(step, train_shard, cfg, epoch, hooks.get("nan_epoch"))
            val = validate(step, val_shard, cfg, epoch, class_names)
            metrics = epoch_metrics(epoch, train, val, step.optimizer.param_groups[0]["lr"])
            _report_epoch(step, cfg, metrics, train["seconds"], extra, history)
    except collectives.Stop as stop:
        if rank == 0:
            say(stop.message)
        return {"status": stop.status, "message": stop.message, "start_epoch": start_epoch,
                "worker_nodes": worker_nodes}
    return {"status": "ok", "message": "", "start_epoch": start_epoch, "worker_nodes": worker_nodes}
