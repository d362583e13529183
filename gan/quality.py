"""How good and how new are synthetic images: FID, KID, and nearest real neighbours.

* **FID** (Heusel et al., NeurIPS 2017): ||mu_r - mu_s||^2 + Tr(S_r + S_s - 2 (S_r S_s)^(1/2)) of
  the two feature distributions; **KID** (Binkowski et al., ICLR 2018): the unbiased MMD^2 with
  the cubic polynomial kernel, mean and std over random subsets. Both from torchmetrics
  (``FrechetInceptionDistance``, ``KernelInceptionDistance``); the features are extracted once
  (``gan.features.extract``) and handed to them through an identity "feature module", so FID,
  KID and the neighbour check use the very same vectors. With few images (a minority class)
  FID is biased upwards and noisy: compare runs at equal image counts, and read KID too.
* **Nearest real neighbour** (memorisation check): for each synthetic image, the distance to its
  closest real TRAINING image, in feature space (L2) and pixel space (RMS difference of the
  images resized to a common side, in [0, 1]); against the same distance for each real image to
  its closest OTHER real image (real-vs-real, leave one out). A synthetic image closer to a real
  one than ``ratio`` x the real-vs-real median (default 0.25) is flagged as a likely copy; with a
  single real image (no real-vs-real distribution) only exact pixel copies (RMS < 1/255) are.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


class _Precomputed(nn.Module):
    """torchmetrics' "feature extractor" for features computed beforehand: the identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(real: torch.Tensor, synthetic: torch.Tensor, kid_subsets: int = 100) -> dict:
    """FID and KID between two feature sets (N x D and M x D, float64).

    Returns ``fid``, ``kid_mean``, ``kid_std``, ``kid_subset_size`` (min(50, N, M)) and the counts;
    a value is None (with ``note``) when a set is too small (FID needs 2 of each).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n, m = len(real), len(synthetic)
    out = {"n_real": n, "n_synthetic": m, "fid": None, "kid_mean": None, "kid_std": None, "kid_subset_size": None}
    if min(n, m) < 2:
        out["note"] = "FID/KID need at least 2 real and 2 synthetic images"
        return out
    dims = real.shape[1]
    fid = FrechetInceptionDistance(feature=_Precomputed(dims), normalize=True)
    fid.update(real, real=True)
    fid.update(synthetic, real=False)
    out["fid"] = float(fid.compute())
    subset = min(50, n, m)
    with warnings.catch_warnings():  # "will save all extracted features": they are ours already
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(dims), subsets=kid_subsets, subset_size=subset,
                                      normalize=True)
    kid.update(real.float(), real=True)
    kid.update(synthetic.float(), real=False)
    mean, std = kid.compute()
    out.update(kid_mean=float(mean), kid_std=float(std), kid_subset_size=subset)
    return out


def nearest(query: torch.Tensor, reference: torch.Tensor, exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, ``(distance, index)`` of its nearest reference row (L2).

    ``exclude_self``: query IS reference; a row's own match does not count (leave one out).
    """
    dist = torch.cdist(query.double(), reference.double())
    if exclude_self:
        dist.fill_diagonal_(float("inf"))
    return dist.min(dim=1)


def pixels(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 N x 3 x H x W -> N x (3 side^2) float64 in [0, 1], scaled by 1/sqrt(D) so that the
    L2 distance of two rows is their RMS pixel difference."""
    x = images.float() / 255.0
    if x.shape[-1] != side or x.shape[-2] != side:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    flat = x.flatten(1).double()
    return flat / flat.shape[1] ** 0.5


def _quantiles(values: torch.Tensor) -> dict | None:
    if len(values) == 0:
        return None
    qs = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs)}


def neighbour_check(real: torch.Tensor, synthetic: torch.Tensor, ratio: float = 0.25,
                    exact: float | None = None) -> dict:
    """Synthetic-to-nearest-real distances vs real-to-nearest-other-real, in one space.

    Args:
        real, synthetic: N x D and M x D (features, or ``pixels`` rows).
        ratio: flag a synthetic image closer than ``ratio`` x the real-vs-real median.
        exact: with fewer than 2 real rows, flag distances below this (None: flag nothing).

    Returns:
        ``synthetic_to_real`` and ``real_to_real`` quantiles, ``median_ratio`` (synthetic median /
        real median; ~1 = as far from the training images as they are from each other, ~0 =
        copies), ``threshold``, ``flagged`` (count), ``flagged_fraction``, ``flagged_indices``,
        and per synthetic image ``distance`` and ``nearest`` (index into ``real``).
    """
    d_sr, index = nearest(synthetic, real)
    d_rr = nearest(real, real, exclude_self=True)[0] if len(real) > 1 else torch.zeros(0, dtype=torch.float64)
    median_rr = float(d_rr.median()) if len(d_rr) else None
    threshold = ratio * median_rr if median_rr is not None else exact
    flagged = (d_sr < threshold) if threshold is not None else torch.zeros(len(d_sr), dtype=torch.bool)
    median_sr = float(d_sr.median()) if len(d_sr) else None
    return {
        "synthetic_to_real": _quantiles(d_sr), "real_to_real": _quantiles(d_rr),
        "median_ratio": (median_sr / median_rr) if median_rr and median_sr is not None else None,
        "threshold": threshold, "flagged": int(flagged.sum()),
        "flagged_fraction": float(flagged.float().mean()) if len(flagged) else 0.0,
        "flagged_indices": [int(i) for i in torch.nonzero(flagged).flatten()],
        "distance": [float(d) for d in d_sr], "nearest": [int(i) for i in index],
    }


def closest_pairs_png(synthetic: torch.Tensor, real: torch.Tensor, pixel: dict, feature: dict | None,
                      count: int = 8, side: int = 96) -> bytes:
    """PNG, one row per synthetic image (the ``count`` closest to a real one in pixel space):
    synthetic | its nearest real in pixel space | its nearest real in feature space."""
    from gan.sampling import grid_png

    order = sorted(range(len(pixel["distance"])), key=lambda i: pixel["distance"][i])[:count]
    tiles = []
    for i in order:
        row = [synthetic[i], real[pixel["nearest"][i]]]
        if feature is not None:
            row.append(real[feature["nearest"][i]])
        tiles += [F.interpolate(t[None].float(), size=(side, side), mode="bilinear", antialias=True,
                                align_corners=False)[0].round().clamp(0, 255).to(torch.uint8) for t in row]
    return grid_png(torch.stack(tiles), nrow=3 if feature is not None else 2)
