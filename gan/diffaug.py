"""DiffAugment ``color,translation`` (Zhao et al., "Differentiable Augmentation for Data-Efficient
GAN Training", NeurIPS 2020), the policy GCGAN's training applies to real and fake images alike.

Written from the paper's definitions. Every op is differentiable (gradients reach the generator
through the augmented fakes) and draws its parameters per sample:

* color: brightness  x + (u - 0.5),              u ~ U(0, 1)
         saturation  (x - mean_c x) * 2u + mean_c x           (mean over channels, per pixel)
         contrast    (x - mean_chw x) * (u + 0.5) + mean_chw x (mean over the whole image)
* translation: shift by integers (dy, dx), each uniform in [-r H, r H] (r = 1/8; rounded as
  ``int(H * r + 0.5)``), filling with zeros.

Images are B x C x H x W floats in [-1, 1] (any range works).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from medbalance.errors import ConfigError

POLICIES = ("color", "translation")


def brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)


def saturation(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean


def contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by its own (dy, dx); pixels shifted in from outside are 0."""
    batch, _, height, width = x.shape
    max_dy, max_dx = int(height * ratio + 0.5), int(width * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (batch, 1), device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (batch, 1), device=x.device)
    # Index into a copy padded by one zero pixel: source row i - dy, clamped onto that border.
    rows = (torch.arange(height, device=x.device)[None] - dy + 1).clamp(0, height + 1)   # B x H
    cols = (torch.arange(width, device=x.device)[None] - dx + 1).clamp(0, width + 1)     # B x W
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)                                  # B x H+2 x W+2 x C
    index = torch.arange(batch, device=x.device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


_OPS = {"color": (brightness, saturation, contrast), "translation": (translation,)}


def parse_policy(policy: str) -> tuple[str, ...]:
    """``"color,translation"`` -> ``("color", "translation")``; unknown names raise ConfigError."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown DiffAugment policy {unknown}; use a comma-separated subset of {POLICIES}")
    return names


def diff_augment(x: torch.Tensor, policy: str = "color,translation") -> torch.Tensor:
    """Apply the policy's ops in order (fresh random parameters per call and per sample)."""
    for name in parse_policy(policy):
        for op in _OPS[name]:
            x = op(x)
    return x
