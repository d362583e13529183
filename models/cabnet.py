"""CABNet-50 (He, Li, Li, Wang, Fu, "CABNet: Category Attention Block for Imbalanced Diabetic
Retinopathy Grading", IEEE Transactions on Medical Imaging, 2021), on a torchvision-layout
ResNet-50 backbone.

    F  = ResNet-50 stages(x)                                   B x 2048 x h x w
    F' = GAB(F); F'' = CAB(F'); f = GAP(F'')                   f: B x 2048
    logits = fc(f)                                             B x num_classes

Global Attention Block (the paper's GAB; authors' Keras code ``Global_attention_block``):
    channel attention  a = sigmoid(conv1x1(ReLU(conv1x1(GAP(F)))))      B x C x 1 x 1
                       F_c = F * a
    spatial attention  s = sigmoid(mean_c(F_c))                         B x 1 x h x w
                       GAB(F) = F_c * s

Category Attention Block (the paper's CAB; ``Category_attention_block``), L classes, k maps each:
    G = ReLU(BN(conv1x1(F', C -> k*L)))                 B x kL x h x w; channel l*k + j is map j
                                                         of class l
    S_l = (1/k) sum_j GMP(G_{l,j})                      B x L         class importance
    A_l = (1/k) sum_j G_{l,j}                            B x L x h x w class map
    M = (1/L) sum_l S_l * A_l                            B x 1 x h x w
    CAB(F') = F' * M

Departures, all from reading the authors' code and the issue:
- The issue describes GAB's first 1x1 conv as a reduction; the authors' code keeps C channels in
  both convs (C -> C -> C, ~8.4M parameters at C = 2048). We follow the code (``gab_reduction=1``)
  and offer ``gab_reduction=r`` (C -> C/r -> C).
- The authors' CAB conv has a bias followed by BN (a no-op pair); ours has no bias.
- The authors' code takes a Keras ImageNet backbone (its train.py defaults to MobileNet); we use
  the torchvision ResNet-50 layout (as the issue asks) so ``pretrained=PATH`` takes a torchvision
  ResNet-50 file.
- Kept as in the code: M is not normalised (no sigmoid/softmax), so CAB's output scales like the
  cube of its input; with untrained BN running statistics (eval mode right after init) the
  logits can be large. Training mode and trained statistics are fine.
- CAB depends on the number of classes, so ``reset_classifier`` rebuilds CAB (fresh init) as well
  as ``fc``, and ``num_classes`` must be >= 1.
"""
from __future__ import annotations

import torch
from torch import nn

from medbalance.errors import ConfigError
from models.registry import register_model
from models.resnet import Bottleneck, ResNet


class GlobalAttentionBlock(nn.Module):
    """GAB: channel then spatial attention; B x C x h x w -> B x C x h x w.

    Args:
        channels: C.
        reduction: hidden width C // reduction of the channel attention (1 = authors' code).
    """

    def __init__(self, channels: int, reduction: int = 1) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.channel_reduce = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.channel_expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.mean(dim=(2, 3), keepdim=True)  # B x C x 1 x 1
        a = torch.sigmoid(self.channel_expand(self.relu(self.channel_reduce(a))))
        x = x * a
        s = torch.sigmoid(x.mean(dim=1, keepdim=True))  # B x 1 x h x w
        return x * s


class CategoryAttentionBlock(nn.Module):
    """CAB: class-wise attention map from k maps per class; B x C x h x w -> B x C x h x w.

    Args:
        channels: C.
        num_classes: L (>= 1).
        maps_per_class: k (5 in the paper).
    """

    def __init__(self, channels: int, num_classes: int, maps_per_class: int = 5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.maps_per_class = maps_per_class
        self.conv = nn.Conv2d(channels, maps_per_class * num_classes, 1, bias=False)
        self.bn = nn.BatchNorm2d(maps_per_class * num_classes)
        self.relu = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        maps = self.relu(self.bn(self.conv(x)))  # B x kL x h x w
        maps = maps.reshape(b, self.num_classes, self.maps_per_class, h, w)  # B x L x k x h x w
        importance = maps.amax(dim=(3, 4)).mean(dim=2)  # B x L
        class_maps = maps.mean(dim=2)  # B x L x h x w
        attention = (importance[:, :, None, None] * class_maps).mean(dim=1, keepdim=True)
        return x * attention  # attention: B x 1 x h x w


class CABNet(ResNet):
    """ResNet-50 backbone + GAB + CAB + GAP + fc.

    Args:
        num_classes: L (>= 1; CAB needs the class count).
        in_chans: input channels.
        maps_per_class: CAB's k.
        gab_reduction: GAB channel-attention reduction (1 = authors' code).
    """

    def __init__(self, num_classes: int, in_chans: int = 3, maps_per_class: int = 5,
                 gab_reduction: int = 1) -> None:
        if num_classes < 1:
            raise ConfigError("cabnet50 needs num_classes >= 1 (its category attention block "
                              "has k maps per class); use forward_features for features")
        self.maps_per_class = maps_per_class
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes, in_chans)
        self.gab = GlobalAttentionBlock(self.num_features, gab_reduction)

    def reset_classifier(self, num_classes: int) -> None:
        """New CAB (fresh init, L = num_classes) and new ``fc``."""
        if num_classes < 1:
            raise ConfigError("cabnet50 needs num_classes >= 1 (CAB has k maps per class)")
        super().reset_classifier(num_classes)
        self.cab = CategoryAttentionBlock(self.num_features, num_classes, self.maps_per_class)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """B x in_chans x H x W -> B x 2048 (after GAB, CAB and global average pooling)."""
        x = self.cab(self.gab(self.forward_backbone(x)))
        return torch.flatten(self.avgpool(x), 1)


@register_model
def cabnet50(num_classes: int, in_chans: int = 3, maps_per_class: int = 5,
             gab_reduction: int = 1) -> CABNet:
    """CABNet on ResNet-50 (k = 5 maps per class)."""
    return CABNet(num_classes, in_chans, maps_per_class, gab_reduction)
