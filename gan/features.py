"""Feature extractors for FID/KID and the nearest-neighbour check. Nothing is downloaded.

FID and KID are defined on Inception-v3 features, whose weights cannot be downloaded here. The
metrics are computed by torchmetrics, which accepts any feature module; the features come from

* a user-given extractor file: a TorchScript module (``torch.jit.save``, any suffix but .pt2) or
  a ``torch.export`` program (``.pt2``). Neither format runs arbitrary Python when loaded. The
  module takes float B x 3 x H x W in [0, 1] and returns B x D (it does its own normalisation;
  export it with a dynamic batch dimension, ``torch.export.Dim``);
  e.g. an Inception-v3 traced from weights the user has, for comparable FID numbers; or
* a medbalance classifier checkpoint: its ``forward_features`` (B x D after global pooling) on
  ImageNet-normalised inputs, the features the downstream classifier actually uses.

FID/KID values depend on the extractor: compare them only within one extractor (every report
names it). Both wrappers take float [0, 1] images and return float32 B x D.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from medbalance.errors import ConfigError


class FileExtractor(nn.Module):
    """A TorchScript or ``torch.export`` feature module from a file (see the module docstring)."""

    def __init__(self, path: str):
        super().__init__()
        if not os.path.isfile(path):
            raise ConfigError(f"feature extractor file {path} does not exist")
        try:
            if path.endswith(".pt2"):
                self.module = torch.export.load(path).module()
            else:
                self.module = torch.jit.load(path, map_location="cpu")
        except Exception as exc:  # torch raises several types for files it cannot read
            raise ConfigError(f"{path} is not a TorchScript (.pt) or torch.export (.pt2) module: {exc}") from exc
        self.description = {"kind": "extractor_file", "path": os.path.abspath(path)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        try:
            out = self.module(images)
        except Exception as exc:  # a module exported for other shapes raises AssertionError, RuntimeError, ...
            raise ConfigError(f"the feature extractor fails on a batch of shape {tuple(images.shape)} ({exc}); "
                              "export it for float B x 3 x H x W inputs with a dynamic batch dimension") from exc
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != images.shape[0]:
            raise ConfigError(f"the feature extractor must return B x D features; it returned "
                              f"{getattr(out, 'shape', type(out))} for {tuple(images.shape)}")
        return out.float()


class ClassifierFeatures(nn.Module):
    """A classifier's ``forward_features`` on [0, 1] images, normalised with ``mean``/``std`` first
    (the classifier's training normalisation; the GAN job passes ImageNet's)."""

    def __init__(self, model: nn.Module, description: dict, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.description = description

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features((images - self.mean) / self.std)
        if features.dim() > 2:  # a feature map: global average pool
            features = features.flatten(2).mean(2)
        return features.float()


@torch.no_grad()
def extract(extractor: nn.Module, images: torch.Tensor, image_size: int, batch_size: int = 32) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float64 N x D features (images resized to ``image_size``, scaled to [0, 1])."""
    import torch.nn.functional as F

    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].float() / 255.0
        if batch.shape[-1] != image_size or batch.shape[-2] != image_size:
            batch = F.interpolate(batch, size=(image_size, image_size), mode="bilinear", antialias=True,
                                  align_corners=False).clamp(0, 1)
        out.append(extractor(batch).double())
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)
