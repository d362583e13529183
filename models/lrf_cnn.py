"""LRF-CNN: a lightweight receptive-field CNN (paper 2, "DIM"; DESIGN 4.4).

Written from the paper's description (DESIGN 4.4); the LRF block is a depthwise-separable
variant of the Receptive Field Block of Liu et al., "Receptive Field Block Net for Accurate and
Fast Object Detection", ECCV 2018 (four branches of growing kernel/dilation, concat, a 1x1
"linear" fusion scaled by 0.1, a 1x1 shortcut, ReLU).

Network, for an H x W input (sizes for 299 / 64):

    stem   conv7x7 s2 (in_chans -> 64) + BN + ReLU, maxpool 3x3 s2       -> 64 x 75 x 75 / 16 x 16
    stage1 LRF(64, 64), LRF(64, 128), maxpool 3x3 s2                     -> 128 x 38 x 38 / 8 x 8
    stage2 LRF(128, 192), (192, 224), (224, 256), (256, 288), (288, 320),
           maxpool 3x3 s2                                                -> 320 x 19 x 19 / 4 x 4
    stage3 LRF(320, 320), LRF(320, 384)                                  -> 384 x 19 x 19 / 4 x 4
    global average pool                                                  -> B x 384 (features)
    head   dropout(0.5); a = sigmoid(FC(512 -> 1)(ReLU(FC(384 -> 512)(f)))) (B x 1);
           logits = fc(f * a)                                            -> B x num_classes

LRF block (Cin -> Cout; every conv keeps the spatial size; each branch conv is followed by
BN + ReLU; DS = depthwise k x k conv then pointwise 1x1 conv, both without bias):

    b0: DS1x1(Cin->Cout) -> DS3x3
    b1: DS1x1 -> DS3x3 -> conv3x3 dilation 3
    b2: DS1x1 -> DS5x5 -> conv3x3 dilation 3
    b3: DS1x1 -> DS5x5 -> conv3x3 dilation 5
    out = ReLU(0.1 * DS1x1(concat(b0..b3): 4Cout -> Cout, no BN, bias) + BN(DS1x1(x): Cin -> Cout))

Init (``init=``): ``"authors"`` (default): every layer at PyTorch's default init, as the authors'
model.py leaves it (convs Kaiming-uniform with a = sqrt(5)); ``"ours"``: convs Kaiming-normal
(fan_out, ReLU gain; 2.45x the default's std), conv biases 0. BN weight 1 / bias 0 either way.

Notes: DESIGN 4.4 lists nine LRF blocks (2 + 5 + 2, widths above); the issue says "eleven". We
build the nine listed (``LRF_STAGES`` below; a stage is one line to change). The maxpools are
3x3 stride 2 padding 1 (the stem's, reused). The scalar attention sees the dropped-out features.
"""
from __future__ import annotations

import torch
from torch import nn

from models.adsr import check_init
from models.registry import register_model

# (in, out) widths of the LRF blocks; a 3x3 s2 maxpool follows stages 0 and 1.
LRF_STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((64, 64), (64, 128)),
    ((128, 192), (192, 224), (224, 256), (256, 288), (288, 320)),
    ((320, 320), (320, 384)),
)
FUSION_SCALE = 0.1


class DepthwiseSeparable(nn.Sequential):
    """Depthwise k x k conv (groups = Cin), then pointwise 1x1 conv.

    Shapes: B x Cin x H x W -> B x Cout x H x W.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 bias: bool = False) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2,
                      groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=bias),
        )


def _bn_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def _dilated(channels: int, dilation: int) -> nn.Sequential:
    conv = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
    return _bn_relu(conv, channels)


class LRFBlock(nn.Module):
    """Lightweight receptive-field block; B x Cin x H x W -> B x Cout x H x W.

    Args:
        in_channels: Cin.
        out_channels: Cout (each branch's width, and the output width).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        c = out_channels

        def ds(cin: int, k: int) -> nn.Sequential:
            return _bn_relu(DepthwiseSeparable(cin, c, k), c)

        self.branch0 = nn.Sequential(ds(in_channels, 1), ds(c, 3))
        self.branch1 = nn.Sequential(ds(in_channels, 1), ds(c, 3), _dilated(c, 3))
        self.branch2 = nn.Sequential(ds(in_channels, 1), ds(c, 5), _dilated(c, 3))
        self.branch3 = nn.Sequential(ds(in_channels, 1), ds(c, 5), _dilated(c, 5))
        self.fuse = DepthwiseSeparable(4 * c, c, 1, bias=True)
        self.shortcut = nn.Sequential(DepthwiseSeparable(in_channels, c, 1), nn.BatchNorm2d(c))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)]
        fused = self.fuse(torch.cat(branches, dim=1))  # B x Cout x H x W
        return self.relu(FUSION_SCALE * fused + self.shortcut(x))


class LRFCNN(nn.Module):
    """LRF-CNN classifier (see module docstring).

    Args:
        num_classes: classifier outputs (0: identity ``fc``; the attention still applies).
        in_chans: input channels.
        drop_rate: dropout on the pooled features (0.5 in the paper).
        init: ``"authors"`` (default) or ``"ours"`` (see the module docstring).
    """

    def __init__(self, num_classes: int, in_chans: int = 3, drop_rate: float = 0.5,
                 init: str = "authors") -> None:
        super().__init__()
        self.in_chans = in_chans
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        for index, widths in enumerate(LRF_STAGES):
            layers: list[nn.Module] = [LRFBlock(cin, cout) for cin, cout in widths]
            if index < len(LRF_STAGES) - 1:
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.num_features = LRF_STAGES[-1][-1][1]  # 384
        self.head_drop = nn.Dropout(drop_rate)
        self.attention = nn.Sequential(
            nn.Linear(self.num_features, 512), nn.ReLU(inplace=True),
            nn.Linear(512, 1), nn.Sigmoid())
        for m in self.modules() if check_init(init) == "ours" else ():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc`` with a fresh ``Linear(384, num_classes)`` (identity when 0)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """B x in_chans x H x W -> B x 384."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))  # global average pool

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """B x 384 -> B x num_classes: dropout, scalar attention, linear."""
        features = self.head_drop(features)
        return self.fc(features * self.attention(features))  # attention: B x 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def lrf_cnn(num_classes: int, in_chans: int = 3, drop_rate: float = 0.5, init: str = "authors") -> LRFCNN:
    """LRF-CNN (nine LRF blocks, 384-d features, scalar-attention head)."""
    return LRFCNN(num_classes, in_chans, drop_rate, init)
