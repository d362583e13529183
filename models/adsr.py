"""ADSR module = PSF(GSA(x)): global style-based adaptation, then pixel-wise style-based fusion.

Paper 1 (ADSR-Net). Written from DESIGN 4.1, which summarises the paper and the authors' public
code. Both parts are gates: they rescale their input and keep its shape,
B x C x H x W -> B x C x H x W.

GSA (channel axis). Split the channels into x1 = the first C1 = C // 2 and x2 = the other
C2 = C - C1 (odd C works). For each half i, with k_1 = 3 and k_2 = 7:

    d_i = ReLU(BN(depthwise k_i x k_i conv(x_i)))                   (no bias; statistics only)
    t_i = [mean_HW(d_i); std_HW(d_i)]                                B x C_i x 2 x 1
          std = sqrt(unbiased var + 1e-5)                            (models/style.py)
    g_i = sigmoid(Conv2d(C_i -> C_i, kernel (2, 1), bias)(t_i))      B x C_i x 1 x 1
    GSA(x) = x * concat(g_1, g_2)                                    (the ORIGINAL x is gated)

The (2, 1) conv mixes every channel of its half: 2 * C_i^2 + C_i weights, ~4.2M for C = 2048.
``gsa="channelwise"`` replaces it by SRM's style integration (Lee et al., ICCV 2019, Sec. 3.2):
z_c = w_c1 * mu_c + w_c2 * sigma_c (a depthwise (2, 1) conv, no bias), then BN, then sigmoid:
4 * C_i weights per half. The depthwise branches are kept in both forms; only the mixing differs.
(This variant is ours, not the paper's: for users who cannot afford ~4M parameters per module.)

PSF (spatial axis). s = [max_c x; mean_c x; std_c x] (B x 3 x H x W). Each branch is
BN(conv k x k (3 -> 1, no bias, "same" padding)), BN momentum 0.01, no ReLU (the branches are
computed as one stacked convolution, see PSF);

    PSF(x) = x * sigmoid(mean over the listed kernels k of branch_k(s))

Default kernels (1, 3, 7). The authors' code computes (A + B3 + B3) / 3, i.e. the SAME 3x3 branch
counted twice (likely a slip for a 7x7 branch); ``psf_kernels=(1, 3, 3)`` reproduces that form
exactly: a repeated kernel size reuses one branch, it does not build a second one.

Init (``reset_parameters(init)``), two rules:

* ``init="authors"`` (default), as the authors' code leaves it (their ResNet init loop touches only
  keys containing "conv" or "bn", and every bias): the depthwise and PSF convs Kaiming-normal
  (fan_out, ReLU gain); the GSA (2, 1) mixing conv (``fc1``/``fc2`` in their code) at PyTorch's
  default (Kaiming-uniform, a = sqrt(5): std 1/sqrt(6 C_i)) with bias 0;
* ``init="ours"``: every conv Kaiming-normal (fan_out), so the mixing conv's std is 1/sqrt(C_i),
  2.45x the authors'; bias 0.

Both: BN weight 1, bias 0, except PSF's BNs whose weight is 0, so the initial PSF gate is
sigmoid(0) = 0.5 exactly (and PSF's convs receive zero gradient until the BN weights move off 0).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medbalance.errors import ConfigError
from models.style import channel_style, pixel_style

GSA_MODES = ("faithful", "channelwise")
INIT_RULES = ("authors", "ours")
PSF_BN_MOMENTUM = 0.01


def check_init(init: str) -> str:
    if init not in INIT_RULES:
        raise ConfigError(f"init={init!r} is not an init rule; use one of {INIT_RULES}")
    return init


def _init_convs_and_norms(module: nn.Module, norm_weight: float) -> None:
    """Kaiming-normal (fan_out, ReLU gain) conv weights, zero conv biases, BN (norm_weight, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, norm_weight)
            nn.init.zeros_(m.bias)


def _depthwise_bn_relu(channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                  bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


class StyleMix(nn.Conv2d):
    """Conv2d(C, C, kernel (2, 1)) on the B x C x 2 x 1 style tensor; output B x C x 1 x 1.

    ``depthwise=False``: the paper's full conv (with bias), every channel of the half mixed.
    ``depthwise=True``: SRM's channel-wise combination w_c1 * mu_c + w_c2 * sigma_c (no bias).
    On a 2 x 1 input the convolution has one output position, so it is computed as the equivalent
    matrix product (B x 2C @ 2C x C) or per-channel weighted sum: the same function and parameters
    as the Conv2d (so names and shapes match the authors' layer), 1.5-7x faster on CPU.
    """

    def __init__(self, channels: int, depthwise: bool) -> None:
        super().__init__(channels, channels, kernel_size=(2, 1),
                         groups=channels if depthwise else 1, bias=not depthwise)

    def forward(self, style: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            mixed = F.linear(style.flatten(1), self.weight.flatten(1), self.bias)  # B x C
            return mixed[:, :, None, None]
        return (style * self.weight.view(1, -1, 2, 1)).sum(dim=2, keepdim=True)


def _style_mix(channels: int, mode: str) -> nn.Module:
    """B x C x 2 x 1 (mean, std) -> B x C x 1 x 1 pre-sigmoid gate."""
    if mode == "faithful":
        return StyleMix(channels, depthwise=False)
    return nn.Sequential(StyleMix(channels, depthwise=True), nn.BatchNorm2d(channels))


class GSA(nn.Module):
    """Global style-based adaptation (channel gate), see the module docstring.

    Args:
        channels: C (>= 2).
        mode: ``"faithful"`` (full (2, 1) conv per half, as in the paper) or ``"channelwise"``.

    Shapes: B x C x H x W -> B x C x H x W.
    """

    def __init__(self, channels: int, mode: str = "faithful") -> None:
        super().__init__()
        if mode not in GSA_MODES:
            raise ConfigError(f"gsa={mode!r} is not a GSA mode; use one of {GSA_MODES}")
        if channels < 2:
            raise ConfigError(f"GSA needs at least 2 channels to split, got {channels}")
        self.mode = mode
        self.split = (channels // 2, channels - channels // 2)  # (C1, C2)
        self.local1 = _depthwise_bn_relu(self.split[0], 3)
        self.local2 = _depthwise_bn_relu(self.split[1], 7)
        self.mix1 = _style_mix(self.split[0], mode)
        self.mix2 = _style_mix(self.split[1], mode)
        self.reset_parameters()

    def reset_parameters(self, init: str = "authors") -> None:
        """Kaiming-normal (fan_out) convs, zero conv biases, BN weight 1 / bias 0; with
        ``init="authors"`` the mixing convs at PyTorch's default weights (bias 0)."""
        _init_convs_and_norms(self, norm_weight=1.0)
        if check_init(init) == "authors":
            for m in self.modules():
                if isinstance(m, StyleMix):
                    nn.Conv2d.reset_parameters(m)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, self.split, dim=1)  # B x C1 x H x W, B x C2 x H x W
        g1 = torch.sigmoid(self.mix1(channel_style(self.local1(x1))))  # B x C1 x 1 x 1
        g2 = torch.sigmoid(self.mix2(channel_style(self.local2(x2))))  # B x C2 x 1 x 1
        return x * torch.cat([g1, g2], dim=1).to(x.dtype)


class PSF(nn.Module):
    """Pixel-wise style-based fusion (spatial gate), see the module docstring.

    Args:
        kernels: branch kernel sizes, averaged (odd, >= 1); repeats reuse one branch.

    Shapes: B x C x H x W (C >= 2) -> B x C x H x W.

    Layout: one ``Conv2d(3, 1, k, bias=False)`` per distinct k in ``convs`` and one
    ``BatchNorm2d(n_distinct, momentum=0.01)`` in ``norm`` whose channel i is branch i's BN (a BN
    normalises each channel on its own, so this equals n separate BatchNorm2d(1)). The branch
    convs run as ONE convolution whose weight stacks the kernels zero-padded to the largest size:
    the same function (the padding is constant, its gradient is dropped) in one call, where
    PyTorch's CPU path for separate 3 -> 1 convolutions is slow.
    """

    def __init__(self, kernels: Sequence[int] = (1, 3, 7)) -> None:
        super().__init__()
        if not isinstance(kernels, Sequence) or isinstance(kernels, str):
            raise ConfigError(f"psf_kernels={kernels!r}: need a list of odd kernel sizes, "
                              f"e.g. (1, 3, 7) or the authors' (1, 3, 3)")
        kernels = tuple(kernels)
        if not kernels or not all(isinstance(k, int) and k >= 1 and k % 2 == 1 for k in kernels):
            raise ConfigError(f"psf_kernels={kernels!r}: need a non-empty list of odd ints >= 1, "
                              f"e.g. (1, 3, 7) or the authors' (1, 3, 3)")
        self.kernels = kernels
        distinct = list(dict.fromkeys(kernels))  # in order
        self.convs = nn.ModuleDict(
            {f"k{k}": nn.Conv2d(3, 1, k, padding=k // 2, bias=False) for k in distinct})
        self.norm = nn.BatchNorm2d(len(distinct), momentum=PSF_BN_MOMENTUM)
        # How often each distinct branch is listed, / len(kernels): the averaging weights.
        self.register_buffer("branch_weights", torch.tensor(
            [kernels.count(k) / len(kernels) for k in distinct]).view(1, -1, 1, 1),
            persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out) convs; BN weight 0 and bias 0, so the initial gate is 0.5."""
        _init_convs_and_norms(self, norm_weight=0.0)

    def branch_maps(self, style: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x n_distinct x H x W: BN_k(conv_k(style)) for each distinct k."""
        size = max(self.kernels)
        weight = torch.cat([F.pad(conv.weight, [(size - conv.kernel_size[0]) // 2] * 4)
                            for conv in self.convs.values()])  # n x 3 x size x size
        return self.norm(F.conv2d(style, weight, padding=size // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.branch_maps(pixel_style(x))  # B x n x H x W
        fused = (maps * self.branch_weights.to(maps.dtype)).sum(dim=1, keepdim=True)
        return x * torch.sigmoid(fused).to(x.dtype)  # gate: B x 1 x H x W


class ADSR(nn.Module):
    """ADSR(x) = PSF(GSA(x)); B x C x H x W -> B x C x H x W.

    Args:
        channels: C (>= 2).
        gsa: ``"faithful"`` or ``"channelwise"`` (see GSA).
        psf_kernels: PSF branch kernels, default (1, 3, 7); (1, 3, 3) is the authors' code form.
        init: ``"authors"`` (default) or ``"ours"`` (see the module docstring).
    """

    def __init__(self, channels: int, gsa: str = "faithful",
                 psf_kernels: Sequence[int] = (1, 3, 7), init: str = "authors") -> None:
        super().__init__()
        self.init = check_init(init)
        self.gsa = GSA(channels, gsa)
        self.psf = PSF(psf_kernels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GSA: Kaiming-normal (fan_out) convs, BN (1, 0), the mixing conv by ``self.init``;
        PSF: Kaiming-normal convs, BN weight 0."""
        self.gsa.reset_parameters(self.init)
        self.psf.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.psf(self.gsa(x))
