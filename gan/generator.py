"""GCGAN generator: FastGAN's generator with GCBlock skips (DIM paper, DESIGN 4.5, Fig. ii).

    z (B x nz) -> InitLayer -> 4x4 -> up blocks -> S x S, returns [image (B x 3 x S x S),
                                                               small image (B x 3 x m x m)]

Written from DESIGN 4.5 and the authors' ``Generation_GCGAN/models.py`` (read, not copied).

* Channels per feature size s: ``int(multiplier[s] * ngf)``, multipliers
  {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}, ngf = 64, nz = 256.
* InitLayer: SN ConvTranspose 4x4 (nz -> 2 C_4, no bias) + BN + GLU: a 4x4 map.
* Up blocks, one per doubling: to 8, 32, 128, 512 an ``UpBlockCompRes`` (main path: upsample,
  SNconv3x3, NoiseInjection, BN, GLU, twice; plus a residual path: upsample, SNconv1x1, BN;
  summed, paper Eq. 7); to 16, 64, 256, 1024 an ``UpBlock`` (upsample, SNconv3x3, BN, GLU).
* GCBlocks (``gan/gc_block.py``) gate the big map with a small one at the pairs
  4->64, 8->128, 16->256, 32->512 (none at 1024, as the authors).
* Heads: ``to_big`` SNconv3x3 (C_S -> 3) and ``to_small`` SNconv1x1 (C_m -> 3), the extra small
  image the discriminator's second branch sees. tanh only at S = 1024; at 256 and 512 the
  authors return raw outputs (as FastGAN), and so do we below 256.

Our extension (the authors build 256, 512 and 1024 only): S may be any power of two from 32 to
1024. Below 256 the top blocks are dropped, the small image is m = min(128, S / 2) (128 at the
authors' sizes), and the GCBlock pairs scale down: pairs (s, r s) for s in 4, 8, 16, 32 with
r s <= min(S, 512), ratio r = min(16, S / 4). So 128 keeps 4->64 and 8->128, 64 keeps 4->64, and
32 uses 4->32 (ratio 8). Every layer the forward pass builds is used, so DDP needs no
``find_unused_parameters``.
"""
from __future__ import annotations

import torch
from torch import nn

from gan.gc_block import GCBlock
from gan.layers import GLU, NoiseInjection, channels, init_weights, sn_conv, sn_conv_transpose

G_MULTIPLIERS = {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}
IMAGE_SIZES = (32, 64, 128, 256, 512, 1024)


def check_image_size(image_size: int) -> None:
    from medbalance.errors import ConfigError

    if image_size not in IMAGE_SIZES:
        raise ConfigError(f"GCGAN image size {image_size} is not supported; use one of {IMAGE_SIZES}")


def small_size(image_size: int) -> int:
    """Side of the generator's second output, which the discriminator's small branch reads."""
    return min(128, image_size // 2)


def generator_gc_pairs(image_size: int) -> list[tuple[int, int]]:
    """(small, big) feature sizes joined by a GCBlock: 4->64 ... 32->512, scaled down below 256."""
    ratio = min(16, image_size // 4)
    return [(s, s * ratio) for s in (4, 8, 16, 32) if s * ratio <= min(image_size, 512)]


class InitLayer(nn.Module):
    """B x nz -> B x C x 4 x 4: SN ConvTranspose 4x4 to 2C channels, BN, GLU."""

    def __init__(self, nz: int, out_channels: int):
        super().__init__()
        self.main = nn.Sequential(sn_conv_transpose(nz, out_channels * 2, 4), nn.BatchNorm2d(out_channels * 2), GLU())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.reshape(z.shape[0], -1, 1, 1))


class UpBlock(nn.Module):
    """B x C_in x H x W -> B x C_out x 2H x 2W: nearest upsample, SNconv3x3, BN, GLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.main = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                  sn_conv(in_channels, out_channels * 2, 3, 1, 1),
                                  nn.BatchNorm2d(out_channels * 2), GLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class UpBlockCompRes(nn.Module):
    """B x C_in x H x W -> B x C_out x 2H x 2W: main path (two noisy SNconv3x3-BN-GLU after an
    upsample) + residual path (upsample, SNconv1x1, BN), summed (paper Eq. 7)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            sn_conv(in_channels, out_channels * 2, 3, 1, 1), NoiseInjection(),
            nn.BatchNorm2d(out_channels * 2), GLU(),
            sn_conv(out_channels, out_channels * 2, 3, 1, 1), NoiseInjection(),
            nn.BatchNorm2d(out_channels * 2), GLU(),
        )
        self.residual = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                      sn_conv(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.residual(x)


class Generator(nn.Module):
    """GCGAN generator. ``forward(z)`` with z: B x nz -> ``[B x 3 x S x S, B x 3 x m x m]``.

    Args:
        image_size: S, a power of two from 32 to 1024.
        nz: noise dimension (256 as the authors).
        ngf: width (64 as the authors; smaller for quick tests).
    """

    def __init__(self, image_size: int = 256, nz: int = 256, ngf: int = 64):
        super().__init__()
        check_image_size(image_size)
        self.image_size, self.nz, self.small_size = image_size, nz, small_size(image_size)
        nfc = channels(G_MULTIPLIERS, ngf)
        self.init = InitLayer(nz, nfc[4])
        self.blocks = nn.ModuleDict()
        size = 8
        while size <= image_size:
            block = UpBlockCompRes if size.bit_length() % 2 == 0 else UpBlock  # 8, 32, 128, 512: res
            self.blocks[str(size)] = block(nfc[size // 2], nfc[size])
            size *= 2
        self.gc_pairs = generator_gc_pairs(image_size)
        self.gc = nn.ModuleDict({str(big): GCBlock(nfc[small], nfc[big]) for small, big in self.gc_pairs})
        self.to_big = sn_conv(nfc[image_size], 3, 3, 1, 1)
        self.to_small = sn_conv(nfc[self.small_size], 3, 1)
        self.apply(init_weights)

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        sources = {big: small for small, big in self.gc_pairs}
        feats = {4: self.init(z)}                                  # B x C_4 x 4 x 4
        size = 8
        while size <= self.image_size:
            feat = self.blocks[str(size)](feats[size // 2])         # B x C_s x s x s
            if size in sources:
                feat = self.gc[str(size)](feats[sources[size]], feat)
            feats[size] = feat
            size *= 2
        big, small = self.to_big(feats[self.image_size]), self.to_small(feats[self.small_size])
        if self.image_size == 1024:
            big, small = torch.tanh(big), torch.tanh(small)
        return [big, small]
