"""One classifier training step in plain PyTorch (:class:`ClassifierStep`), and the epoch built on it.

The job's Ray Train workers (``ray_jobs/classifier/worker.py``), the benchmark's plain-PyTorch side
(``bench/train_overhead.py``) and the DDP test all run this same step, built by :func:`build_step`
from a ``TrainConfig``; only ``wrap`` differs (Ray Train's ``prepare_model``, nothing, or
``DistributedDataParallel``). One step, on this worker's batch of B images of C channels:

    x = normalize(images)                 B x C x H x W uint8/int16 -> float32 (channels_last if set)
    logits = model(x)                     B x K, under torch.autocast (bf16 / fp16) when AMP is on
    loss = criterion(logits.float(), y)   float32 scalar; y: B class indices
    every worker agrees the loss is finite (collectives.stop_if_any), else all of them stop
    scaler.scale(loss).backward()         DDP all-reduces (averages) the gradients here
    unscale, clip ||grad||_2 to optim.clip_grad_norm (when set), optimiser step, scaler update
    scheduler.step()                      the lr is a function of the fractional epoch (optim.py)

The ``GradScaler`` is enabled for fp16 only (bf16 and float32 need none). :func:`train_one_epoch`
runs the step over a worker's Ray Data shard (a damaged shard stops every worker, naming it);
:func:`validate` scores the whole val split over all workers.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ray_jobs.classifier.optim import build_optimizer, build_scheduler
from ray_jobs.classifier.pipeline import InputSpec, normalize
from ray_jobs.runtime import collectives
from ray_jobs.runtime.amp import amp_dtype, grad_scaler
from ray_jobs.runtime.data_errors import data_error_message

if TYPE_CHECKING:
    from ray_jobs.classifier.config import OptimSection, TrainConfig


class ClassifierStep:
    """A classifier, its loss, optimiser, loss scaler and lr schedule, and :meth:`step`.

    Args:
        model: the bare classifier (moved to ``device``, to channels_last if asked, then wrapped).
        criterion: loss module, ``(B x K float32 logits, B int64 labels) -> scalar``, with
            ``set_epoch(epoch)`` (``losses.create_loss``).
        optim: ``TrainConfig.optim``: optimiser, schedule and ``clip_grad_norm``.
        device: where training runs.
        epochs, steps_per_epoch: the schedule's length (the lr follows ``step / steps_per_epoch``).
        wrap: module -> module for data parallelism (``prepare_model``, ``DistributedDataParallel``);
            None for one process.
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` for mixed precision, None for float32.
        channels_last: model and inputs in channels_last memory format.
        spec: the input's channels and per-channel mean/std (``normalize``).
        rank: this worker's rank, named in the non-finite loss message.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optim: "OptimSection", device: torch.device, *,
                 epochs: int, steps_per_epoch: int, wrap: Callable[[nn.Module], nn.Module] | None = None,
                 autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                 spec: InputSpec | None = None, rank: int = 0):
        self.device, self.autocast_dtype, self.rank = device, autocast_dtype, rank
        self.channels_last, self.clip_grad_norm = channels_last, optim.clip_grad_norm
        self.spec = spec or InputSpec()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(device)  # the bare module: checkpoints, validation
        self.train_model = wrap(self.model) if wrap else self.model  # its forward is a collective under DDP
        self.criterion = criterion
        self.optimizer = build_optimizer(self.model.parameters(), optim)
        self.scaler = grad_scaler(device, autocast_dtype)
        self.scheduler = build_scheduler(self.optimizer, optim, epochs, steps_per_epoch)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def start_epoch(self, epoch: int) -> None:
        """Train mode; the loss learns the epoch (losses whose weights change over training)."""
        self.criterion.set_epoch(epoch)
        self.train_model.train()

    def step(self, images: torch.Tensor, target: torch.Tensor, *, epoch: int, step_index: int,
             inject_nan: bool = False) -> torch.Tensor:
        """One update on this worker's batch; returns the detached float32 loss (a scalar).

        Args:
            images: B x C x H x W on ``device``: uint8 or int16 as the pipeline delivers them.
            target: B class indices.
            epoch, step_index: named in the message when the loss is not finite.
            inject_nan: the test hook ``nan_epoch`` (``runtime.faults``): multiply the
                loss by NaN before the check.

        Raises:
            collectives.Stop: the loss on any worker is NaN or infinite (every worker raises it,
                with the first complaint; nothing is updated).
        """
        images, target = normalize(images, self.spec.mean, self.spec.std), target.long()
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits = self.train_model(images)
        loss = self.criterion(logits.float(), target)
        if inject_nan:
            loss = loss * float("nan")
        status = collectives.loss_status(loss)
        collectives.stop_if_any(status, (
            f"non-finite loss ({loss.item()}) at epoch {epoch} step {step_index} on rank {self.rank}; "
            "training stopped, the last good checkpoint is kept. Lower the learning rate, "
            "add --set optim.clip_grad_norm=1.0, or check the data.") if status else "", self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def state_dict(self) -> dict:
        """``model`` (the bare module's), ``optimizer``, ``scheduler`` and ``scaler``: a checkpoint's core."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def build_step(cfg: "TrainConfig", num_classes: int, class_counts: list[int], spec: InputSpec,
               device: torch.device, *, rank: int = 0, world: int = 1,
               wrap: Callable[[nn.Module], nn.Module] | None = None) -> ClassifierStep:
    """The step of a training run as the job's worker builds it from ``cfg``.

    The model (``cfg.model``, ``spec.channels`` input channels, ``cfg.pretrained`` weights; its
    BatchNorms synchronised when ``sync_batchnorm`` and ``world`` > 1), the loss (``cfg.loss`` on
    ``class_counts``), ``cfg.optim``, ``cfg.amp`` on ``device`` and ``cfg.channels_last``. The
    schedule expects ``ceil(sum(class_counts) / world / batch_size)`` steps per epoch.
    """
    from losses import create_loss
    from models import create_model

    model = create_model(cfg.model, num_classes=num_classes, in_chans=spec.channels,
                         pretrained=cfg.pretrained_path(), **cfg.model_kwargs)
    if cfg.sync_batchnorm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    criterion = create_loss(cfg.loss, class_counts=class_counts, **cfg.loss_params)
    return ClassifierStep(model, criterion, cfg.optim, device, epochs=cfg.epochs,
                          steps_per_epoch=math.ceil(sum(class_counts) / world / cfg.data.batch_size),
                          wrap=wrap, autocast_dtype=amp_dtype(cfg.amp, device),
                          channels_last=cfg.channels_last, spec=spec, rank=rank)


def train_one_epoch(step: ClassifierStep, shard, cfg: "TrainConfig", epoch: int, nan_epoch: int | None = None) -> dict:
    """:meth:`ClassifierStep.step` over this worker's part of the train split, once.

    Args:
        shard: Ray Train's dataset shard (``ray.train.get_dataset_shard("train")``): batches of
            ``image`` (B x C x H x W) and ``label`` (B).
        nan_epoch: test hook (``runtime.faults``): the loss is NaN at this epoch's first step.

    Returns:
        This worker's ``{"samples", "loss_sum" (loss x samples, summed), "seconds"}``.

    Raises:
        collectives.Stop: a non-finite loss or a damaged shard on any worker, naming epoch and step.
    """
    step.start_epoch(epoch)
    started, seen, loss_sum, index = time.perf_counter(), 0, 0.0, 0
    # Rows are shuffled in the pipeline (block order + rows within a block, build_dataset);
    # the optional local buffer mixes across blocks, at the cost of its fill time per epoch.
    batches = iter(shard.iter_torch_batches(
        batch_size=cfg.data.batch_size, device=step.device, drop_last=False,
        local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
        local_shuffle_seed=(cfg.seed + 1000 * epoch + step.rank) if cfg.reproducible else None))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 (a damaged shard is told apart below)
            message = data_error_message(exc, cfg.data.uri)
            if message is None:
                raise  # not the data's fault: Ray Train's FailureConfig retries
            collectives.stop_if_any(collectives.DATA_ERROR, f"epoch {epoch} step {index}: {message}", step.device)
        loss = step.step(batch["image"], batch["label"], epoch=epoch, step_index=index,
                         inject_nan=epoch == nan_epoch and index == 0)
        seen += len(batch["label"])
        loss_sum += loss.item() * len(batch["label"])
        index += 1
    return {"samples": seen, "loss_sum": loss_sum, "seconds": time.perf_counter() - started}


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


def validate(step: ClassifierStep, dataset, cfg: "TrainConfig", epoch: int, class_names: list[str]) -> dict:
    """``metrics.compute_metrics`` of the whole val split, scored over all workers, on every worker.

    Scores with the bare module (DDP's forward is a collective, and workers score different batch
    counts). ``dataset`` is the unsplit val dataset (:func:`evaluate_shard`).

    Raises:
        collectives.Stop: a damaged shard on any worker ("validation of epoch N: ...").
    """
    from metrics import compute_metrics

    try:
        logits, labels = evaluate_shard(step.model, dataset, cfg.data.eval_batch_size, step.device,
                                        step.autocast_dtype, len(class_names), step.spec)
        status, message = collectives.OK, ""
    except Exception as exc:  # noqa: BLE001
        message = data_error_message(exc, cfg.data.uri)
        if message is None:
            raise
        status, message = collectives.DATA_ERROR, f"validation of epoch {epoch}: {message}"
    collectives.stop_if_any(status, message, step.device)
    logits, labels = collectives.gather(logits), collectives.gather(labels)
    return compute_metrics(torch.softmax(logits, dim=1).numpy(), labels.numpy(), class_names=class_names)
