"""GCGAN discriminator: FastGAN's two-branch discriminator with GCBlocks and self-supervised
decoders (DIM paper, DESIGN 4.5, Fig. iii).

    forward([big B x 3 x S x S, small B x 3 x m x m], part) -> (logits, reconstructions or None)

Written from DESIGN 4.5 and the authors' ``Generation_GCGAN/models.py`` (read, not copied).

* Channels: a feature map of side r in the big branch has ``int(multiplier[2 r] * ndf)``
  channels, multipliers {4: 16, 8: 16, 16: 8, 32: 4, 64: 2, 128: 1, 256: 0.5, 512: 0.25,
  1024: 0.125}, ndf = 64 (so 16 channels at 256 x 256 ... 512 at 8 x 8, as the authors).
* ``DownFromBig`` brings the image to T = min(S, 256): at 1024 two SNconv4x4 stride 2 (the second
  with BN), at 512 one, at 256 (and, ours, below) one SNconv3x3 stride 1; LeakyReLU(0.2).
* ``DownBlockComp`` at each halving down to 8 x 8: (main + direct) / 2, main = SNconv4x4 s2, BN,
  LReLU, SNconv3x3, BN, LReLU; direct = AvgPool2, SNconv1x1, BN, LReLU.
* GCBlocks gate the 32, 16 and 8 maps with the 256, 128 and 64 maps (the authors' se_2_16,
  se_4_32, se_8_64: ratio 8). Ours below 256: the pairs whose source exists, with the ratio
  min(8, T / 8): 128 keeps 128->16 and 64->8, 64 keeps 64->8, 32 uses 32->8.
* The small branch reads the m x m image (m = min(128, S / 2)): SNconv4x4 s2 + LReLU, then
  ``DownBlock``s (SNconv4x4 s2, BN, LReLU) to 8 x 8; a map of side r has multiplier[4 r] * ndf
  channels.
* Logits: big branch SNconv1x1 + BN + LReLU + SNconv4x4 (8 x 8 -> 5 x 5), small branch SNconv4x4;
  both flattened and concatenated: B * 25 * 2 logits per call (hinge loss averages them).
* For real images (``part`` given), three ``SimpleDecoder``s reconstruct m x m images: the whole
  image from the 8 x 8 big-branch features, the whole image from the small branch, and quadrant
  ``part`` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) from that quadrant of the
  16 x 16 features. Decoder widths: the authors fix 32; ours is ndf / 2 (32 at ndf = 64), and a
  decoder has log2(m / 8) up blocks (4 at the authors' m = 128).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gan.gc_block import GCBlock
from gan.generator import check_image_size, small_size
from gan.layers import GLU, channels, init_weights, sn_conv

D_MULTIPLIERS = {4: 16, 8: 16, 16: 8, 32: 4, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}
DECODER_MULTIPLIERS = {16: 4, 32: 2, 64: 2, 128: 1}


def discriminator_gc_pairs(image_size: int) -> list[tuple[int, int]]:
    """(source, target) feature sides joined by a GCBlock in the big branch."""
    top = min(image_size, 256)
    ratio = min(8, top // 8)
    return [(t * ratio, t) for t in (32, 16, 8) if t * ratio <= top]


def _lrelu() -> nn.Module:
    return nn.LeakyReLU(0.2)


class DownBlock(nn.Module):
    """B x C_in x H x W -> B x C_out x H/2 x W/2: SNconv4x4 s2, BN, LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.main = nn.Sequential(sn_conv(in_channels, out_channels, 4, 2, 1), nn.BatchNorm2d(out_channels), _lrelu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class DownBlockComp(nn.Module):
    """B x C_in x H x W -> B x C_out x H/2 x W/2: (main + direct) / 2, a residual down block."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.main = nn.Sequential(
            sn_conv(in_channels, out_channels, 4, 2, 1), nn.BatchNorm2d(out_channels), _lrelu(),
            sn_conv(out_channels, out_channels, 3, 1, 1), nn.BatchNorm2d(out_channels), _lrelu())
        self.direct = nn.Sequential(nn.AvgPool2d(2, 2), sn_conv(in_channels, out_channels, 1),
                                    nn.BatchNorm2d(out_channels), _lrelu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.main(x) + self.direct(x)) / 2


class SimpleDecoder(nn.Module):
    """B x C x h x w -> B x 3 x out x out (tanh): AdaptiveAvgPool to 8 x 8, then up blocks
    (nearest upsample, SNconv3x3, BN, GLU) to ``out``, then SNconv3x3 -> 3."""

    def __init__(self, in_channels: int, out_size: int, width: int = 32):
        super().__init__()
        nfc = channels(DECODER_MULTIPLIERS, width)
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(8)]
        size, ch = 16, in_channels
        while size <= out_size:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), sn_conv(ch, nfc[size] * 2, 3, 1, 1),
                       nn.BatchNorm2d(nfc[size] * 2), GLU()]
            size, ch = size * 2, nfc[size]
        layers += [sn_conv(ch, 3, 3, 1, 1), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _down_from_big(image_size: int, nfc: dict[int, int]) -> nn.Module:
    if image_size == 1024:
        return nn.Sequential(sn_conv(3, nfc[1024], 4, 2, 1), _lrelu(),
                             sn_conv(nfc[1024], nfc[512], 4, 2, 1), nn.BatchNorm2d(nfc[512]), _lrelu())
    if image_size == 512:
        return nn.Sequential(sn_conv(3, nfc[512], 4, 2, 1), _lrelu())
    return nn.Sequential(sn_conv(3, nfc[2 * image_size], 3, 1, 1), _lrelu())


def crop_part(images: torch.Tensor, part: int) -> torch.Tensor:
    """Quadrant ``part`` of B x C x H x W images: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right."""
    h, w = images.shape[2] // 2, images.shape[3] // 2
    rows, cols = (slice(None, h), slice(h, None)), (slice(None, w), slice(w, None))
    return images[:, :, rows[part // 2], cols[part % 2]]


class Discriminator(nn.Module):
    """GCGAN discriminator.

    ``forward(images, part=None)``: ``images`` is ``[big, small]`` (the generator's two outputs)
    or one B x 3 x S x S tensor (a real batch; resized here to S and m, nearest, as the authors).
    Returns ``(logits, None)`` or, with ``part`` in 0..3, ``(logits, [rec_all, rec_small,
    rec_part])``, each B x 3 x m x m; ``logits`` is flat, B * 50 values (5 x 5 per branch).

    Args:
        image_size: S, a power of two from 32 to 1024.
        ndf: width (64 as the authors).
    """

    def __init__(self, image_size: int = 256, ndf: int = 64):
        super().__init__()
        check_image_size(image_size)
        self.image_size, self.small_size = image_size, small_size(image_size)
        nfc = channels(D_MULTIPLIERS, ndf)
        top = min(image_size, 256)
        self.down_from_big = _down_from_big(image_size, nfc)
        self.downs = nn.ModuleDict({str(r // 2): DownBlockComp(nfc[2 * r], nfc[r]) for r in _halvings(top)})
        self.gc_pairs = discriminator_gc_pairs(image_size)
        self.gc = nn.ModuleDict({str(target): GCBlock(nfc[2 * source], nfc[2 * target])
                                 for source, target in self.gc_pairs})
        self.logits_big = nn.Sequential(sn_conv(nfc[16], nfc[8], 1), nn.BatchNorm2d(nfc[8]), _lrelu(),
                                        sn_conv(nfc[8], 1, 4))
        m = self.small_size
        small: list[nn.Module] = [sn_conv(3, nfc[2 * m], 4, 2, 1), _lrelu()]
        small += [DownBlock(nfc[4 * r], nfc[2 * r]) for r in _halvings(m // 2)]
        self.down_from_small = nn.Sequential(*small)
        self.logits_small = sn_conv(nfc[32], 1, 4)
        width = max(1, ndf // 2)
        self.decoder_big = SimpleDecoder(nfc[16], m, width)
        self.decoder_small = SimpleDecoder(nfc[32], m, width)
        self.decoder_part = SimpleDecoder(nfc[32], m, width)
        self.apply(init_weights)

    def forward(self, images, part: int | None = None):
        if isinstance(images, torch.Tensor):
            images = [F.interpolate(images, size=self.image_size), F.interpolate(images, size=self.small_size)]
        big, small = images
        sources = {target: source for source, target in self.gc_pairs}
        feat = self.down_from_big(big)                               # B x C x T x T
        feats = {feat.shape[-1]: feat}
        while feat.shape[-1] > 8:
            side = feat.shape[-1] // 2
            feat = self.downs[str(side)](feat)
            if side in sources:
                feat = self.gc[str(side)](feats[sources[side]], feat)
            feats[side] = feat
        feat_small = self.down_from_small(small)                     # B x C x 8 x 8
        logits = torch.cat([self.logits_big(feats[8]).flatten(), self.logits_small(feat_small).flatten()])
        if part is None:
            return logits, None
        quadrant = crop_part(feats[16], part)                        # B x C x 8 x 8
        return logits, [self.decoder_big(feats[8]), self.decoder_small(feat_small), self.decoder_part(quadrant)]


def _halvings(side: int) -> list[int]:
    """Sides r from ``side`` down to 16, each halved by one block (to 8 x 8 at the end)."""
    out = []
    while side > 8:
        out.append(side)
        side //= 2
    return out
