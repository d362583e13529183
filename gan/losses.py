"""GCGAN's losses: hinge with random targets, and the discriminator's reconstruction loss
(DIM paper; DESIGN 4.5; the authors' ``Generation_GCGAN/train.py``).

Hinge with random targets t ~ U(0.8, 1), drawn per logit:

    L_D,real = mean relu(t - D(x))  +  rec(x)          rec: see below
    L_D,fake = mean relu(t + D(G(z)))                  (G(z) detached)
    L_G      = -mean D(G(z))

Reconstruction (FastGAN's self-supervision of D on real images): the three decoders' outputs
``rec_all``, ``rec_small``, ``rec_part`` (B x 3 x m x m) are compared with the real batch, the
real batch again, and its quadrant ``part`` (at half the full resolution), each resized to m
(nearest, as the authors' ``F.interpolate``). The authors use LPIPS-VGG and SUM it over the batch
(not a mean), so its weight grows with the batch size; we keep that form for both distances:

* ``lpips``: LPIPS (Zhang et al., CVPR 2018) with a VGG16 backbone. The network and its learned
  linear layers come from torchmetrics (its bundled LPIPS weights); the VGG16 ImageNet weights,
  which cannot be downloaded here, come from a user-given file (a torchvision ``vgg16`` state
  dict, loaded with ``weights_only=True``).
* ``l1`` (the default without that file): per-image mean absolute error, summed over the batch.

``result.json`` and every checkpoint say which one a run used (``ReconstructionLoss.name``).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from gan.discriminator import crop_part
from medbalance.errors import ConfigError


def random_targets(logits: torch.Tensor) -> torch.Tensor:
    """U(0.8, 1) per logit (float32)."""
    return torch.rand_like(logits, dtype=torch.float32) * 0.2 + 0.8


def d_real_hinge(logits: torch.Tensor) -> torch.Tensor:
    return F.relu(random_targets(logits) - logits.float()).mean()


def d_fake_hinge(logits: torch.Tensor) -> torch.Tensor:
    return F.relu(random_targets(logits) + logits.float()).mean()


def g_hinge(logits: torch.Tensor) -> torch.Tensor:
    return -logits.float().mean()


# VGG16 ``features`` indices in each LPIPS slice (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_VGG_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))


def _lpips_vgg(weights_path: str) -> nn.Module:
    """torchmetrics' LPIPS-VGG network with the VGG16 weights of ``weights_path``."""
    try:
        from torchmetrics.functional.image.lpips import _NoTrainLpips
    except ImportError as exc:  # another torchmetrics layout
        raise ConfigError(f"this torchmetrics has no LPIPS network ({exc}); use the L1 reconstruction loss "
                          "(leave out the LPIPS weight file)") from exc
    if not os.path.isfile(weights_path):
        raise ConfigError(f"LPIPS VGG16 weight file {weights_path} does not exist")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad files
        raise ConfigError(f"{weights_path} is not a state dict that loads with weights_only=True: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    # pnet_rand: no ImageNet download; the linear layers come from torchmetrics' bundled file.
    net = _NoTrainLpips(net="vgg", pnet_rand=True, pretrained=True)
    mapped = {}
    for slice_index, indices in _VGG_SLICES:
        for i in indices:
            for name in ("weight", "bias"):
                key = next((k for k in (f"features.{i}.{name}", f"{i}.{name}") if k in state), None)
                if key is not None:
                    mapped[f"net.slice{slice_index}.{i}.{name}"] = state[key]
    expected = {k for k in net.state_dict() if k.startswith("net.")}
    if set(mapped) != expected:
        raise ConfigError(f"{weights_path} is not a torchvision vgg16 state dict: missing "
                          f"{sorted(expected - set(mapped))[:4]} (want keys features.N.weight/bias)")
    try:
        net.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"{weights_path}: the VGG16 weights do not fit ({str(exc)[:300]})") from exc
    return net


class ReconstructionLoss(nn.Module):
    """Distance between reconstructions and targets, per image, summed over the batch.

    Args:
        lpips_weights: a torchvision VGG16 state-dict file for LPIPS-VGG; None uses L1.
    """

    def __init__(self, lpips_weights: str | None = None):
        super().__init__()
        self.lpips = _lpips_vgg(lpips_weights) if lpips_weights else None
        self.name = f"lpips-vgg ({os.path.basename(lpips_weights)})" if lpips_weights else "l1"

    def distance(self, rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum over the batch of per-image distances; ``target`` is resized to ``rec``'s side."""
        target = F.interpolate(target, size=rec.shape[-1]).float()
        rec = rec.float()
        if self.lpips is None:
            return (rec - target).abs().mean(dim=(1, 2, 3)).sum()
        return self.lpips(rec, target).sum()

    def forward(self, real: torch.Tensor, recs: list[torch.Tensor], part: int) -> torch.Tensor:
        rec_all, rec_small, rec_part = recs
        return (self.distance(rec_all, real) + self.distance(rec_small, real)
                + self.distance(rec_part, crop_part(real, part)))
