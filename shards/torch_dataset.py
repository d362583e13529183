"""``ShardDataset``: one split of a shard dataset as a map-style PyTorch dataset.

Kept apart from :mod:`shards.reader` so that importing the readers (as Ray Data's coordinator
actors do when they unpickle a pipeline that calls them) does not import torch.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from medbalance.errors import DataError
from shards import storage
from shards.reader import _read_table, decode_to_chw, read_manifest, shard_paths
from shards.schema import SCHEMA


class ShardDataset(torch.utils.data.Dataset):
    """A map-style PyTorch dataset over one split: ``(C x H x W tensor, int label)``.

    Images are uint8 in [0, 255]; in a dataset with 16-bit, float or DICOM grey rows
    (``manifest.windowed``) every image is float32 in [0, 1] instead, windowed by the manifest's
    window (16-bit precision kept). The split's shards are read once into memory (encoded bytes,
    not pixels); images are decoded in ``__getitem__``, so it works with a ``DataLoader``'s worker
    processes.

    Args:
        uri: dataset URI.
        split: ``train``, ``val`` or ``test``.
        transform: optional callable on the image tensor.
        include_synthetic: keep GAN rows.
        channels: 3 (grey repeated) or 1 (RGB as luma).
    """

    def __init__(self, uri: str, split: str, transform=None, include_synthetic: bool = True,
                 channels: int = 3):
        self.uri, self.split, self.transform, self.channels = uri, split, transform, channels
        self.manifest = read_manifest(uri)
        self.class_names = self.manifest.class_names
        fs, _ = storage.resolve(uri)
        tables = [_read_table(fs, p, uri) for p in shard_paths(uri, self.manifest, split)]
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        if split != "train" and pa.compute.any(table["synthetic"]).as_py():
            raise DataError(f"{uri}: split {split!r} holds synthetic rows; synthetic images may only be in "
                            "train. Re-create the dataset")
        if not include_synthetic:
            table = table.filter(pa.compute.invert(table["synthetic"]))
        self.images = table["image"].to_pylist()
        self.labels = np.asarray(table["label"].to_numpy(), dtype=np.int64)
        self.sources = table["source"].to_pylist()
        self.pixel_maps = (table["pixel_map"].to_pylist() if "pixel_map" in table.column_names
                           else [None] * len(self.labels))
        self.window, self.as_float = self.manifest.window, self.manifest.windowed
        self.synthetic = np.asarray(table["synthetic"].to_pylist(), dtype=bool)  # GAN rows

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = torch.from_numpy(decode_to_chw(
            self.images[index], f"{self.uri} row {self.sources[index]}", window=self.window,
            pixel_map=self.pixel_maps[index], channels=self.channels, as_float=self.as_float))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
