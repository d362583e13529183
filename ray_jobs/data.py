"""The training data path: shards -> Ray Data (resample, decode, augment) -> worker shards.

Decoding and augmentation run in Ray Data ``map_batches`` tasks, on the CPUs the training workers
leave free, and overlap the training step. Batches leave the pipeline as uint8
``N x 3 x S x S`` (4x less to move than float32); the training step normalises on its device.

Augmentation presets (``augment=``):

* ``adsr`` (ADSR-Net paper's training setup, DESIGN 4.1): RandomResizedCrop(scale 0.2-1),
  ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, rotation +-45 deg, Gaussian blur with p 0.5, h-flip;
* ``lrf`` (DIM paper: none): resize only;
* ``light``: RandomResizedCrop(scale 0.7-1) + h-flip;
* ``none``: resize only. Validation/test always resize only.

Re-sampling of the train split (``sampling=``): Ray Data has no weighted sampler, so each row is
repeated ``k ~ Poisson(r_c)`` times, with the class rate ``r_c`` computed from the manifest's
per-class counts (the shard index) so that an epoch holds, in expectation, as many rows as the
split and classes in proportion ``1`` (``class_balanced``) or ``sqrt(n_c)`` (``sqrt``).

Shuffling: ``preprocess_batch(shuffle=True)`` permutes the rows of each block it gets; the block
order is randomised in ``ray_jobs.train.build_dataset``.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torchvision.transforms import v2

from medbalance.errors import ConfigError
from shards.reader import decode_to_chw

AUGMENT_PRESETS = ("adsr", "lrf", "light", "none")
SAMPLING = ("none", "class_balanced", "sqrt")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(preset: str, image_size: int, train: bool) -> v2.Transform:
    """uint8 3 x H x W tensor -> uint8 3 x S x S tensor."""
    if preset not in AUGMENT_PRESETS:
        raise ConfigError(f"unknown augment preset {preset!r}; use one of {AUGMENT_PRESETS}")
    size = (image_size, image_size)
    if not train or preset in ("lrf", "none"):
        return v2.Resize(size, antialias=True)
    if preset == "light":
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True),
                           v2.RandomHorizontalFlip()])
    blur_kernel = max(3, (image_size // 10) | 1)  # odd, ~10% of the side
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomRotation(45),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
    ])


def sampling_rates(class_counts: list[int], sampling: str) -> list[float] | None:
    """Expected repeats per row of each class, so an epoch keeps its size but not its mix."""
    if sampling not in SAMPLING:
        raise ConfigError(f"unknown sampling {sampling!r}; use one of {SAMPLING}")
    if sampling == "none":
        return None
    total = sum(class_counts)
    present = [n for n in class_counts if n > 0]
    if sampling == "class_balanced":
        share = [1.0 / len(present) if n else 0.0 for n in class_counts]
    else:
        norm = sum(math.sqrt(n) for n in present)
        share = [math.sqrt(n) / norm for n in class_counts]
    return [total * s / n if n else 0.0 for s, n in zip(share, class_counts)]


def preprocess_batch(batch: dict, *, image_size: int, augment: str, train: bool,
                     rates: list[float] | None = None, seed: int | None = None,
                     shuffle: bool = False, keep_source: bool = False) -> dict:
    """Ray Data ``map_batches`` function (numpy format).

    Args:
        batch: ``image`` (encoded bytes, N), ``label`` (N), ``source`` (N).
        rates: per-class expected repeats (re-sampling), or None.
        seed: seeds the re-sampling draw and the shuffle of this batch (with its first source)
            when given; None draws fresh each epoch.
        shuffle: return the rows in a random order.
        keep_source: pass the ``source`` column through (inference); training drops it.

    Returns:
        ``image`` uint8 M x 3 x S x S, ``label`` int64 M (M = N unless re-sampled).
    """
    images, labels, sources = batch["image"], np.asarray(batch["label"], dtype=np.int64), batch["source"]
    if (rates is not None or shuffle) and len(labels):
        rng = (np.random.default_rng([seed, zlib.crc32(str(sources[0]).encode())])
               if seed is not None else np.random.default_rng())
        index = np.arange(len(labels))
        if rates is not None:
            index = np.repeat(index, rng.poisson(np.asarray(rates)[labels]))
        if shuffle:
            index = rng.permutation(index)
        images, labels, sources = images[index], labels[index], sources[index]
    transform = build_transform(augment, image_size, train)
    out = np.empty((len(labels), 3, image_size, image_size), dtype=np.uint8)
    for i, data in enumerate(images):
        chw = torch.from_numpy(decode_to_chw(data, f"row {sources[i]}"))
        out[i] = transform(chw).numpy()
    result = {"image": out, "label": labels}
    if keep_source:
        result["source"] = sources
    return result


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x H x W on any device -> float32 ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean) / std


def plan_cpus(num_workers: int, use_gpu: bool, cpus_per_worker: float | None = None,
              data_fraction: float = 0.25) -> float:
    """CPUs per training worker, leaving about ``data_fraction`` of the cluster to Ray Data.

    With every CPU given to training workers the Ray Data pipeline stalls (DESIGN 5); so each of
    ``num_workers`` gets ``(cluster CPUs - reserve) / num_workers``, reserve =
    ``max(1, data_fraction * cluster CPUs)``. On 2 CPUs with 2 workers: 0.5 each, 1 for data.
    """
    import ray

    if cpus_per_worker is not None:
        return float(cpus_per_worker)
    total = float(ray.cluster_resources().get("CPU", 0))
    reserve = max(1.0, data_fraction * total)
    per_worker = (total - reserve) / num_workers
    if per_worker < 0.1:
        raise ConfigError(
            f"the cluster has {total:g} CPUs: too few for {num_workers} training workers plus the "
            f"data pipeline ({reserve:g} CPUs); use fewer --num-workers or a bigger cluster"
        )
    return round(min(per_worker, 8.0 if use_gpu else per_worker), 2)
