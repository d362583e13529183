"""The training data path: shards -> Ray Data (resample, decode, augment) -> worker shards.

Decoding and augmentation run in Ray Data ``map_batches`` tasks, on the CPUs the training workers
leave free, and overlap the training step. Batches leave the pipeline as uint8
``N x C x S x S`` (4x less to move than float32); the training step normalises on its device.
A dataset with 16-bit, float or DICOM grey rows (``manifest.windowed``) is windowed to [0, 1]
and augmented in float32, and its batches carry 16 bits as int16 (``u * 65535 - 32768``, half the
bytes of float16 with more precision, and a dtype every device supports). What the pipeline needs
to know of the data (channels, window, 8 or 16 bits, mean/std) is one :class:`InputSpec`, resolved
on the driver from the config and the manifest and saved in every checkpoint, so evaluate and
predict prepare images exactly as training did.

Augmentation presets (``augment=``):

* ``adsr``: RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, rotation
  +-45 deg, Gaussian blur with p 0.5, h-flip: the ADSR-Net authors' recipe (DESIGN 4.1) with a
  milder hue jitter (0.1: a 0.4 hue shift turns pink histology or dermoscopy green);
* ``adsr_paper``: exactly the authors' (their dataloaders_isic.py): the same with hue 0.4;
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

torch and torchvision are imported inside the functions that use them: Ray Data's coordinator
actors (a run's ``SplitCoordinator`` and ``DatasetManager``) unpickle the pipeline, so they import
this module but never call those functions, and importing torch costs each of them ~2 s of CPU.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import TYPE_CHECKING

import numpy as np

from medbalance.errors import ConfigError
from shards.reader import decode_to_chw

from ray_jobs.classifier.config import AUGMENT_PRESETS, SAMPLING

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import v2

    from ray_jobs.classifier.config import TrainConfig
    from shards.schema import Manifest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# One grey channel with ImageNet statistics: the mean of the three (as timm does for in_chans=1).
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = (0.449,), (0.226,)
INT16_OFFSET, UINT16_MAX = 32768, 65535


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How stored images become the model's input (saved in checkpoints as ``state["input"]``).

    Attributes:
        channels: 1 (grey; RGB rows as luma) or 3 (grey rows repeated).
        depth: 8 (uint8 batches) or 16 (int16 batches, for datasets with windowed rows).
        window: the window of 16-bit/float/DICOM rows (``shards/intensity.py``).
        frames: ``--frames`` of the dataset (predict on multi-page/-frame original files).
        mean, std: per channel, of the [0, 1] input (``normalize``).
    """

    channels: int = 3
    depth: int = 8
    window: str = "auto"
    frames: str | None = None
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @classmethod
    def from_dict(cls, data: dict | None) -> "InputSpec":
        """From a checkpoint's ``state["input"]``; checkpoints made before it existed get the defaults."""
        data = dict(data or {})
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}


def input_spec(cfg: "TrainConfig", manifest: "Manifest") -> InputSpec:
    """The InputSpec of a training run: ``data.channels``/``data.normalize`` and the manifest.

    Raises:
        ConfigError: ``normalize: dataset`` on a dataset whose manifest has no pixel statistics.
    """
    channels = cfg.data.channels
    key = "grey" if channels == 1 else "rgb"
    if cfg.data.normalize == "dataset":
        stats = (manifest.pixel_stats or {}).get(key)
        if not stats:
            raise ConfigError(f"data.normalize = 'dataset' needs the train split's mean/std in the manifest of "
                              f"{cfg.data.uri}, which was made before they were recorded; re-create it with "
                              "`python -m ray_jobs.prepare ... --overwrite`, or use normalize: imagenet")
        mean, std = tuple(stats["mean"]), tuple(max(s, 1e-6) for s in stats["std"])
    else:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD)
    intensity = manifest.intensity or {}
    return InputSpec(channels=channels, depth=16 if manifest.windowed else 8, window=manifest.window,
                     frames=intensity.get("frames"), mean=mean, std=std)


def resize(images: torch.Tensor, image_size: int, *, skip_same_size: bool = True) -> torch.Tensor:
    """Bilinear resize with antialiasing, computed in float32: what evaluate, predict and the
    exported model (``ray_jobs.classifier.export``) all do.

    Args:
        images: C x H x W or N x C x H x W, uint8 or float.
        image_size: the side S of the output.
        skip_same_size: return ``images`` unchanged when H = W = S (as torchvision's Resize does);
            the exported model, whose H and W are symbolic, always interpolates (the same values:
            at scale 1 the filter's weights are 1 and 0).

    Returns:
        The same layout at S x S, the input's dtype: uint8 rounded half to even and clamped.
        Not torchvision's ``v2.Resize``: on uint8 it takes a fixed-point path that no ONNX runtime
        reproduces (1 level off on ~15% of pixels), so an exported model could not match predict.
    """
    import torch
    import torch.nn.functional as F

    if skip_same_size and tuple(images.shape[-2:]) == (image_size, image_size):
        return images
    batch = images if images.dim() == 4 else images.unsqueeze(0)
    out = F.interpolate(batch.float(), size=(image_size, image_size), mode="bilinear", align_corners=False,
                        antialias=True)
    if images.dtype == torch.uint8:
        out = out.round().clamp(0.0, 255.0).to(torch.uint8)
    elif out.dtype != images.dtype:
        out = out.to(images.dtype)
    return out if images.dim() == 4 else out.squeeze(0)


def build_transform(preset: str, image_size: int, train: bool) -> v2.Transform:
    """C x H x W tensor -> C x S x S tensor (uint8, or float in [0, 1]; C = 1 or 3).

    Resize-only presets and evaluation return :func:`resize` (a plain callable)."""
    import functools

    from torchvision.transforms import v2

    if preset not in AUGMENT_PRESETS:
        raise ConfigError(f"unknown augment preset {preset!r}; use one of {AUGMENT_PRESETS}")
    size = (image_size, image_size)
    if not train or preset in ("lrf", "none"):
        return functools.partial(resize, image_size=image_size)
    hue = 0.4 if preset == "adsr_paper" else 0.1
    if preset == "light":
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True),
                           v2.RandomHorizontalFlip()])
    blur_kernel = max(3, (image_size // 10) | 1)  # odd, ~10% of the side
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, hue)], p=0.8),
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
                     shuffle: bool = False, keep_source: bool = False, spec: InputSpec | None = None) -> dict:
    """Ray Data ``map_batches`` function (numpy format).

    Args:
        batch: ``image`` (encoded bytes, N), ``label`` (N), ``source`` (N), optionally ``path``
            (the shard file, named in decode errors) and ``pixel_map`` (DICOM rows).
        rates: per-class expected repeats (re-sampling), or None.
        seed: seeds the re-sampling draw and the shuffle of this batch (with its first source)
            when given; None draws fresh each epoch.
        shuffle: return the rows in a random order.
        keep_source: pass the ``source`` column through (inference); training drops it.
        spec: channels, window and depth (default: 3 channels, 8 bits, window auto).

    Returns:
        ``image`` M x C x S x S (uint8, or int16 for ``spec.depth == 16``), ``label`` int64 M
        (M = N unless re-sampled).
    """
    import torch

    spec = spec or InputSpec()
    images, labels, sources = batch["image"], np.asarray(batch["label"], dtype=np.int64), batch["source"]
    paths = batch.get("path")  # the shard file of each row, where the reader included it
    if paths is None:
        paths = np.full(len(labels), None, dtype=object)
    maps = batch.get("pixel_map")
    if maps is None:
        maps = np.full(len(labels), None, dtype=object)
    if (rates is not None or shuffle) and len(labels):
        rng = (np.random.default_rng([seed, zlib.crc32(str(sources[0]).encode())])
               if seed is not None else np.random.default_rng())
        index = np.arange(len(labels))
        if rates is not None:
            index = np.repeat(index, rng.poisson(np.asarray(rates)[labels]))
        if shuffle:
            index = rng.permutation(index)
        images, labels, sources, paths, maps = (images[index], labels[index], sources[index], paths[index],
                                                maps[index])
    transform = build_transform(augment, image_size, train)
    wide = spec.depth == 16
    out = np.empty((len(labels), spec.channels, image_size, image_size), dtype=np.int16 if wide else np.uint8)
    for i, data in enumerate(images):
        where = f"shard {paths[i]} row {sources[i]}" if paths[i] is not None else f"row {sources[i]}"
        chw = torch.from_numpy(decode_to_chw(data, where, window=spec.window, pixel_map=maps[i],
                                             channels=spec.channels, as_float=wide, frames=spec.frames))
        image = transform(chw)
        if wide:  # [0, 1] float -> int16 carrying 16 bits (see the module docstring)
            image = image.clamp_(0.0, 1.0).mul_(UINT16_MAX).round_().sub_(INT16_OFFSET).to(torch.int16)
        out[i] = image.numpy()
    result = {"image": out, "label": labels}
    if keep_source:
        result["source"] = sources
    return result


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """A batch from the pipeline on any device -> float32 ``(u - mean) / std`` per channel.

    Args:
        images: B x C x H x W: uint8 (``u = x / 255``) or int16 (16-bit, ``u = (x + 32768) / 65535``).
        mean, std: per channel (length C), e.g. ``InputSpec.mean``.
    """
    import torch

    channels = images.shape[1]
    mean = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, channels, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, channels, 1, 1)
    if images.dtype == torch.int16:
        unit = images.float().add_(INT16_OFFSET).div_(UINT16_MAX)
    else:
        unit = images.float().div_(255.0)
    return (unit - mean) / std


def build_dataset(cfg: "TrainConfig", manifest: "Manifest", split: str, spec: InputSpec | None = None):
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
    from shards.reader import read_columns

    spec = spec or input_spec(cfg, manifest)
    train = split == "train"
    seed = cfg.seed if cfg.reproducible else None
    if train:
        stream_shuffle = None if cfg.data.cache_encoded else FileShuffleConfig(seed=seed)
        ds = ray_dataset(cfg.data.uri, split, include_synthetic=cfg.data.include_synthetic,
                         columns=read_columns(manifest, "image", "label", "source", "synthetic"),
                         shuffle=stream_shuffle,
                         include_paths=True)
        counts = manifest.class_counts(split, include_synthetic=cfg.data.include_synthetic)
        extra = dict(rates=sampling_rates(counts, cfg.data.sampling),
                     seed=seed, shuffle=True)
    else:
        ds = ray_dataset(cfg.data.uri, split, columns=read_columns(manifest, "image", "label", "source"),
                         include_paths=True)
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
                                         train=train, spec=spec, **extra))


def build_datasets(cfg: "TrainConfig", manifest: "Manifest", spec: InputSpec | None = None) -> dict:
    """The pipelines a training run reads: ``{"train": ..., "val": ...}`` (see build_dataset)."""
    return {split: build_dataset(cfg, manifest, split, spec) for split in ("train", "val")}
