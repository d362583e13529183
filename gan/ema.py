"""Exponential moving average of the generator (DIM/FastGAN training; DESIGN 4.5).

After each generator step: p_ema = decay * p_ema + (1 - decay) * p, decay 0.999, for the
PARAMETERS only. BN running statistics are not averaged: as in the authors' code, samples use the
EMA parameters with the live generator's buffers (copied in by :meth:`GeneratorEMA.sync_buffers`
before sampling and saving). Samples and checkpoints use the EMA weights.

Under DDP the live parameters are identical on every rank after the optimiser step (gradients are
all-reduced), so the training job keeps the EMA on rank 0 only.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class GeneratorEMA:
    """A frozen copy of a generator whose parameters track the live one's.

    Args:
        generator: the live (bare, not DDP-wrapped) generator.
        decay: the average's decay (0.999 as the authors).
    """

    def __init__(self, generator: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.module = copy.deepcopy(generator)
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        for ema, live in zip(self.module.parameters(), generator.parameters()):
            ema.mul_(self.decay).add_(live.detach().to(ema.dtype), alpha=1.0 - self.decay)

    @torch.no_grad()
    def sync_buffers(self, generator: nn.Module) -> None:
        """Copy the live generator's buffers (BN statistics, spectral-norm vectors)."""
        for ema, live in zip(self.module.buffers(), generator.buffers()):
            ema.copy_(live)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
