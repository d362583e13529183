"""Small layers both GCGAN networks share: spectral-normed convs, GLU, Swish, noise injection, init.

GCGAN (DIM paper, DESIGN 4.5) is FastGAN (Liu et al., ICLR 2021) with global-context skips; these
are FastGAN's building blocks, written from DESIGN 4.5 and the authors' ``Generation_GCGAN/models.py``.

* Every convolution of both networks is spectral-normed (Miyato et al., ICLR 2018), except the two
  1x1 convs inside GCA (``gan/gc_block.py``). We use PyTorch's parametrization
  (``torch.nn.utils.parametrizations.spectral_norm``); the authors use the older hook-based
  ``torch.nn.utils.spectral_norm``. Both divide the weight by its largest singular value, estimated
  by one power iteration per training forward; the parametrization keeps ``u``/``v`` as buffers
  (so DDP broadcasts them) and the weight as ``parametrizations.weight.original``.
* Init (both nets, the authors' ``weights_init``): conv weights N(0, 0.02), BN weight N(1, 0.02),
  BN bias 0.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def sn_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> nn.Module:
    """Spectral-normed ``Conv2d`` without bias (every GCGAN conv has ``bias=False``)."""
    return spectral_norm(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False))


def sn_conv_transpose(in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    """Spectral-normed ``ConvTranspose2d`` (stride 1, no padding, no bias): 1x1 -> k x k."""
    return spectral_norm(nn.ConvTranspose2d(in_channels, out_channels, kernel_size, 1, 0, bias=False))


class GLU(nn.Module):
    """Gated linear unit over channels: B x 2C x H x W -> B x C x H x W, a * sigmoid(b)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * torch.sigmoid(b)


class Swish(nn.Module):
    """x * sigmoid(x) (SiLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class NoiseInjection(nn.Module):
    """x + w * N(0, 1), one noise map per sample (B x 1 x H x W) broadcast over channels; w is a
    learned scalar that starts at 0 (FastGAN, after StyleGAN)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        return x + self.weight * noise


def init_weights(module: nn.Module) -> None:
    """The authors' init, for ``module.apply``: convs N(0, 0.02); BN weight N(1, 0.02), bias 0.

    With the spectral-norm parametrization the raw weight is ``parametrizations.weight.original``.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        weight = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
        with torch.no_grad():
            weight.normal_(0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        with torch.no_grad():
            module.weight.normal_(1.0, 0.02)
            module.bias.zero_()


def channels(multipliers: dict[int, float], width: int) -> dict[int, int]:
    """Channels per feature size: ``int(multiplier * width)`` (the authors' ``nfc``)."""
    return {size: max(1, int(m * width)) for size, m in multipliers.items()}
