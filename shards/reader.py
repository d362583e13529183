"""Read shard datasets: the manifest, a Ray Data dataset and verify (the PyTorch dataset is
:mod:`shards.torch_dataset`).

Every reader starts from ``manifest.json`` and reads only the shards it lists; a folder without a
manifest is refused (it is either not a dataset or one whose writing never finished). A dataset
version (manifest format 2) lists shards of other datasets by reference; every reader resolves
them (:func:`shard_location`), on the same storage as the version. Synthetic rows are refused in
val and test by every reader: the manifest check, ``ray_dataset``, ``ShardDataset`` and ``verify``.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medbalance.errors import DataError, StorageError
from shards import storage
from shards.image import decode_image, read_pixels, sha256_hex, to_chw
from shards.schema import MANIFEST_NAME, Manifest, ShardInfo, unlisted_shard_dirs


def read_manifest(uri: str) -> Manifest:
    """Load a dataset's manifest.

    Raises:
        DataError: if there is no manifest (not a dataset, or an unfinished write).
    """
    fs, root = storage.resolve(uri)
    path = f"{root}/{MANIFEST_NAME}"
    if not storage.exists(fs, path, uri):
        raise DataError(
            f"{storage.join(uri, MANIFEST_NAME)} does not exist: {uri} is not a medbalance dataset "
            "(or its writing never finished); create it with `python -m ray_jobs.prepare`"
        )
    text = storage.read_bytes(fs, path, uri).decode("utf-8")
    return Manifest.from_json(text, where=storage.join(uri, MANIFEST_NAME))


def shard_location(uri: str, shard: ShardInfo) -> tuple[str, str]:
    """``(path on the dataset's filesystem, URI for messages)`` of one shard of dataset ``uri``:
    under ``uri`` itself, or under the dataset it is included from by reference.

    Raises:
        DataError: if a referenced dataset is on another storage than ``uri``.
    """
    if not shard.dataset:
        _, root = storage.resolve(uri)
        return f"{root}/{shard.path}", storage.join(uri, shard.path)
    where = storage.join(shard.dataset, shard.path)
    fs, path = storage.resolve(where)
    own_fs, _ = storage.resolve(uri)
    if fs.type_name != own_fs.type_name:
        raise DataError(f"{uri} includes shards of {shard.dataset}, which is on other storage ({fs.type_name} vs "
                        f"{own_fs.type_name}); a dataset version must live on the storage of the data it includes")
    return path, where


def _missing_advice(uri: str, shard: ShardInfo) -> str:
    if shard.dataset:
        return (f"it belongs to {shard.dataset}, which this dataset version includes by reference: that dataset "
                "was replaced or deleted after the version was made; re-create the version with "
                "`python -m ray_jobs.gan synthesize`")
    return (f"run `python -m ray_jobs.prepare --verify {uri}` to check every shard, then re-create "
            "the dataset with `python -m ray_jobs.prepare ... --overwrite`")


def check_shards(uri: str, manifest: Manifest | None = None, splits: list[str] | None = None) -> Manifest:
    """Check, in seconds and before any job starts, that every shard of ``splits`` (default all)
    exists with the size the manifest records (shards included by reference too). It does not
    read them (``verify`` does).

    Raises:
        DataError: naming the first missing or wrong-sized shard, and pointing to ``--verify``.
    """
    import pyarrow.fs as pafs

    manifest = manifest or read_manifest(uri)
    fs, root = storage.resolve(uri)
    shards = [s for s in manifest.shards if splits is None or s.split in splits]
    locations = [shard_location(uri, s) for s in shards]
    try:
        infos = fs.get_file_info([path for path, _ in locations])
    except OSError as exc:
        raise storage.explain(uri, exc, "list the shards of") from exc
    for shard, info, (_, where) in zip(shards, infos, locations):
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"shard {where} listed in the manifest is missing; {_missing_advice(uri, shard)}")
        if info.size != shard.bytes:
            raise DataError(f"shard {where} has {info.size} bytes but the manifest records {shard.bytes} "
                            f"(truncated or replaced); {_missing_advice(uri, shard)}")
    return manifest


def shard_paths(uri: str, manifest: Manifest, split: str) -> list[str]:
    """Paths (on the dataset's filesystem) of one split's shards, referenced ones included."""
    if split not in manifest.splits():
        raise DataError(f"{uri} has no {split!r} split (it has {manifest.splits()})")
    return [shard_location(uri, s)[0] for s in manifest.shards_of(split)]


def _refuse_synthetic(batch: pa.Table, uri: str, split: str, drop: bool) -> pa.Table:
    """Ray Data map on val/test rows: a synthetic row there is an error, never a silent row."""
    flags = batch["synthetic"].to_pylist()
    if any(flags):
        row = flags.index(True)
        shard = batch["path"][row].as_py() if "path" in batch.column_names else "?"
        raise DataError(f"{uri}: split {split!r} holds a synthetic row (shard {shard}, source "
                        f"{batch['source'][row].as_py() if 'source' in batch.column_names else '?'}); synthetic "
                        "images may only be in train. Re-create the dataset")
    return batch.drop_columns(["synthetic"]) if drop else batch


def _read_table(fs, path: str, uri: str, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"shard {path} of {uri} cannot be read ({exc}); run "
                        f"`python -m ray_jobs.prepare --verify {uri}` and re-create the dataset") from exc


def decode_to_chw(data: bytes, where: str = "image", *, window=None, pixel_map: dict | None = None,
                  channels: int = 3, as_float: bool = False, frames: str | None = None) -> np.ndarray:
    """Encoded bytes -> C x H x W (grey repeated to 3 channels, or RGB to luma for ``channels=1``).

    Args:
        window: the window of 16-bit/float/DICOM images (``Manifest.window``; default auto).
        pixel_map: the row's ``pixel_map`` (DICOM rows).
        as_float: float32 in [0, 1] (keeps 16 bits of a windowed image) instead of uint8.
        frames: ``--frames`` for multi-page/multi-frame original files.
    """
    pixels = read_pixels(data, where, pixel_map=pixel_map, frames=frames, window=window)
    return to_chw(pixels, window, channels, as_float)


def read_columns(manifest: Manifest, *columns: str) -> list[str]:
    """``columns`` plus the optional ones readers need (``pixel_map``) where the shards hold them."""
    return list(columns) + [c for c in ("pixel_map",) if c in manifest.extra_columns]


def ray_dataset(uri: str, split: str, *, include_synthetic: bool = True,
                columns: list[str] | None = None, **read_kwargs):
    """A Ray Data dataset of one split's rows (still encoded; decode in ``map_batches``).

    Args:
        uri: dataset URI.
        split: ``train``, ``val`` or ``test``.
        include_synthetic: keep rows with ``synthetic=True`` (GAN images).
        columns: columns to read (default all).
        read_kwargs: passed to ``ray.data.read_parquet``.
    """
    import ray.data

    manifest = read_manifest(uri)
    fs, _ = storage.resolve(uri)
    guard = split != "train"  # val/test: refuse synthetic rows (fused into the read; one bool column)
    read_columns = columns
    if guard and columns is not None and "synthetic" not in columns:
        read_columns = [*columns, "synthetic"]
    ds = ray.data.read_parquet(shard_paths(uri, manifest, split), filesystem=fs, columns=read_columns,
                               **read_kwargs)
    if guard:
        ds = ds.map_batches(_refuse_synthetic, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                            fn_kwargs=dict(uri=uri, split=split, drop=read_columns is not columns))
    if not include_synthetic and not guard:  # val/test hold no synthetic rows (the guard refuses them)
        ds = ds.filter(expr="synthetic == False")
    return ds


@dataclasses.dataclass
class VerifyReport:
    shards: int
    rows: int
    bytes: int
    unlisted_dirs: list = dataclasses.field(default_factory=list)  # shards-* folders no manifest lists


def verify(uri: str) -> VerifyReport:
    """Re-read every shard: size, checksum and rows against the manifest; decode every image.

    Raises:
        DataError: naming the first bad shard (and row, where one can be named).
    """
    manifest = read_manifest(uri)
    fs, root = storage.resolve(uri)
    _check_references(uri, manifest)
    total_rows = total_bytes = 0
    for shard in manifest.shards:
        path, where = shard_location(uri, shard)
        try:
            data = storage.read_bytes(fs, path, where)
        except StorageError as exc:
            raise DataError(f"shard {where} listed in the manifest is missing or unreadable: {exc}; "
                            f"{_missing_advice(uri, shard)}") from exc
        problems = []
        if len(data) != shard.bytes:
            problems.append(f"size {len(data)} != manifest {shard.bytes}")
        if sha256_hex(data) != shard.sha256:
            problems.append("sha256 differs from the manifest")
        try:
            table = pq.read_table(io.BytesIO(data))
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"shard {where} is corrupt ({'; '.join(problems) or exc}): Parquet "
                            f"cannot read it ({exc}); re-create the dataset") from exc
        if table.num_rows != shard.rows:
            problems.append(f"{table.num_rows} rows != manifest {shard.rows}")
        synthetic_rows = sum(table["synthetic"].to_pylist())
        if synthetic_rows and shard.split != "train":
            raise DataError(f"shard {where} of split {shard.split!r} holds {synthetic_rows} synthetic rows; "
                            "synthetic images may only be in train. Re-create the dataset")
        if synthetic_rows != shard.synthetic_rows:
            problems.append(f"{synthetic_rows} synthetic rows != manifest {shard.synthetic_rows}")
        images = table["image"].to_pylist()
        digests = table["sha256"].to_pylist()
        sources = table["source"].to_pylist()
        maps = table["pixel_map"].to_pylist() if "pixel_map" in table.column_names else [None] * len(images)
        for row, (image, digest, source, pixel_map) in enumerate(zip(images, digests, sources, maps)):
            if sha256_hex(image) != digest:
                raise DataError(f"shard {where} row {row} (source {source}): image bytes do not "
                                f"match their sha256{'; ' + '; '.join(problems) if problems else ''}; "
                                "re-create the dataset")
            try:
                decode_image(image, f"shard {where} row {row} (source {source})", manifest.window, pixel_map)
            except DataError as exc:
                raise DataError(f"{exc}; re-create the dataset") from exc
        if problems:
            raise DataError(f"shard {where} is corrupt: {'; '.join(problems)} (every row still "
                            "decodes, so the damage is outside the image bytes); re-create the dataset")
        total_rows += table.num_rows
        total_bytes += len(data)

    return VerifyReport(shards=len(manifest.shards), rows=total_rows, bytes=total_bytes,
                        unlisted_dirs=unlisted_shard_dirs(fs, root, manifest))


def _check_references(uri: str, manifest: Manifest) -> None:
    """A dataset version's referenced datasets must still have the manifest they had.

    Raises:
        DataError: naming the dataset whose manifest changed or went away.
    """
    for ref in manifest.references:
        fs, root = storage.resolve(ref["uri"])
        try:
            text = storage.read_bytes(fs, f"{root}/{MANIFEST_NAME}", storage.join(ref["uri"], MANIFEST_NAME))
        except StorageError as exc:
            raise DataError(f"{uri} includes {ref['uri']} by reference, whose manifest cannot be read ({exc}); "
                            "re-create the version with `python -m ray_jobs.gan synthesize`") from exc
        if sha256_hex(text) != ref["manifest_sha256"]:
            raise DataError(f"{uri} includes {ref['uri']} by reference, but that dataset changed since the version "
                            "was made (its manifest checksum differs); re-create the version with "
                            "`python -m ray_jobs.gan synthesize`")
