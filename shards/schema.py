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

Manifest formats. **1**: a dataset's own shards (what ``ray_jobs.prepare`` writes). **2**: a
*dataset version* (``ray_jobs.gan synthesize``): its own shards plus shards of other datasets
included BY REFERENCE (``ShardInfo.dataset`` names the dataset that holds them; they are never
copied or changed), and ``references`` records each referenced dataset's manifest checksum.
Rows with ``synthetic=True`` may only be in train: a manifest whose val/test shards hold
synthetic rows is refused when read (and ``verify`` checks every row), so validation and test
stay real whatever a version adds. ``counts`` include synthetic rows; ``synthetic_counts`` says
how many of them are synthetic. Format-1 manifests are read as before.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from medbalance.errors import DataError

FORMAT_VERSION = 1          # a dataset's own shards (ingest)
VERSION_FORMAT_VERSION = 2  # + shards by reference and synthetic rows (a dataset version)
READABLE_VERSIONS = (FORMAT_VERSION, VERSION_FORMAT_VERSION)
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
    """One Parquet file of a dataset; ``path`` is relative to the root of the dataset holding it:
    this one, or ``dataset`` (the URI of a dataset whose shard is included by reference)."""

    path: str
    split: str
    rows: int
    bytes: int
    sha256: str
    dataset: str | None = None     # format 2: the dataset holding a referenced shard
    synthetic_rows: int = 0        # format 2: rows with synthetic=True (train shards only)


_V2_SHARD_KEYS = ("dataset", "synthetic_rows")


@dataclasses.dataclass
class Manifest:
    """What a dataset holds and how it was made (``manifest.json``)."""

    class_names: list[str]
    counts: dict[str, dict[str, int]]  # split -> class name -> rows (synthetic included)
    shards: list[ShardInfo]
    provenance: dict[str, Any]
    format_version: int = FORMAT_VERSION
    intensity: dict[str, Any] | None = None      # window asked / applied, frames, windowed rows
    pixel_stats: dict[str, Any] | None = None    # train split mean/std per channel ("rgb", "grey")
    extra_columns: list[str] = dataclasses.field(default_factory=list)  # optional columns the shards hold
    synthetic_counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # split -> class -> rows
    references: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # {"uri", "manifest_sha256"}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_version(self) -> bool:
        """True when the manifest needs format 2 (referenced shards or synthetic rows)."""
        return bool(self.references or any(s.dataset or s.synthetic_rows for s in self.shards)
                    or any(sum(c.values()) for c in self.synthetic_counts.values()))

    def splits(self) -> list[str]:
        """Splits that hold at least one row, in train/val/test order."""
        return [s for s in SPLITS if sum(self.counts.get(s, {}).values()) > 0]

    def class_counts(self, split: str = "train", include_synthetic: bool = True) -> list[int]:
        """Rows per class (in class-index order) for one split; real rows only if not ``include_synthetic``."""
        per = self.counts.get(split, {})
        counts = [int(per.get(name, 0)) for name in self.class_names]
        if include_synthetic:
            return counts
        return [n - s for n, s in zip(counts, self.synthetic_class_counts(split))]

    def synthetic_class_counts(self, split: str = "train") -> list[int]:
        """Synthetic rows per class (in class-index order) for one split."""
        per = self.synthetic_counts.get(split, {})
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
        raw = dataclasses.asdict(self)
        if self.is_version:
            raw["format_version"] = VERSION_FORMAT_VERSION
        else:  # the format-1 shape, exactly as before
            raw["format_version"] = FORMAT_VERSION
            for key in ("synthetic_counts", "references"):
                raw.pop(key)
            for shard in raw["shards"]:
                for key in _V2_SHARD_KEYS:
                    shard.pop(key)
        return json.dumps(raw, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> "Manifest":
        try:
            raw = json.loads(text)
            version = int(raw.get("format_version", -1))
            if version not in READABLE_VERSIONS:
                raise DataError(
                    f"{where}: format_version {version} is not supported (this medbalance reads "
                    f"{list(READABLE_VERSIONS)}); re-create the dataset with `python -m ray_jobs.prepare`"
                )
            manifest = cls(
                class_names=list(raw["class_names"]),
                counts={k: dict(v) for k, v in raw["counts"].items()},
                shards=[ShardInfo(**s) for s in raw["shards"]],
                provenance=dict(raw.get("provenance", {})),
                format_version=version,
                intensity=raw.get("intensity"),
                pixel_stats=raw.get("pixel_stats"),
                extra_columns=list(raw.get("extra_columns", [])),
                synthetic_counts={k: dict(v) for k, v in raw.get("synthetic_counts", {}).items()},
                references=list(raw.get("references", [])),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{where} is not a valid medbalance manifest: {exc!r}") from exc
        manifest.check_synthetic_only_in_train(where)
        return manifest

    def check_synthetic_only_in_train(self, where: str = "manifest.json") -> None:
        """Refuse synthetic rows outside train: validation and test must stay real.

        Raises:
            DataError: naming the split and shard.
        """
        for shard in self.shards:
            if shard.synthetic_rows and shard.split != "train":
                raise DataError(f"{where}: shard {shard.path} of split {shard.split!r} holds {shard.synthetic_rows} "
                                "synthetic rows; synthetic images may only be in train (val and test stay real). "
                                "Re-create the dataset version with `python -m ray_jobs.gan synthesize`")
        for split, per in self.synthetic_counts.items():
            if split != "train" and sum(per.values()):
                raise DataError(f"{where}: synthetic_counts has {sum(per.values())} rows in {split!r}; synthetic "
                                "images may only be in train")


SHARD_DIR_PREFIX = "shards-"   # every folder of shards a writer makes: shards-<time>-<id>/


def unlisted_shard_dirs(fs: pafs.FileSystem, root: str, manifest: Manifest | None) -> list[str]:
    """Names of ``shards-*`` folders under ``root`` that ``manifest`` does not list."""
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    except OSError:
        return []
    listed = {s.path.split("/", 1)[0] for s in manifest.shards if not s.dataset} if manifest else set()
    return sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory
                  and e.base_name.startswith(SHARD_DIR_PREFIX) and e.base_name not in listed)
