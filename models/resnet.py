"""ResNet-18/34/50 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

Built on ``torchvision.models.resnet.ResNet`` (weights=None; nothing is downloaded) so every
parameter name matches torchvision's and a torchvision state dict loads with ``pretrained=PATH``.
``ResNet`` here adds the timm classifier interface that all our models share:

    forward_features(x): B x in_chans x H x W -> B x num_features (global-average pooled)
    forward_head(f):     B x num_features     -> B x num_classes   (the linear ``fc``)
    reset_classifier(n): new ``fc`` with n outputs (n = 0: identity, forward returns features)

It is also the base of ADSR-ResNet, SE-/SRM-ResNet and CABNet, which pass their own block class
(see ``block_with_options``) and may override ``forward_features``.

Departure from torchvision: ``in_chans != 3`` replaces the stem conv (Kaiming-normal, fan_out).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from models.registry import register_model

BasicBlock = tv_resnet.BasicBlock
Bottleneck = tv_resnet.Bottleneck


def block_with_options(block: type[nn.Module], **options: Any):
    """Bind extra constructor options to a ResNet block class.

    torchvision's ``ResNet._make_layer`` calls ``block(inplanes, planes, ...)`` and reads
    ``block.expansion``; a ``functools.partial`` carrying ``expansion`` satisfies both.
    """
    bound = functools.partial(block, **options)
    bound.expansion = block.expansion
    return bound


class ResNet(tv_resnet.ResNet):
    """torchvision ResNet with ``forward_features`` / ``forward_head`` / ``reset_classifier``.

    Args:
        block: ``BasicBlock``, ``Bottleneck``, a subclass, or ``block_with_options(...)``.
        layers: blocks per stage, e.g. ``[3, 4, 6, 3]`` for ResNet-50.
        num_classes: classifier outputs (0: identity head).
        in_chans: input image channels.
    """

    def __init__(self, block, layers: list[int], num_classes: int, in_chans: int = 3) -> None:
        super().__init__(block, layers, num_classes=1)  # the real fc is built by reset_classifier
        if in_chans != 3:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.in_chans = in_chans
        self.num_features = 512 * block.expansion
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh ``Linear(num_features, num_classes)``."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the four stages: B x in_chans x H x W -> B x num_features x H/32 x W/32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """B x in_chans x H x W -> B x num_features."""
        return torch.flatten(self.avgpool(self.forward_backbone(x)), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """B x num_features -> B x num_classes."""
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def resnet18(num_classes: int, in_chans: int = 3) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]), torchvision layout."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans)


@register_model
def resnet34(num_classes: int, in_chans: int = 3) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]), torchvision layout."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_chans)


@register_model
def resnet50(num_classes: int, in_chans: int = 3) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]), torchvision layout."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_chans)
