"""Distributed classifier training on Ray Train (DDP on CPU/gloo or GPU/nccl).

    python -m ray_jobs.train --data runs/data/retina --model adsr_resnet18 --loss cws \
        --epochs 10 --batch-size 32 --image-size 64 --num-workers 2 --storage runs --name r18-cws
    python -m ray_jobs.train --config configs/demo.yaml --set optim.lr=0.05 --loss-params weight=0.5

``train_loop_per_worker(cfg)`` is plain PyTorch plus a few ``ray.train`` calls (dataset shard,
report, checkpoint); the sweep job reuses it. ``main()`` resolves the config, builds the Ray Data
pipelines (ray_jobs.data) and fits a ``TorchTrainer``. At the end ``<storage>/<name>/result.json``
holds ``best_checkpoint`` (a URI that evaluate accepts), ``best_metrics`` and ``epochs``.

A rerun with the same ``--storage`` and ``--name`` resumes from the last checkpoint (Ray Train
restores the run; the job says so); ``--fresh`` refuses a name that has results, ``--resume``
refuses one that has none. A lost worker is replaced and training restarts from the last
checkpoint (``max_failures``). A non-finite loss stops the run, naming epoch and step; the last good
checkpoint is kept.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from medbalance.errors import ConfigError, TrainingError
from ray_jobs import config as config_lib
from ray_jobs.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from ray_jobs.cli import run_main
from ray_jobs.data import normalize
from shards import storage

RESULT_FILE = "result.json"


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass
class DataSection:
    uri: str = ""                    # dataset URI (ray_jobs.prepare output)
    image_size: int = 224
    augment: str = "adsr"            # adsr | lrf | light | none
    sampling: str = "none"           # none | class_balanced | sqrt
    include_synthetic: bool = True   # rows written by the GAN job
    batch_size: int = 32             # per worker
    block_rows: int = 64             # rows per Ray Data block before decoding (0: one per shard)
    cache_encoded: bool = True       # read each split's encoded rows once into the object store
    shuffle_buffer: int = 0          # rows in each worker's extra local shuffle buffer (0: none)
    eval_batch_size: int = 64


@dataclasses.dataclass
class OptimSection:
    name: str = "sgd"                # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"         # cosine | step | multistep | none
    warmup_epochs: float = 0.0
    step_size: int = 20              # step: epochs between decays
    gamma: float = 0.5               # step / multistep decay
    milestones: list = dataclasses.field(default_factory=lambda: [30, 60])
    clip_grad_norm: float | None = None


@dataclasses.dataclass
class TrainConfig:
    name: str = "run"
    storage: str = "runs"            # local path or s3://bucket/prefix
    model: str = "adsr_resnet18"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    pretrained: str | None = None    # local torchvision ResNet state dict
    loss: str = "cws"
    loss_params: dict = dataclasses.field(default_factory=dict)
    epochs: int = 10
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None   # None: derived from the cluster (ray_jobs.data.plan_cpus)
    amp: str = "auto"                # auto (GPU: bf16 if supported else fp16; CPU: off) | bf16 | fp16 | off
    sync_batchnorm: bool = False
    channels_last: bool = False
    seed: int = 0
    reproducible: bool = False       # deterministic algorithms + seeded re-sampling
    max_failures: int = 2
    keep_checkpoints: int = 2
    checkpoint_metric: str = "val_macro_f1"
    checkpoint_mode: str = "max"
    log_level: str = "WARNING"       # Ray Train's log level (INFO: every report and checkpoint)
    # Test hooks: {"kill_rank": 1, "kill_epoch": 1, "marker": PATH} kills that worker once;
    # {"nan_epoch": E} makes the loss NaN at epoch E, step 0.
    fault_injection: dict = dataclasses.field(default_factory=dict)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)


# ----------------------------------------------------------------------------- worker side
def build_optimizer(params, cfg: OptimSection) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.name!r}; use sgd, adam or adamw")


def lr_factor(epoch_float: float, cfg: OptimSection, epochs: int) -> float:
    """Multiplier of the base lr at a (fractional) epoch: linear warm-up, then the schedule."""
    if cfg.warmup_epochs > 0 and epoch_float < cfg.warmup_epochs:
        return max(epoch_float / cfg.warmup_epochs, 1e-3)
    if cfg.schedule == "cosine":
        span = max(epochs - cfg.warmup_epochs, 1e-8)
        return 0.5 * (1 + math.cos(math.pi * min((epoch_float - cfg.warmup_epochs) / span, 1.0)))
    if cfg.schedule == "step":
        return cfg.gamma ** int(epoch_float // cfg.step_size)
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(epoch_float >= m for m in cfg.milestones)
    if cfg.schedule == "none":
        return 1.0
    raise ConfigError(f"unknown schedule {cfg.schedule!r}; use cosine, step, multistep or none")


def seed_everything(seed: int, reproducible: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if reproducible:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if mode in ("fp16", "auto"):
        if device.type != "cuda":
            raise ConfigError("amp=fp16 needs a GPU; use bf16 or off on CPU")
        return torch.float16
    raise ConfigError(f"unknown amp mode {mode!r}; use auto, bf16, fp16 or off")


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-worker tensor (first dim may differ) over all workers, on CPU."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor.cpu()
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def all_agree_finite(loss: torch.Tensor) -> bool:
    """True if the loss is finite on every worker (one tiny all-reduce)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    return bad.item() == 0


def evaluate_shard(model, dataset, batch_size: int, device, autocast_dtype,
                   num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N x C) and labels (N) of a whole split, gathered from all workers.

    ``dataset`` is NOT split by Ray Train (its equal split drops rows); worker ``r`` scores every
    ``world``-th batch starting at ``r``, so every row is scored exactly once.
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    model.eval()
    logits = [torch.zeros(0, num_classes)]
    labels = [torch.zeros(0, dtype=torch.long)]
    with torch.no_grad():
        for index, batch in enumerate(dataset.iter_torch_batches(batch_size=batch_size, device=device)):
            if index % world != rank:
                continue
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(normalize(batch["image"]))
            logits.append(out.float().cpu())
            labels.append(batch["label"].long().cpu())
    return gather(torch.cat(logits)), gather(torch.cat(labels))


def _maybe_inject_fault(hooks: dict, rank: int, epoch: int) -> None:
    """Test hook: kill this worker's process once (``marker`` records that it happened)."""
    if "marker" not in hooks or rank != hooks.get("kill_rank", 1) or epoch != hooks.get("kill_epoch", 1):
        return
    marker = hooks["marker"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def say(message: str) -> None:
    """One progress line on the worker's stdout (Ray forwards it to the driver).

    Ray Train patches ``print`` in its workers into its logger, whose handlers show each line
    twice on the driver; writing to stdout directly shows it once.
    """
    sys.stdout.write(f"[medbalance] {message}\n")
    sys.stdout.flush()


def quiet_ray_train(level: str) -> None:
    """Apply ``level`` to Ray Train's per-report log line ("Reporting training result ..."),
    which ``LoggingConfig`` does not reach (its logger is not under ``ray.train``)."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(level)
    except (ImportError, AttributeError):  # another Ray version: keep its default
        pass


def train_loop_per_worker(config: dict) -> dict:
    """One Ray Train worker: DDP training with validation, reports and checkpoints each epoch.

    Args:
        config: ``TrainConfig`` as a dict, plus ``class_names``, ``class_counts`` and
            ``cpus_per_worker`` filled in by the driver.

    Returns:
        ``{"status": "ok"|"non_finite", "message": ..., "start_epoch": N}`` (the driver reads it;
        ``start_epoch`` > 0 when the run resumed from a checkpoint).
    """
    import ray.train
    import ray.train.torch
    from losses import create_loss
    from metrics import compute_metrics
    from models import create_model

    class_names, class_counts = config.pop("class_names"), config.pop("class_counts")
    resume_from = config.pop("resume_from", None)
    cfg = config_lib.from_dict(TrainConfig, config)
    quiet_ray_train(cfg.log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker or 1)))
    seed_everything(cfg.seed + rank, cfg.reproducible)
    device = ray.train.torch.get_device()
    autocast_dtype = amp_dtype(cfg.amp, device)

    model = create_model(cfg.model, num_classes=len(class_names), pretrained=cfg.pretrained, **cfg.model_kwargs)
    if cfg.sync_batchnorm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    criterion = create_loss(cfg.loss, class_counts=class_counts, **cfg.loss_params)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    # The schedule is a function of the fractional epoch (steps / expected steps per epoch).
    steps_per_epoch = max(1, math.ceil(sum(class_counts) / world / cfg.data.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step / steps_per_epoch, cfg.optim, cfg.epochs))

    start_epoch, state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # Ray's own: after a worker failure, or a run it restored
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(os.path.join(ckpt_dir, CHECKPOINT_FILE), map_location=device, weights_only=True)
    elif resume_from:  # the newest checkpoint of an interrupted earlier run
        state = load_checkpoint(resume_from, map_location=device)
    if state is not None:
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        if rank == 0:
            say(f"resumed from the checkpoint of epoch {state['epoch']}: "
                f"continuing at epoch {start_epoch}")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.epochs):
        _maybe_inject_fault(cfg.fault_injection, rank, epoch)
        criterion.set_epoch(epoch)
        model.train()
        started, seen, loss_sum, step = time.perf_counter(), 0, 0.0, 0
        # Rows are shuffled in the pipeline (block order + rows within a block, build_dataset);
        # the optional local buffer mixes across blocks, at the cost of its fill time per epoch.
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.data.batch_size, device=device, drop_last=False,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed + 1000 * epoch + rank) if cfg.reproducible else None)
        for step, batch in enumerate(batches):
            images, target = normalize(batch["image"]), batch["label"].long()
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(images)
            loss = criterion(logits.float(), target)
            if epoch == cfg.fault_injection.get("nan_epoch") and step == 0:
                loss = loss * float("nan")
            if not all_agree_finite(loss):
                message = (f"non-finite loss ({loss.item()}) at epoch {epoch} step {step} on rank {rank}; "
                           "training stopped, the last good checkpoint is kept. Lower the learning rate, "
                           "add --set optim.clip_grad_norm=1.0, or check the data.")
                if rank == 0:
                    say(message)
                return {"status": "non_finite", "message": message, "start_epoch": start_epoch}
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
        train_seconds = time.perf_counter() - started

        # The bare module: DDP's forward is a collective, and workers score different batch counts.
        logits, labels = evaluate_shard(bare, val_shard, cfg.data.eval_batch_size, device, autocast_dtype,
                                        len(class_names))
        probs = torch.softmax(logits, dim=1).numpy()
        val = compute_metrics(probs, labels.numpy(), class_names=class_names)
        seen_total = gather(torch.tensor([seen, loss_sum], dtype=torch.float64).reshape(1, 2)).sum(0)
        metrics = {"epoch": epoch, "train_loss": float(seen_total[1] / max(seen_total[0], 1)),
                   "train_samples": int(seen_total[0]), "train_seconds": round(train_seconds, 3),
                   "samples_per_s": float(seen_total[0] / max(train_seconds, 1e-9)),
                   "lr": optimizer.param_groups[0]["lr"]}
        metrics.update({f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float)) or v is None})
        metrics = {k: (float("nan") if v is None else v) for k, v in metrics.items()}
        if rank == 0:
            say(f"epoch {epoch + 1}/{cfg.epochs} loss {metrics['train_loss']:.4f} "
                f"val macro-F1 {metrics['val_macro_f1']:.4f} B-ACC {metrics['val_balanced_accuracy']:.4f} "
                f"ECE {metrics['val_ece']:.4f} ({train_seconds:.1f} s, {metrics['samples_per_s']:.0f} img/s)")
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint({
                    "model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "config": config_lib.to_dict(cfg), "class_names": list(class_names),
                    "class_counts": list(class_counts), "metrics": metrics,
                }, tmp)
                with open(os.path.join(tmp, "config.yaml"), "w") as f:
                    f.write(config_lib.dump_yaml(cfg))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
    return {"status": "ok", "message": "", "start_epoch": start_epoch}


# ----------------------------------------------------------------------------- driver side
def run_dir_uri(cfg: TrainConfig) -> str:
    return storage.join(cfg.storage, cfg.name)


def has_results(cfg: TrainConfig) -> bool:
    fs, path = storage.resolve(run_dir_uri(cfg))
    if not storage.exists(fs, path, run_dir_uri(cfg)):
        return False
    import pyarrow.fs as pafs
    return any(True for _ in fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def latest_checkpoint(cfg: TrainConfig):
    """The newest complete checkpoint of the run (``checkpoint_<timestamp>`` names sort by time).

    Ray Train restores a run on its own only when the earlier driver ended cleanly; after a killed
    driver it would start over, so the job hands this checkpoint's URI to the training loop, which
    loads it when Ray gives it none (Train V2 deprecates ``resume_from_checkpoint``).
    """
    import pyarrow.fs as pafs

    from ray_jobs.checkpoint import CHECKPOINT_FILE

    fs, path = storage.resolve(run_dir_uri(cfg))
    if not storage.exists(fs, path, run_dir_uri(cfg)):
        return None
    dirs = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    for directory in reversed(dirs):
        if storage.exists(fs, f"{directory}/{CHECKPOINT_FILE}"):
            return storage.join(run_dir_uri(cfg), directory.rsplit("/", 1)[1])
    return None


# Ray's worker pool ends a task worker that has been idle for 1 s once there are more workers than
# CPUs. Between two epochs the data tasks' workers sit idle while the step trains, so each epoch
# would start new processes that import torch and torchvision again (seconds each, on the CPUs the
# pipeline needs). The embedded Ray keeps idle workers for a minute; on a cluster, pass the same
# with `ray start --system-config '{"idle_worker_killing_time_threshold_ms": 60000}'`.
LOCAL_RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (``ray job submit`` sets it) or start a local one."""
    import logging

    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray Data logs every execution plan at INFO, in every process that runs one.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        passed = ("RAY_USAGE_STATS_ENABLED", "RAY_DATA_LOG_LEVEL")
        ray.init(address=address, log_to_driver=True,
                 _system_config=None if address else LOCAL_RAY_SYSTEM_CONFIG,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k.startswith("AWS_") or k in passed}})


def build_dataset(cfg: TrainConfig, manifest, split: str):
    """One split's Ray Data pipeline: ``train`` shuffled, re-sampled and augmented; others resized.

    A shard is one Parquet file, which Ray Data reads as one block; decoding a whole shard in one
    task would use one CPU and hold every batch back until the shard is done. So the encoded rows
    are re-blocked first (a streaming repartition, ``data.block_rows`` rows per block): the decode
    map then runs on every CPU left to Ray Data, and batches reach the workers while the epoch
    is still being decoded.

    ``data.cache_encoded`` (default): the encoded blocks are read once, here, into Ray's object
    store, so an epoch does not pay Ray Data's per-read start-up (listing files, reading footers)
    again; each epoch shuffles the train blocks' order (``randomize_block_order``). Turn it off
    for splits larger than the object store: shards are then streamed from storage every epoch,
    train files in a shuffled order. Either way the map permutes the rows of each train block,
    and ingest wrote every split in a seeded random order.
    """
    from ray.data import FileShuffleConfig

    from ray_jobs.data import preprocess_batch, sampling_rates
    from shards import ray_dataset

    train = split == "train"
    seed = cfg.seed if cfg.reproducible else None
    if train:
        stream_shuffle = None if cfg.data.cache_encoded else FileShuffleConfig(seed=seed)
        ds = ray_dataset(cfg.data.uri, split, include_synthetic=cfg.data.include_synthetic,
                         columns=["image", "label", "source", "synthetic"], shuffle=stream_shuffle)
        extra = dict(rates=sampling_rates(manifest.class_counts(split), cfg.data.sampling),
                     seed=seed, shuffle=True)
    else:
        ds = ray_dataset(cfg.data.uri, split, columns=["image", "label", "source"])
        extra = {}
    if cfg.data.block_rows:
        ds = ds.repartition(target_num_rows_per_block=cfg.data.block_rows)
    if cfg.data.cache_encoded:
        ds = ds.materialize()
        if train:
            ds = ds.randomize_block_order(seed=seed)
    # One call per block (batch_size=None), so the row permutation spans the block.
    return ds.map_batches(preprocess_batch, batch_size=None if cfg.data.block_rows else 64,
                          fn_kwargs=dict(image_size=cfg.data.image_size, augment=cfg.data.augment,
                                         train=train, **extra))


def build_datasets(cfg: TrainConfig, manifest) -> dict:
    """The pipelines a training run reads: ``{"train": ..., "val": ...}`` (see build_dataset)."""
    return {split: build_dataset(cfg, manifest, split) for split in ("train", "val")}


def checkpoint_uri(cfg: TrainConfig, checkpoint) -> str:
    """A Ray checkpoint -> a URI that ``evaluate``/``predict`` accept."""
    return f"s3://{checkpoint.path}" if storage.is_remote(cfg.storage) and "://" not in checkpoint.path else checkpoint.path


def fit(cfg: TrainConfig, resume: str = "auto") -> dict:
    """Train ``cfg`` on the connected Ray cluster; write and return ``result.json``'s content.

    Args:
        resume: ``auto`` (resume if the run has results), ``resume`` (must have), ``fresh``
            (must not have).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from ray_jobs.data import plan_cpus
    from shards import read_manifest

    if not cfg.data.uri:
        raise ConfigError("no dataset: pass --data URI (a dataset made by ray_jobs.prepare)")
    manifest = read_manifest(cfg.data.uri)
    if "val" not in manifest.splits():
        raise ConfigError(f"{cfg.data.uri} has no val split; re-run prepare with --val > 0")
    existing = has_results(cfg)
    if resume == "fresh" and existing:
        raise ConfigError(f"{run_dir_uri(cfg)} already has results; choose another --name, or drop "
                          "--fresh to resume it")
    if resume == "resume" and not existing:
        raise ConfigError(f"--resume: {run_dir_uri(cfg)} has no results to resume")
    if existing:
        print(f"[medbalance] {run_dir_uri(cfg)} has results: resuming from its last checkpoint "
              "(use another --name to start over)", flush=True)
    cfg.cpus_per_worker = plan_cpus(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker)
    loop_config = config_lib.to_dict(cfg)
    loop_config.update(class_names=manifest.class_names, class_counts=manifest.class_counts("train"),
                       resume_from=latest_checkpoint(cfg) if existing else None)

    fs, path = storage.resolve(cfg.storage)
    storage.ensure_dir(fs, path, cfg.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=cfg.checkpoint_metric,
                checkpoint_score_order=cfg.checkpoint_mode),
            logging_config=ray.train.LoggingConfig(log_level=cfg.log_level)),
        datasets=build_datasets(cfg, manifest),
        # Only train is split; validation is scored whole (see evaluate_shard).
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    started = time.perf_counter()
    result = trainer.fit()
    outcome = result.return_value or {}
    best = result.get_best_checkpoint(cfg.checkpoint_metric, cfg.checkpoint_mode) if result.checkpoint else None
    best_metrics = next((m for c, m in result.best_checkpoints if best and c.path == best.path), {})
    summary = {
        "name": cfg.name, "status": outcome.get("status", "ok"), "message": outcome.get("message", ""),
        "best_checkpoint": checkpoint_uri(cfg, best) if best else None,
        "best_metrics": best_metrics,
        "last_checkpoint": checkpoint_uri(cfg, result.checkpoint) if result.checkpoint else None,
        "epochs": int(result.metrics["epoch"]) + 1 if result.metrics else 0,
        "epochs_requested": cfg.epochs,
        "started_at_epoch": outcome.get("start_epoch", 0),
        "checkpoint_metric": cfg.checkpoint_metric,
        "seconds": round(time.perf_counter() - started, 1),
        "class_names": manifest.class_names, "data": cfg.data.uri,
    }
    run_uri = run_dir_uri(cfg)
    rfs, rpath = storage.resolve(run_uri)
    storage.write_bytes_atomic(rfs, f"{rpath}/config.yaml", config_lib.dump_yaml(cfg).encode(), run_uri)
    storage.write_bytes_atomic(rfs, f"{rpath}/{RESULT_FILE}",
                               json.dumps(summary, indent=2, default=float).encode(), run_uri)
    if summary["status"] == "non_finite":
        raise TrainingError(f"{summary['message']} Last good checkpoint: {summary['last_checkpoint']}")
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
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl, AMP)")
    p.add_argument("--storage", help="where runs go: local path or s3://bucket/prefix")
    p.add_argument("--name", help="run name; a rerun with the same name resumes")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="require results to resume")
    group.add_argument("--fresh", action="store_true", help="refuse a name that has results")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {"data.uri": args.data, "model": args.model, "loss": args.loss, "epochs": args.epochs,
             "data.batch_size": args.batch_size, "data.image_size": args.image_size,
             "num_workers": args.num_workers, "storage": args.storage, "name": args.name,
             "use_gpu": True if args.gpu else None}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    overrides += [f"loss_params.{kv}" for kv in args.loss_params]
    return config_lib.load_config(TrainConfig, args.config, overrides + args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = config_from_args(args)
    init_ray()
    summary = fit(cfg, resume="resume" if args.resume else "fresh" if args.fresh else "auto")
    print(json.dumps({k: summary[k] for k in ("best_checkpoint", "epochs", "best_metrics")}, indent=2, default=float))
    print(f"result: {storage.join(run_dir_uri(cfg), RESULT_FILE)}")
    return 0


if __name__ == "__main__":
    # Run from the importable module so Ray pickles train_loop_per_worker by reference.
    from ray_jobs import train as _module
    sys.exit(run_main(_module.main))
