"""SRM-ResNet-50 (Lee et al., "SRM: A Style-based Recalibration Module for Convolutional Neural
Networks", ICCV 2019).

Style-based recalibration, applied to the residual branch of every Bottleneck after ``bn3`` and
before the residual add (as the paper's SRM-ResNet):

    t_c = [mu_c, sigma_c]                         B x C x 2   style pooling (Sec. 3.1; std =
                                                              sqrt(unbiased var + 1e-5) as in
                                                              the authors' code)
    z_c = w_c . t_c                               B x C       channel-wise fully connected (CFC)
    g_c = sigmoid(BN(z_c))                        B x C       style integration (Sec. 3.2)
    out = x * g                                   B x C x H x W

``cfc`` (C x 2, no bias) starts at zero as in the authors' code, so the initial gate is
sigmoid(BN(0)) = 0.5. Backbone names match torchvision's ResNet-50; the SRM parameters live under
``layerN.M.srm.*``. Note: BN over B x C x 1 x 1 in train mode needs a batch of at least 2.
"""
from __future__ import annotations

import torch
from torch import nn

from models.registry import register_model
from models.resnet import Bottleneck, ResNet
from models.style import channel_style


class StyleRecalibration(nn.Module):
    """SRM gate; B x C x H x W -> B x C x H x W.

    Args:
        channels: C.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cfc = nn.Parameter(torch.zeros(channels, 2))
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        style = channel_style(x)[..., 0]  # B x C x 2
        z = (style * self.cfc).sum(dim=2)[:, :, None, None]  # B x C x 1 x 1
        return x * torch.sigmoid(self.bn(z)).to(x.dtype)


class SRMBottleneck(Bottleneck):
    """torchvision Bottleneck + SRM after ``bn3``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.srm = StyleRecalibration(self.bn3.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.srm(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


@register_model
def srm_resnet50(num_classes: int, in_chans: int = 3) -> ResNet:
    """SRM-ResNet-50 (Bottleneck + SRM, [3, 4, 6, 3])."""
    return ResNet(SRMBottleneck, [3, 4, 6, 3], num_classes, in_chans)
