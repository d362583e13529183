"""Distributed classifier training on Ray Train (DDP on CPU/gloo or GPU/nccl).

    python -m ray_jobs.train --data runs/data/retina --model adsr_resnet18 --loss cws \
        --epochs 10 --batch-size 32 --image-size 64 --num-workers 2 --storage runs --name r18-cws
    python -m ray_jobs.train --config configs/demo.yaml --set optim.lr=0.05 --loss-params weight=0.5

``train_loop_per_worker(cfg)`` is plain PyTorch plus a few ``ray.train`` calls (dataset shard,
report, checkpoint); the sweep job reuses it. ``fit()`` resolves the run folder, builds the Ray
Data pipelines (``ray_jobs.data``) and fits a ``TorchTrainer``. At the end
``<storage>/<name>/result.json`` holds ``best_checkpoint`` (a URI that evaluate accepts),
``best_metrics`` and ``epochs``.

A rerun with the same ``--storage`` and ``--name`` resumes from the last checkpoint (the job says
so); ``--fresh`` refuses a name that has results, ``--resume`` refuses one that has none. A lost
worker is replaced and training restarts from the last checkpoint (``max_failures``). A non-finite
loss stops the run, naming epoch and step; the last good checkpoint is kept. A damaged shard
stops it at once (no retries: the same row would fail again), naming the shard.

What the jobs share lives next to this file: ``ray_runtime`` (embedded Ray), ``seeding``, ``amp``,
``collectives``, ``checkpoint``, ``run_dir``, ``resources``, ``progress``, ``optim``, ``data``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from medbalance.errors import ConfigError, DataError, TrainingError
from ray_jobs import collectives
from ray_jobs import config as config_lib
from ray_jobs.amp import amp_dtype, grad_scaler
from ray_jobs.checkpoint import report, restore_state
from ray_jobs.cli import add_run_flags, run_main
from ray_jobs.config import DataSection, OptimSection, TrainConfig  # noqa: F401  (the job's config)
from ray_jobs.data import InputSpec, build_dataset, build_datasets, input_spec, normalize  # noqa: F401
from ray_jobs.data_errors import data_error_message
from ray_jobs.optim import build_optimizer, build_scheduler
from ray_jobs.progress import say
from ray_jobs.ray_runtime import LOCAL_RAY_SYSTEM_CONFIG, init_ray, quiet_ray_train  # noqa: F401
from ray_jobs.run_dir import RESULT_FILE, RunDir, checkpoint_uri
from ray_jobs.seeding import seed_everything
from shards import storage


# ----------------------------------------------------------------------------- worker side
def evaluate_shard(model, dataset, batch_size: int, device, autocast_dtype,
                   num_classes: int, spec: InputSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N x C) and labels (N) of this worker's part of a whole split (not gathered).

    ``dataset`` is NOT split by Ray Train (its equal split drops rows); worker ``r`` scores every
    ``world``-th batch starting at ``r``, so every row is scored exactly once over all workers.
    """
    rank, world = collectives.rank_and_world()
    spec = spec or InputSpec()
    model.eval()
    logits = [torch.zeros(0, num_classes)]
    labels = [torch.zeros(0, dtype=torch.long)]
    with torch.no_grad():
        for index, batch in enumerate(dataset.iter_torch_batches(batch_size=batch_size, device=device)):
            if index % world != rank:
                continue
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(normalize(batch["image"], spec.mean, spec.std))
            logits.append(out.float().cpu())
            labels.append(batch["label"].long().cpu())
    return torch.cat(logits), torch.cat(labels)


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


# Shared with the GAN job's workers: stop every worker together (ray_jobs.collectives).
_Stop, _stop_if_any = collectives.Stop, collectives.stop_if_any


def train_loop_per_worker(config: dict) -> dict:
    """One Ray Train worker: DDP training with validation, reports and checkpoints each epoch.

    Args:
        config: ``TrainConfig`` as a dict, plus ``class_names``, ``class_counts``, ``input_spec``
            (``ray_jobs.data.InputSpec`` as a dict) and ``resume_from`` filled in by the driver.

    Returns:
        ``{"status": "ok"|"non_finite"|"data_error", "message": ..., "start_epoch": N}`` (the
        driver reads rank 0's; ``start_epoch`` > 0 when the run resumed from a checkpoint).
    """
    import ray.train
    import ray.train.torch
    from losses import create_loss
    from metrics import compute_metrics
    from models import create_model

    class_names, class_counts = config.pop("class_names"), config.pop("class_counts")
    resume_from = config.pop("resume_from", None)
    spec = InputSpec.from_dict(config.pop("input_spec", None))
    cfg = config_lib.from_dict(TrainConfig, config)
    quiet_ray_train(cfg.log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker or 1)))
    seed_everything(cfg.seed + rank, cfg.reproducible)
    device = ray.train.torch.get_device()
    autocast_dtype = amp_dtype(cfg.amp, device)

    model = create_model(cfg.model, num_classes=len(class_names), in_chans=spec.channels,
                         pretrained=cfg.pretrained_path(), **cfg.model_kwargs)
    if cfg.sync_batchnorm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    criterion = create_loss(cfg.loss, class_counts=class_counts, **cfg.loss_params)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scaler = grad_scaler(device, autocast_dtype)
    # The schedule is a function of the fractional epoch (steps / expected steps per epoch).
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.epochs,
                                math.ceil(sum(class_counts) / world / cfg.data.batch_size))

    start_epoch = 0
    state = restore_state(resume_from, map_location=device)
    if state is not None:
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        if rank == 0:
            say(f"resumed from the checkpoint of epoch {state['epoch']}: continuing at epoch {start_epoch}")

    _maybe_inject_fault(cfg.fault_injection, rank, -1)
    # Where each rank runs (node id, host), for the run's result: a cluster run can show its spread.
    worker_nodes = collectives.gather_objects({"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                               "host": platform.node()})
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    try:
        for epoch in range(start_epoch, cfg.epochs):
            _maybe_inject_fault(cfg.fault_injection, rank, epoch)
            criterion.set_epoch(epoch)
            model.train()
            started, seen, loss_sum, step = time.perf_counter(), 0, 0.0, 0
            # Rows are shuffled in the pipeline (block order + rows within a block, build_dataset);
            # the optional local buffer mixes across blocks, at the cost of its fill time per epoch.
            batches = iter(train_shard.iter_torch_batches(
                batch_size=cfg.data.batch_size, device=device, drop_last=False,
                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                local_shuffle_seed=(cfg.seed + 1000 * epoch + rank) if cfg.reproducible else None))
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 (a damaged shard is told apart below)
                    message = data_error_message(exc, cfg.data.uri)
                    if message is None:
                        raise  # not the data's fault: Ray Train's FailureConfig retries
                    _stop_if_any(collectives.DATA_ERROR, f"epoch {epoch} step {step}: {message}", device)
                images, target = normalize(batch["image"], spec.mean, spec.std), batch["label"].long()
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(images)
                loss = criterion(logits.float(), target)
                if epoch == cfg.fault_injection.get("nan_epoch") and step == 0:
                    loss = loss * float("nan")
                status = collectives.loss_status(loss)
                _stop_if_any(status, (
                    f"non-finite loss ({loss.item()}) at epoch {epoch} step {step} on rank {rank}; "
                    "training stopped, the last good checkpoint is kept. Lower the learning rate, "
                    "add --set optim.clip_grad_norm=1.0, or check the data.") if status else "", device)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.clip_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                seen += len(target)
                loss_sum += loss.item() * len(target)
                step += 1
            train_seconds = time.perf_counter() - started

            # The bare module: DDP's forward is a collective, and workers score different batch counts.
            try:
                logits, labels = evaluate_shard(bare, val_shard, cfg.data.eval_batch_size, device,
                                                autocast_dtype, len(class_names), spec)
                status, message = collectives.OK, ""
            except Exception as exc:  # noqa: BLE001
                message = data_error_message(exc, cfg.data.uri)
                if message is None:
                    raise
                status, message = collectives.DATA_ERROR, f"validation of epoch {epoch}: {message}"
            _stop_if_any(status, message, device)
            logits, labels = collectives.gather(logits), collectives.gather(labels)
            val = compute_metrics(torch.softmax(logits, dim=1).numpy(), labels.numpy(), class_names=class_names)
            seen_total = collectives.gather(torch.tensor([seen, loss_sum], dtype=torch.float64).reshape(1, 2)).sum(0)
            metrics = {"epoch": epoch, "train_loss": float(seen_total[1] / max(seen_total[0], 1)),
                       "train_samples": int(seen_total[0]), "train_seconds": round(train_seconds, 3),
                       "samples_per_s": float(seen_total[0] / max(train_seconds, 1e-9)),
                       "lr": optimizer.param_groups[0]["lr"]}
            metrics.update({f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float)) or v is None})
            metrics = {k: (float("nan") if v is None else v) for k, v in metrics.items()}
            if rank != 0:
                report(metrics)
                continue
            say(f"epoch {epoch + 1}/{cfg.epochs} loss {metrics['train_loss']:.4f} "
                f"val macro-F1 {metrics['val_macro_f1']:.4f} B-ACC {metrics['val_balanced_accuracy']:.4f} "
                f"ECE {metrics['val_ece']:.4f} ({train_seconds:.1f} s, {metrics['samples_per_s']:.0f} img/s)")
            report(metrics, state={
                "model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                "config": config_lib.to_dict(cfg), "class_names": list(class_names),
                "class_counts": list(class_counts), "metrics": metrics, "input": spec.to_dict(),
            }, files={"config.yaml": config_lib.dump_yaml(cfg)})
    except _Stop as stop:
        if rank == 0:
            say(stop.message)
        return {"status": stop.status, "message": stop.message, "start_epoch": start_epoch,
                "worker_nodes": worker_nodes}
    return {"status": "ok", "message": "", "start_epoch": start_epoch, "worker_nodes": worker_nodes}


# ----------------------------------------------------------------------------- driver side
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
    from ray_jobs.resources import plan_cpus

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
    """The ``TorchTrainer`` of one run (its storage is ``cfg.storage``, its name ``cfg.name``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, path = storage.resolve(cfg.storage)
    storage.ensure_dir(fs, path, cfg.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, placement_strategy=cfg.placement_strategy,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=path, storage_filesystem=fs, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=cfg.checkpoint_metric,
                checkpoint_score_order=cfg.checkpoint_mode),
            logging_config=ray.train.LoggingConfig(log_level=cfg.log_level)),
        datasets=datasets,
        # Only train is split; validation is scored whole (see evaluate_shard).
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


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


def raise_for_status(summary: dict) -> None:
    """Turn a run that stopped on its own (bad loss, damaged data) into the project's error."""
    if summary["status"] == "non_finite":
        raise TrainingError(f"{summary['message']} Last good checkpoint: {summary['last_checkpoint']}")
    if summary["status"] == "data_error":
        raise DataError(summary["message"])


def fit(cfg: TrainConfig, resume: str = "auto", callbacks: list | None = None) -> dict:
    """Train ``cfg`` on the connected Ray cluster; write and return ``result.json``'s content.

    Args:
        resume: ``auto`` (resume if the run has results), ``resume`` (must have), ``fresh``
            (must not have).
        callbacks: Ray Train ``UserCallback``s for the run's ``RunConfig`` (a sweep's trials pass
            Tune's ``TuneReportCallback``).
    """
    manifest, loop_config, datasets = prepare_run(cfg, resume)
    started = time.perf_counter()
    result = make_trainer(cfg, loop_config, datasets, callbacks=callbacks).fit()
    summary = summarize(cfg, result, manifest, time.perf_counter() - started)
    run = run_dir(cfg)
    run.write_bytes("config.yaml", config_lib.dump_yaml(cfg).encode())
    run.write_json(RESULT_FILE, summary)
    raise_for_status(summary)
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML preset (configs/*.yaml); flags below override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. optim.lr=0.05 (repeatable)")
    p.add_argument("--data", help="dataset URI (data.uri)")
    p.add_argument("--model")
    p.add_argument("--loss")
    p.add_argument("--loss-params", nargs="*", default=[], metavar="K=V", help="loss hyperparameters")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per worker (data.batch_size)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--num-workers", type=int)
    add_run_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {"data.uri": ("data", args.data), "model": ("model", args.model), "loss": ("loss", args.loss),
             "epochs": ("epochs", args.epochs), "data.batch_size": ("batch-size", args.batch_size),
             "data.image_size": ("image-size", args.image_size), "num_workers": ("num-workers", args.num_workers),
             "storage": ("storage", args.storage), "name": ("name", args.name),
             "use_gpu": ("gpu", True if args.gpu else None)}
    overrides: list = [(f"{k}={v}", f"--{flag} {v}") for k, (flag, v) in flags.items() if v is not None]
    overrides += [(f"loss_params.{kv}", f"--loss-params {kv}") for kv in args.loss_params]
    return config_lib.load_config(TrainConfig, args.config, overrides + args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = config_from_args(args)
    summary = fit(cfg, resume="resume" if args.resume else "fresh" if args.fresh else "auto")
    print(json.dumps({k: summary[k] for k in ("best_checkpoint", "epochs", "best_metrics")}, indent=2, default=float))
    print(f"result: {storage.join(run_dir(cfg).uri, RESULT_FILE)}")
    return 0


if __name__ == "__main__":
    # Run from the importable module so Ray pickles train_loop_per_worker by reference.
    from ray_jobs import train as _module
    sys.exit(run_main(_module.main))
