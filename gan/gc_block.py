"""Global-context skip excitation: GCA and GCBlock (DIM paper, GCGAN; DESIGN 4.5, Fig. ii).

GCBlock replaces FastGAN's skip-layer excitation (SLE): a low-resolution feature map gates a
high-resolution one, channel by channel, after a global-context attention step (GCA, paper
Eqs. 8-11) on the small map:

    GCA(x)     = x + ctx(x) * a(x)                                 B x C x H x W
      ctx(x)   = conv1x1(C/16 -> C)(ReLU(conv1x1(C -> C/16)(GAP(x))))   B x C x 1 x 1 (no bias, no SN)
      a(x)     = softmax of x over the H*W positions, per channel   B x C x H x W

    GCBlock(small, big) = big * sigmoid(SNconv1x1(Swish(SNconv4x4(AdaptiveAvgPool4(GCA(small))))))
                                                                    (paper Eqs. 12-13)

``small``: B x C_in x h x w (any h, w); ``big``: B x C_out x H x W; output: B x C_out x H x W.
As the authors' code, GCA's two 1x1 convs are plain (not spectral-normed) and have no bias; the
softmax runs over the raw activations (no 1x1 "key" conv as in GCNet, Cao et al. 2019).
"""
from __future__ import annotations

import torch
from torch import nn

from gan.layers import Swish, sn_conv


class GCA(nn.Module):
    """Global-context attention: B x C x H x W -> B x C x H x W (Eqs. 8-11).

    Args:
        channels: C.
        reduction: bottleneck ratio of the context transform (16 as the authors).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.context = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        ctx = self.context(x)                                             # B x C x 1 x 1
        attention = torch.softmax(x.reshape(batch, channels, height * width), dim=2)
        return x + ctx * attention.reshape(batch, channels, height, width)


class GCBlock(nn.Module):
    """``big * gate(GCA(small))``: a B x C_out x 1 x 1 sigmoid gate computed from the small map.

    Args:
        small_channels: C_in of the low-resolution map.
        big_channels: C_out of the high-resolution map it gates.
    """

    def __init__(self, small_channels: int, big_channels: int):
        super().__init__()
        self.gca = GCA(small_channels)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(4),
            sn_conv(small_channels, big_channels, 4),   # 4x4 -> 1x1
            Swish(),
            sn_conv(big_channels, big_channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
        return big * self.gate(self.gca(small))
