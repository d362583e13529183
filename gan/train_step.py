"""One GCGAN training iteration (D step, then G step, then EMA), in plain PyTorch.

The training job's workers (``ray_jobs/gcgan/worker.py``), the benchmark's plain-PyTorch side and the
DDP test all run this same step; only ``wrap`` differs (Ray Train's ``prepare_model``, nothing,
or ``DistributedDataParallel``). One iteration, as the authors' ``train.py``:

    z ~ N(0, I)                      B x nz, drawn per rank
    fakes = G(z)                     [B x 3 x S x S, B x 3 x m x m]
    real', fakes' = DiffAugment(real), DiffAugment(each fake)     (independent draws)
    D step:  L_D = hinge_real(D(real')) + rec(real', part) + hinge_fake(D(fakes'.detach()))
    G step:  L_G = -mean D(fakes')   with D's parameters frozen
    EMA:     p_ema <- 0.999 p_ema + 0.001 p

DDP and the two optimiser steps:

* D is wrapped through :class:`DiscriminatorPass`, whose single forward runs D on the real batch
  (with the reconstructions) and on the detached fakes: DDP sees one forward and one backward per
  step, every D parameter gets a gradient (no ``find_unused_parameters``), and BatchNorm still
  sees real and fake batches separately, as in the authors' two calls.
* The G step runs the BARE discriminator with ``requires_grad_(False)``: its loss reaches G's
  parameters only (all-reduced by G's DDP wrapper), nothing accumulates in D's ``.grad``, and
  D's DDP hooks never fire. The D step sees detached fakes, so nothing reaches G from it.
* Mixed precision: forward passes under ``torch.autocast`` (``autocast_dtype``), losses in
  float32, one ``GradScaler`` per optimiser (enabled for fp16 only).
"""
from __future__ import annotations

import random
from typing import Callable

import torch
from torch import nn

from gan.diffaug import diff_augment, parse_policy
from gan.ema import GeneratorEMA
from gan.losses import ReconstructionLoss, d_fake_hinge, d_real_hinge, g_hinge
from medbalance.errors import ConfigError

OPTIMIZERS = ("rmsprop", "adam")


def build_gan_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    """The authors' RMSprop (lr 2e-4, PyTorch's other defaults), or Adam(0.5, 0.999) as their
    commented-out alternative."""
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))
    raise ConfigError(f"unknown GAN optimizer {name!r}; use one of {OPTIMIZERS}")


def real_batch(images: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """uint8 B x 3 x S x S -> float32 in [-1, 1], each image h-flipped with probability 1/2."""
    x = images.float().div_(127.5).sub_(1.0)
    if flip:
        mask = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
        x = torch.where(mask, x.flip(3), x)
    return x


class DiscriminatorPass(nn.Module):
    """The D step's forward: ``(logits_real, logits_fake, reconstructions)`` in one call."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: torch.Tensor, fake_big: torch.Tensor, fake_small: torch.Tensor, part: int):
        logits_real, recs = self.discriminator(real, part)
        logits_fake, _ = self.discriminator([fake_big, fake_small])
        return logits_real, logits_fake, recs


class GanStep:
    """G, D, their optimisers and scalers, the EMA, and :meth:`step`.

    Args:
        generator, discriminator: bare modules (moved to ``device`` here).
        reconstruction: the D reconstruction distance (``gan.losses.ReconstructionLoss``).
        device: where training runs.
        wrap: module -> module, applied to G and to the D pass (DDP); None for one process.
        optimizer, lr: ``rmsprop`` (default, the authors') or ``adam``.
        policy: DiffAugment policy.
        autocast_dtype: bf16/fp16 for mixed precision, None for float32.
        keep_ema: hold the EMA generator in this process (rank 0 only under DDP).
        ema_decay: 0.999 as the authors.
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, reconstruction: ReconstructionLoss,
                 device: torch.device, *, wrap: Callable[[nn.Module], nn.Module] | None = None,
                 optimizer: str = "rmsprop", lr: float = 2e-4, policy: str = "color,translation",
                 autocast_dtype: torch.dtype | None = None, keep_ema: bool = True, ema_decay: float = 0.999):
        self.device, self.policy, self.autocast_dtype = device, policy, autocast_dtype
        parse_policy(policy)
        self.generator = generator.to(device)
        self.discriminator = discriminator.to(device)
        self.reconstruction = reconstruction.to(device)
        self.nz = generator.nz
        wrap = wrap or (lambda module: module)
        self.g_train = wrap(self.generator)
        self.d_train = wrap(DiscriminatorPass(self.discriminator))
        self.opt_g = build_gan_optimizer(self.generator.parameters(), optimizer, lr)
        self.opt_d = build_gan_optimizer(self.discriminator.parameters(), optimizer, lr)
        fp16 = autocast_dtype == torch.float16
        self.scaler_g = torch.amp.GradScaler(device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(device.type, enabled=fp16)
        self.ema = GeneratorEMA(self.generator, ema_decay) if keep_ema else None

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def generate_and_augment(self, real: torch.Tensor):
        """``(real', [big', small'])``: fakes from fresh noise, everything DiffAugmented."""
        z = torch.randn(real.shape[0], self.nz, device=self.device)
        with self._autocast():
            fakes = self.g_train(z)
        return diff_augment(real, self.policy), [diff_augment(f, self.policy) for f in fakes]

    def d_step(self, real: torch.Tensor, fakes: list[torch.Tensor], check=None) -> dict:
        """One D update on augmented reals and (detached) augmented fakes."""
        part = random.randint(0, 3)
        with self._autocast():
            logits_real, logits_fake, recs = self.d_train(real, fakes[0].detach(), fakes[1].detach(), part)
        loss_real, loss_fake = d_real_hinge(logits_real), d_fake_hinge(logits_fake)
        loss_rec = self.reconstruction(real, recs, part)
        loss = loss_real + loss_rec + loss_fake
        if check is not None:
            check("discriminator", loss)
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler_d.scale(loss).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        return {"loss_d": loss.detach(), "loss_d_real": loss_real.detach(), "loss_d_fake": loss_fake.detach(),
                "loss_rec": loss_rec.detach(), "d_real_logit": logits_real.detach().float().mean()}

    def g_step(self, fakes: list[torch.Tensor], check=None) -> dict:
        """One G update through the frozen bare discriminator; then the EMA."""
        self.discriminator.requires_grad_(False)
        try:
            with self._autocast():
                logits, _ = self.discriminator(fakes)
            loss = g_hinge(logits)
            if check is not None:
                check("generator", loss)
            self.opt_g.zero_grad(set_to_none=True)
            self.scaler_g.scale(loss).backward()
            self.scaler_g.step(self.opt_g)
            self.scaler_g.update()
        finally:
            self.discriminator.requires_grad_(True)
        if self.ema is not None:
            self.ema.update(self.generator)
        return {"loss_g": loss.detach()}

    def step(self, real: torch.Tensor, check=None) -> dict:
        """One iteration on a real batch (float, [-1, 1], on ``device``); returns detached losses.

        ``check(name, loss)`` is called before each backward (the job's non-finite agreement).
        """
        self.generator.train()
        self.discriminator.train()
        real, fakes = self.generate_and_augment(real)
        out = self.d_step(real, fakes, check)
        out.update(self.g_step(fakes, check))
        return out

    # -------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """G, D, EMA (with the live buffers), both optimisers and scalers."""
        state = {"g": self.generator.state_dict(), "d": self.discriminator.state_dict(),
                 "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                 "scaler_g": self.scaler_g.state_dict(), "scaler_d": self.scaler_d.state_dict()}
        if self.ema is not None:
            self.ema.sync_buffers(self.generator)
            state["g_ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["g"])
        self.discriminator.load_state_dict(state["d"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.scaler_d.load_state_dict(state["scaler_d"])
        if self.ema is not None:
            self.ema.load_state_dict(state["g_ema"])
