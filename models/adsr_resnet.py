"""ADSR-Net: ResNet-18/34/50 with an ADSR module in every residual block (paper 1, DESIGN 4.1).

In each BasicBlock / Bottleneck the ADSR module (models/adsr.py) gates the residual branch after
the block's last BN and before the residual add:

    out = ReLU(ADSR(BN_last(conv_last(...))) + shortcut(x))

Built on torchvision's ResNet, BasicBlock and Bottleneck, so every backbone parameter keeps
torchvision's name (``layer3.1.conv2.weight``); the ADSR parameters live under
``layerN.M.adsr.*`` and are the only "missing" keys when a torchvision ResNet state dict is
loaded with ``pretrained=PATH``.

Init: torchvision's (Kaiming-normal fan_out convs, BN weight 1 / bias 0), then every ADSR module
is re-initialised by ``ADSR.reset_parameters`` (same rule, but PSF BN weights 0: gate 0.5).

Parameter cost: the 16 modules of ADSR-ResNet-50 add 20.6M parameters to ResNet-50's 23.5M
(num_classes=7); ``gsa="channelwise"`` adds 0.53M. See docs/models.md.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from models.adsr import ADSR
from models.registry import register_model
from models.resnet import BasicBlock, Bottleneck, ResNet, block_with_options


class ADSRBasicBlock(BasicBlock):
    """torchvision BasicBlock + ADSR after ``bn2``.

    Shapes: B x inplanes x H x W -> B x planes x H/stride x W/stride.
    """

    def __init__(self, *args, gsa: str = "faithful", psf_kernels: Sequence[int] = (1, 3, 7),
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adsr = ADSR(self.bn2.num_features, gsa=gsa, psf_kernels=psf_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.adsr(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class ADSRBottleneck(Bottleneck):
    """torchvision Bottleneck + ADSR after ``bn3``.

    Shapes: B x inplanes x H x W -> B x 4 planes x H/stride x W/stride.
    """

    def __init__(self, *args, gsa: str = "faithful", psf_kernels: Sequence[int] = (1, 3, 7),
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adsr = ADSR(self.bn3.num_features, gsa=gsa, psf_kernels=psf_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.adsr(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


class ADSRResNet(ResNet):
    """ResNet with ADSR in every block.

    Args:
        block: ``ADSRBasicBlock`` or ``ADSRBottleneck``.
        layers: blocks per stage.
        num_classes: classifier outputs.
        in_chans: input channels.
        gsa: ``"faithful"`` (paper) or ``"channelwise"`` (SRM-style, ~100x fewer GSA parameters).
        psf_kernels: PSF kernels, default (1, 3, 7); (1, 3, 3) is the authors' code form.
    """

    def __init__(self, block, layers: list[int], num_classes: int, in_chans: int = 3,
                 gsa: str = "faithful", psf_kernels: Sequence[int] = (1, 3, 7)) -> None:
        super().__init__(block_with_options(block, gsa=gsa, psf_kernels=psf_kernels),
                         layers, num_classes, in_chans)
        for m in self.modules():  # torchvision's init loop overwrote the PSF BN weights with 1
            if isinstance(m, ADSR):
                m.reset_parameters()


@register_model
def adsr_resnet18(num_classes: int, in_chans: int = 3, gsa: str = "faithful",
                  psf_kernels: Sequence[int] = (1, 3, 7)) -> ADSRResNet:
    """ADSR-ResNet-18 (BasicBlock, [2, 2, 2, 2])."""
    return ADSRResNet(ADSRBasicBlock, [2, 2, 2, 2], num_classes, in_chans, gsa, psf_kernels)


@register_model
def adsr_resnet34(num_classes: int, in_chans: int = 3, gsa: str = "faithful",
                  psf_kernels: Sequence[int] = (1, 3, 7)) -> ADSRResNet:
    """ADSR-ResNet-34 (BasicBlock, [3, 4, 6, 3])."""
    return ADSRResNet(ADSRBasicBlock, [3, 4, 6, 3], num_classes, in_chans, gsa, psf_kernels)


@register_model
def adsr_resnet50(num_classes: int, in_chans: int = 3, gsa: str = "faithful",
                  psf_kernels: Sequence[int] = (1, 3, 7)) -> ADSRResNet:
    """ADSR-ResNet-50 (Bottleneck, [3, 4, 6, 3])."""
    return ADSRResNet(ADSRBottleneck, [3, 4, 6, 3], num_classes, in_chans, gsa, psf_kernels)
