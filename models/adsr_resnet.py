"""ADSR-Net: ResNet-18/34/50 with an ADSR module in every residual block (paper 1, DESIGN 4.1).

In each BasicBlock / Bottleneck the ADSR module (models/adsr.py) gates the residual branch after
the block's last BN and before the residual add:

    out = ReLU(ADSR(BN_last(conv_last(...))) + shortcut(x))

Built on torchvision's ResNet, BasicBlock and Bottleneck, so every backbone parameter keeps
torchvision's name (``layer3.1.conv2.weight``); the ADSR parameters live under
``layerN.M.adsr.*`` and are the only "missing" keys when a torchvision ResNet state dict is
loaded with ``pretrained=PATH``.

Init (``init=``):

* ``"authors"`` (default): what the authors' ResNet init loop does (their resnet_adsr.py): convs
  whose key contains "conv" Kaiming-normal (fan_out), so the ``downsample`` convs stay at
  PyTorch's default; BN weights 1 (PSF's 0); every bias 0; the GSA mixing convs at PyTorch's
  default (see models/adsr.py); ``fc`` Kaiming-normal (fan_in, std sqrt(2 / 512 e)) with bias 0.
  With ImageNet weights (``pretrained``) only the ADSR modules and ``fc`` keep their init.
* ``"ours"``: torchvision's (Kaiming-normal fan_out convs, BN 1 / 0, ``fc`` PyTorch's default
  Linear init), then the ADSR modules with every conv Kaiming-normal (fan_out).

``paper_exact=True`` builds the published network exactly: ``psf_kernels=(1, 3, 3)`` (the
authors' (A + B3 + B3) / 3), the faithful GSA and the authors' init. We keep (1, 3, 7) as the
default: DESIGN 4.1 reads the repeated 3x3 branch as a slip for the 7x7 branch the paper's text
describes, and a 7x7 branch is what a third branch adds (the repeated branch only reweights one).

Parameter cost: the 16 modules of ADSR-ResNet-50 add 20.6M parameters to ResNet-50's 23.5M
(num_classes=7); ``gsa="channelwise"`` adds 0.53M. See docs/models.md.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medbalance.errors import ConfigError
from models.adsr import ADSR, check_init
from models.registry import register_model
from models.resnet import BasicBlock, Bottleneck, ResNet, block_with_options


class ADSRBasicBlock(BasicBlock):
    """torchvision BasicBlock + ADSR after ``bn2``.

    Shapes: B x inplanes x H x W -> B x planes x H/stride x W/stride.
    """

    def __init__(self, *args, gsa: str = "faithful", psf_kernels: Sequence[int] = (1, 3, 7),
                 init: str = "authors", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adsr = ADSR(self.bn2.num_features, gsa=gsa, psf_kernels=psf_kernels, init=init)

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
                 init: str = "authors", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adsr = ADSR(self.bn3.num_features, gsa=gsa, psf_kernels=psf_kernels, init=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.adsr(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


PAPER_EXACT = {"gsa": "faithful", "psf_kernels": (1, 3, 3), "init": "authors"}
_DEFAULTS = {"gsa": "faithful", "psf_kernels": (1, 3, 7), "init": "authors"}


class ADSRResNet(ResNet):
    """ResNet with ADSR in every block.

    Args:
        block: ``ADSRBasicBlock`` or ``ADSRBottleneck``.
        layers: blocks per stage.
        num_classes: classifier outputs.
        in_chans: input channels.
        gsa: ``"faithful"`` (paper) or ``"channelwise"`` (SRM-style, ~100x fewer GSA parameters).
        psf_kernels: PSF kernels, default (1, 3, 7); (1, 3, 3) is the authors' code form.
        init: ``"authors"`` (default) or ``"ours"`` (see the module docstring).
    """

    def __init__(self, block, layers: list[int], num_classes: int, in_chans: int = 3,
                 gsa: str = "faithful", psf_kernels: Sequence[int] = (1, 3, 7), init: str = "authors") -> None:
        super().__init__(block_with_options(block, gsa=gsa, psf_kernels=psf_kernels, init=check_init(init)),
                         layers, num_classes, in_chans)
        for m in self.modules():  # torchvision's init loop overwrote the PSF BN weights with 1
            if isinstance(m, ADSR):
                m.reset_parameters()
        if init == "authors":
            for m in self.modules():
                if isinstance(m, (ADSRBasicBlock, ADSRBottleneck)) and m.downsample is not None:
                    m.downsample[0].reset_parameters()  # their loop skips keys without "conv"
            if num_classes > 0:
                nn.init.kaiming_normal_(self.fc.weight)
                nn.init.zeros_(self.fc.bias)


def _options(gsa, psf_kernels, init, paper_exact: bool) -> dict:
    """The ADSR options, with ``paper_exact`` setting the published network's (see the docstring)."""
    given = {"gsa": gsa, "psf_kernels": tuple(psf_kernels), "init": init}
    if not paper_exact:
        return given
    clash = {k: v for k, v in given.items() if v != _DEFAULTS[k] and v != PAPER_EXACT[k]}
    if clash:
        raise ConfigError(f"paper_exact=True sets {PAPER_EXACT}; it cannot be combined with {clash}")
    return dict(PAPER_EXACT)


@register_model
def adsr_resnet18(num_classes: int, in_chans: int = 3, gsa: str = "faithful",
                  psf_kernels: Sequence[int] = (1, 3, 7), init: str = "authors",
                  paper_exact: bool = False) -> ADSRResNet:
    """ADSR-ResNet-18 (BasicBlock, [2, 2, 2, 2])."""
    return ADSRResNet(ADSRBasicBlock, [2, 2, 2, 2], num_classes, in_chans,
                      **_options(gsa, psf_kernels, init, paper_exact))


@register_model
def adsr_resnet34(num_classes: int, in_chans: int = 3, gsa: str = "faithful",
                  psf_kernels: Sequence[int] = (1, 3, 7), init: str = "authors",
                  paper_exact: bool = False) -> ADSRResNet:
    """ADSR-ResNet-34 (BasicBlock, [3, 4, 6, 3])."""
    return ADSRResNet(ADSRBasicBlock, [3, 4, 6, 3], num_classes, in_chans,
                      **_options(gsa, psf_kernels, init, paper_exact))


@register_model
def adsr_resnet50(num_classes: int, in_chans: int = 3, gsa: str = "faithful",
                  psf_kernels: Sequence[int] = (1, 3, 7), init: str = "authors",
                  paper_exact: bool = False) -> ADSRResNet:
    """ADSR-ResNet-50 (Bottleneck, [3, 4, 6, 3])."""
    return ADSRResNet(ADSRBottleneck, [3, 4, 6, 3], num_classes, in_chans,
                      **_options(gsa, psf_kernels, init, paper_exact))
