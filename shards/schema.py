"""The medbalance image-shard format: Parquet columns and the dataset manifest.

A dataset is a folder (or object-store prefix) holding ``manifest.json`` and Parquet shards::

    <dataset>/manifest.json
    <dataset>/shards-<run_id>/train-00000.parquet
    <dataset>/shards-<run_id>/val-00000.parquet ...

Each shard holds rows of ONE split. The manifest is written last and is the only entry point:
a reader reads exactly the shards it lists, so a half-written or replaced dataset is never seen.

Columns (one row per image):

=========== ========= ===========================================================
column      type      meaning
=========== ========= ===========================================================
image       binary    encoded bytes: PNG/JPEG kept as they were, anything else PNG
height      int32     pixels
width       int32     pixels
channels    int8      1 (grey) or 3 (RGB) after decoding
label       int32     index into ``manifest.class_names``
split       string    train / val / test
source      string    relative path (folder, CSV) or ``<split>:<index>`` (npz)
synthetic   bool      True for GAN-generated rows
sha256      string    hex digest of ``image``
=========== ========= ===========================================================
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow as pa

from medbalance.errors import DataError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")

SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("channels", pa.int8()),
        pa.field("label", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("source", pa.string()),
        pa.field("synthetic", pa.bool_()),
        pa.field("sha256", pa.string()),
    ]
)


@dataclasses.dataclass
class ShardInfo:
    """One Parquet file of a dataset; ``path`` is relative to the dataset root."""

    path: str
    split: str
    rows: int
    bytes: int
    sha256: str


@dataclasses.dataclass
class Manifest:
    """What a dataset holds and how it was made (``manifest.json``)."""

    class_names: list[str]
    counts: dict[str, dict[str, int]]  # split -> class name -> rows
    shards: list[ShardInfo]
    provenance: dict[str, Any]
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def splits(self) -> list[str]:
        """Splits that hold at least one row, in train/val/test order."""
        return [s for s in SPLITS if sum(self.counts.get(s, {}).values()) > 0]

    def class_counts(self, split: str = "train") -> list[int]:
        """Rows per class (in class-index order) for one split."""
        per = self.counts.get(split, {})
        return [int(per.get(name, 0)) for name in self.class_names]

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> "Manifest":
        try:
            raw = json.loads(text)
            version = int(raw.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise DataError(
                    f"{where}: format_version {version} is not supported (this medbalance reads "
                    f"{FORMAT_VERSION}); re-create the dataset with `python -m ray_jobs.prepare`"
                )
            return cls(
                class_names=list(raw["class_names"]),
                counts={k: dict(v) for k, v in raw["counts"].items()},
                shards=[ShardInfo(**s) for s in raw["shards"]],
                provenance=dict(raw.get("provenance", {})),
                format_version=version,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{where} is not a valid medbalance manifest: {exc!r}") from exc
