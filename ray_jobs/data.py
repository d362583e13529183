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
order is randomised in :func:`build_dataset`.

``build_dataset(cfg, manifest, split)`` puts it together: the pipeline of one split that a training
run reads (the classifier job and the sweep's trials build theirs with it).
"""
from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.transforms import v2

from medbalance.errors import ConfigError
from shards.reader import decode_to_chw

if TYPE_CHECKING:
    from ray_jobs.config import TrainConfig
    from shards.schema import Manifest

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
        batch: ``image`` (encoded bytes, N), ``label`` (N), ``source`` (N), optionally ``path``
            (the shard file, named in decode errors).
        rates: per-class expected repeats (re-sampling), or None.
        seed: seeds the re-sampling draw and the shuffle of this batch (with its first source)
            when given; None draws fresh each epoch.
        shuffle: return the rows in a random order.
        keep_source: pass the ``source`` column through (inference); training drops it.

    Returns:
        ``image`` uint8 M x 3 x S x S, ``label`` int64 M (M = N unless re-sampled).
    """
    images, labels, sources = batch["image"], np.asarray(batch["label"], dtype=np.int64), batch["source"]
    paths = batch.get("path")  # the shard file of each row, where the reader included it
    if paths is None:
        paths = np.full(len(labels), None, dtype=object)
    if (rates is not None or shuffle) and len(labels):
        rng = (np.random.default_rng([seed, zlib.crc32(str(sources[0]).encode())])
               if seed is not None else np.random.default_rng())
        index = np.arange(len(labels))
        if rates is not None:
            index = np.repeat(index, rng.poisson(np.asarray(rates)[labels]))
        if shuffle:
            index = rng.permutation(index)
        images, labels, sources, paths = images[index], labels[index], sources[index], paths[index]
    transform = build_transform(augment, image_size, train)
    out = np.empty((len(labels), 3, image_size, image_size), dtype=np.uint8)
    for i, data in enumerate(images):
        where = f"shard {paths[i]} row {sources[i]}" if paths[i] is not None else f"row {sources[i]}"
        chw = torch.from_numpy(decode_to_chw(data, where))
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


def build_dataset(cfg: "TrainConfig", manifest: "Manifest", split: str):
    """One split's Ray Data pipeline: ``train`` shuffled, re-sampled and augmented; others resized.

    A shard is one Parquet file, which Ray Data reads as one block; decoding a whole shard in one
    task would use one CPU and hold every batch back until the shard is done. So the encoded rows
    are re-blocked first (a streaming repartition, ``data.block_rows`` rows per block): the decode
    map then runs on every CPU left to Ray Data, and batches reach the workers while the epoch
    is still being decoded.

    ``data.cache_encoded`` (default): the encoded blocks are read once, here, into Ray's object
    store, so an epoch does not pay Ray Data's per-read start-up (listing files, reading footers)
    again; each epoch shuffles the train blocks' order (``randomize_block_order``). Turn it off
    for splits larger than the object store: shards are then streamed from storage every epoch,
    train files in a shuffled order. Either way the map permutes the rows of each train block,
    and ingest wrote every split in a seeded random order.
    """
    from ray.data import FileShuffleConfig

    from shards import ray_dataset

    train = split == "train"
    seed = cfg.seed if cfg.reproducible else None
    if train:
        stream_shuffle = None if cfg.data.cache_encoded else FileShuffleConfig(seed=seed)
        ds = ray_dataset(cfg.data.uri, split, include_synthetic=cfg.data.include_synthetic,
                         columns=["image", "label", "source", "synthetic"], shuffle=stream_shuffle,
                         include_paths=True)
        counts = manifest.class_counts(split, include_synthetic=cfg.data.include_synthetic)
        extra = dict(rates=sampling_rates(counts, cfg.data.sampling),
                     seed=seed, shuffle=True)
    else:
        ds = ray_dataset(cfg.data.uri, split, columns=["image", "label", "source"], include_paths=True)
        extra = {}
    if cfg.data.block_rows:
        ds = ds.repartition(target_num_rows_per_block=cfg.data.block_rows)
    if cfg.data.cache_encoded:
        ds = ds.materialize()
        if train:
            ds = ds.randomize_block_order(seed=seed)
    # One call per block (batch_size=None), so the row permutation spans the block.
    return ds.map_batches(preprocess_batch, batch_size=None if cfg.data.block_rows else 64,
                          fn_kwargs=dict(image_size=cfg.data.image_size, augment=cfg.data.augment,
                                         train=train, **extra))


def build_datasets(cfg: "TrainConfig", manifest: "Manifest") -> dict:
    """The pipelines a training run reads: ``{"train": ..., "val": ...}`` (see build_dataset)."""
    return {split: build_dataset(cfg, manifest, split) for split in ("train", "val")}
