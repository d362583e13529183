"""SE-ResNet-50 (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018 / TPAMI 2020).

Squeeze-and-excitation (Eq. 2-4 of the paper), applied to the residual branch of every
Bottleneck after ``bn3`` and before the residual add (the paper's "SE-ResNet module", Fig. 3):

    z = GAP(u)                                   B x C x 1 x 1   (squeeze, Eq. 2)
    s = sigmoid(W2 ReLU(W1 z))                   B x C x 1 x 1   (excitation, Eq. 3; r = 16)
    out = u * s                                  B x C x H x W   (Eq. 4)

W1 / W2 are 1x1 convolutions with bias (equivalent to the paper's FC layers). Backbone names match
torchvision's ResNet-50; the SE parameters live under ``layerN.M.se.*``.
"""
from __future__ import annotations

import torch
from torch import nn

from models.registry import register_model
from models.resnet import Bottleneck, ResNet, block_with_options


class SqueezeExcite(nn.Module):
    """SE gate; B x C x H x W -> B x C x H x W.

    Args:
        channels: C.
        reduction: r; the hidden width is max(1, C // r).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)  # B x C x 1 x 1
        s = torch.sigmoid(self.expand(self.relu(self.reduce(s))))  # B x C x 1 x 1
        return x * s


class SEBottleneck(Bottleneck):
    """torchvision Bottleneck + SE after ``bn3``."""

    def __init__(self, *args, reduction: int = 16, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.se = SqueezeExcite(self.bn3.num_features, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


@register_model
def se_resnet50(num_classes: int, in_chans: int = 3, reduction: int = 16) -> ResNet:
    """SE-ResNet-50 (Bottleneck + SE, [3, 4, 6, 3], reduction 16)."""
    return ResNet(block_with_options(SEBottleneck, reduction=reduction), [3, 4, 6, 3],
                  num_classes, in_chans)
