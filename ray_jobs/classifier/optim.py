"""Optimisers and learning-rate schedules of the classifier jobs, by name.

The schedule is a function of the fractional epoch (``step / steps_per_epoch``), so a warm-up or a
decay lands at the same point whatever the batch size and worker count.

``adsr_authors`` is the ADSR-Net authors' ``adjust_learning_rate`` (their main_loss.py, the version
that trains the ADSR model), applied per whole epoch ``e`` as theirs is:

    factor(e) = 1 + e / 10      for e <= 9    (their "warm-up": the lr RISES to 1.9x, then drops to 1x)
              = 1               for 10 <= e < 100
              = 0.1             for 100 <= e < 150
              = 0.01            for e >= 150  (not reached in their 150 epochs)

(``warmup_epochs`` still applies before it if set; the preset leaves it 0.)
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from medbalance.errors import ConfigError
from ray_jobs.classifier.config import OPTIMIZERS, SCHEDULES

if TYPE_CHECKING:
    from ray_jobs.classifier.config import OptimSection


def build_optimizer(params, cfg: "OptimSection") -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.name!r}; use one of {OPTIMIZERS}")


def lr_factor(epoch_float: float, cfg: "OptimSection", epochs: int) -> float:
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
    if cfg.schedule == "adsr_authors":
        epoch = int(epoch_float)
        return (1 + epoch / 10) if epoch <= 9 else 0.01 if epoch >= 150 else 0.1 if epoch >= 100 else 1.0
    if cfg.schedule == "none":
        return 1.0
    raise ConfigError(f"unknown schedule {cfg.schedule!r}; use one of {SCHEDULES}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: "OptimSection", epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler that applies :func:`lr_factor`."""
    steps_per_epoch = max(1, steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step / steps_per_epoch, cfg, epochs))
