"""The classifier's Ray Train worker: ``train_loop_per_worker(config)``, plain PyTorch DDP plus a
few ``ray.train`` calls (its dataset shard, reports, checkpoints). ``ray_jobs.classifier.driver``
starts it on every worker; the sweeps' trials run it through the driver.

A non-finite loss stops the run, naming epoch and step; the last good checkpoint is kept. A damaged
shard stops it at once (no retries: the same row would fail again), naming the shard.
"""
from __future__ import annotations

import math
import os
import platform
import time

import torch

from ray_jobs.classifier.config import TrainConfig
from ray_jobs.classifier.optim import build_optimizer, build_scheduler
from ray_jobs.classifier.pipeline import InputSpec, normalize
from ray_jobs.runtime import collectives
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.amp import amp_dtype, grad_scaler
from ray_jobs.runtime.checkpoint import report, restore_state
from ray_jobs.runtime.data_errors import data_error_message
from ray_jobs.runtime.progress import say
from ray_jobs.runtime.ray_setup import quiet_ray_train
from ray_jobs.runtime.seeding import seed_everything


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


# Shared with the GAN job's workers: stop every worker together (ray_jobs.runtime.collectives).
_Stop, _stop_if_any = collectives.Stop, collectives.stop_if_any


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
