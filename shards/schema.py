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
pixel_map   struct    DICOM rows: ``scale, offset`` (stored -> Modality values),
                      ``window_low, window_high`` (the file's own window or null),
                      ``invert`` (MONOCHROME1); null for every other row
dicom       struct    DICOM rows: whitelisted, non-identifying tags only (modality,
                      rows, columns, pixel_spacing, photometric, bits_stored,
                      frames, frame); null for every other row
=========== ========= ===========================================================

Compatibility: ``pixel_map`` and ``dicom`` were added after the first datasets were written. The
writer always writes them (null when unused); the manifest's ``extra_columns`` lists them, and
readers ask for them only when it does, so datasets written before still read unchanged (and
their manifests, which lack ``intensity``, ``pixel_stats`` and ``extra_columns``, load with those
empty). The format version stays 1: an older reader ignores both the new manifest keys and the
new columns (it would refuse a 16-bit image by name, not misread it).

The manifest also records how images become model inputs: ``intensity`` (the ``--window`` asked
for, the window applied, e.g. ``fixed:LO,HI`` for a dataset window, ``--frames``, the count of
windowed rows) and ``pixel_stats`` (the train split's per-channel mean/std in [0, 1], for
``normalize: dataset``); see ``shards/intensity.py``.
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
PIXEL_MAP = pa.struct([("scale", pa.float64()), ("offset", pa.float64()), ("window_low", pa.float64()),
                       ("window_high", pa.float64()), ("invert", pa.bool_())])
DICOM_META = pa.struct([("modality", pa.string()), ("rows", pa.int32()), ("columns", pa.int32()),
                        ("pixel_spacing", pa.list_(pa.float64())), ("photometric", pa.string()),
                        ("bits_stored", pa.int32()), ("frames", pa.int32()), ("frame", pa.int32())])
EXTRA_COLUMNS = ("pixel_map", "dicom")
WRITE_SCHEMA = SCHEMA.append(pa.field("pixel_map", PIXEL_MAP)).append(pa.field("dicom", DICOM_META))


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
    intensity: dict[str, Any] | None = None      # window asked / applied, frames, windowed rows
    pixel_stats: dict[str, Any] | None = None    # train split mean/std per channel ("rgb", "grey")
    extra_columns: list[str] = dataclasses.field(default_factory=list)  # optional columns the shards hold

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

    @property
    def windowed(self) -> bool:
        """Whether any row holds 16-bit, float or DICOM grey values (read through a window)."""
        return bool((self.intensity or {}).get("windowed_rows"))

    @property
    def window(self) -> str:
        """The window applied to windowed rows (``auto`` for datasets made before windows existed)."""
        return (self.intensity or {}).get("window", "auto")

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
                intensity=raw.get("intensity"),
                pixel_stats=raw.get("pixel_stats"),
                extra_columns=list(raw.get("extra_columns", [])),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{where} is not a valid medbalance manifest: {exc!r}") from exc
