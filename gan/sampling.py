"""Sampling a GCGAN generator: noise -> uint8 images, and a PNG grid of them.

BN mode (DESIGN 4.5): the authors sample with the generator in TRAIN mode, so BatchNorm uses the
statistics of the sample batch itself; ``bn_mode="train"`` (our default, as theirs) does that,
``"eval"`` uses the running statistics instead. In train mode the result depends on the batch
it is drawn in, so keep sample batches reasonably large (the jobs use 16). Either way no
gradient is kept and the generator's mode is restored afterwards.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn

from medbalance.errors import ConfigError

BN_MODES = ("train", "eval")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] (clipped outside) -> uint8 B x 3 x H x W on the CPU."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


@torch.no_grad()
def generate(generator: nn.Module, noise: torch.Tensor, bn_mode: str = "train", batch_size: int = 16,
             autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images for each noise row: N x nz -> uint8 N x 3 x S x S (the generator's big output).

    Args:
        generator: a bare (not DDP-wrapped) generator, on ``noise``'s device.
        bn_mode: ``train`` (batch statistics, the authors') or ``eval`` (running statistics).
        batch_size: rows per forward pass.
    """
    if bn_mode not in BN_MODES:
        raise ConfigError(f"unknown sampling BN mode {bn_mode!r}; use one of {BN_MODES}")
    was_training = generator.training
    generator.train(bn_mode == "train")
    try:
        out = []
        for start in range(0, len(noise), batch_size):
            with torch.autocast(noise.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out.append(to_uint8(generator(noise[start:start + batch_size])[0]))
        return torch.cat(out)
    finally:
        generator.train(was_training)


def grid_png(images: torch.Tensor, nrow: int = 4, padding: int = 2) -> bytes:
    """uint8 N x 3 x H x W -> PNG bytes of a grid with ``nrow`` images per row."""
    from torchvision.utils import make_grid

    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=255)  # 3 x H' x W' uint8
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(grid.permute(1, 2, 0).numpy())).save(buf, format="PNG")
    return buf.getvalue()
