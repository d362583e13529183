"""Read labelled images (folder, MedMNIST npz, CSV), split them, and write shards.

Three input formats:

* **folder**: ``ROOT/<class>/<image>``, or ``ROOT/{train,val,test}/<class>/<image>`` (splits kept);
* **npz**: MedMNIST-style ``{split}_images`` (N x H x W [x C] uint8) and ``{split}_labels``
  (N or N x 1 ints); the splits in the file are kept;
* **csv**: rows ``path,label[,split]`` (a header row is optional); paths are relative to the CSV's
  folder and must stay inside it.

Folder and CSV inputs may hold 16-bit and float PNG/TIFF and DICOM (``.dcm``) files: they are
stored losslessly and read through ``--window`` (``shards/image.py``, ``shards/intensity.py``,
``shards/dicom.py``); the manifest records the window, ``--frames`` and the train split's pixel
mean/std.

Without given splits, :func:`assign_splits` makes a stratified split by seed. Every check that can
fail on the input runs before any byte is written, except image decoding, which runs in parallel
while shards are written; a failure there aborts the writer (no output is left).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import itertools
import io
import logging
import multiprocessing
import os
import posixpath
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow.fs as pafs

import medbalance
from medbalance.errors import DataError
from shards import storage
from shards.encoding import Progress, die_with_parent, encode_arrays, encode_files, stop_pool
from shards.image import IMAGE_EXTENSIONS, sha256_hex
from shards.intensity import TrainStats, Window
from shards.schema import SPLITS, Manifest
from shards.writer import DEFAULT_SHARD_BYTES, ShardWriter

logger = logging.getLogger(__name__)
CHUNK = 32


@dataclasses.dataclass
class Record:
    """One input image before encoding.

    ``ref`` is a path on the input filesystem (folder, csv) or an index into the npz split's
    image array; ``source`` is what the shard's ``source`` column will say.
    """

    source: str
    label: int
    split: str | None
    ref: str | int


@dataclasses.dataclass
class Scanned:
    """The result of scanning an input: records, class names, and whether splits were given."""

    records: list[Record]
    class_names: list[str]
    given_splits: bool
    fmt: str
    skipped: list[str] = dataclasses.field(default_factory=list)
    arrays: dict[str, np.ndarray] | None = None  # npz: split -> images


# ----------------------------------------------------------------------------- scanning
def detect_format(input_uri: str) -> str:
    fs, path = storage.resolve(input_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"input {input_uri} does not exist")
    if info.type == pafs.FileType.Directory:
        return "folder"
    lower = path.lower()
    if lower.endswith(".npz"):
        return "npz"
    if lower.endswith(".csv"):
        return "csv"
    raise DataError(
        f"cannot tell the format of {input_uri}: give a folder, a .npz or a .csv, or pass --format"
    )


def _resolve_label(raw: str, class_names: list[str] | None, where: str) -> str:
    """Map a CSV label (a name, or an index when class names are given) to a class name."""
    if class_names is None:
        return raw
    if raw in class_names:
        return raw
    if raw.isdigit() and int(raw) < len(class_names):
        return class_names[int(raw)]
    raise DataError(
        f"{where}: label {raw!r} is not in the class list {class_names}; fix the label or pass "
        "the full list with --classes"
    )


def _ordered_names(names: set[str]) -> list[str]:
    """Sorted class names; numeric order when every name is an integer."""
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def scan_folder(input_uri: str, classes: list[str] | None) -> Scanned:
    fs, root = storage.resolve(input_uri)
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise DataError(f"cannot list {input_uri}: {exc}") from exc
    rels = [(e, posixpath.relpath(e.path, root) if not isinstance(fs, pafs.LocalFileSystem)
             else os.path.relpath(e.path, root)) for e in entries]
    top_dirs = {r.split("/")[0] for e, r in rels if e.type == pafs.FileType.Directory and "/" not in r}
    given_splits = bool(top_dirs) and top_dirs <= set(SPLITS) and "train" in top_dirs
    depth = 3 if given_splits else 2
    class_dirs: dict[tuple[str | None, str], list[str]] = {}
    for e, rel in rels:
        parts = rel.split("/")
        if e.type == pafs.FileType.Directory and len(parts) == depth - 1:
            key = (parts[0], parts[1]) if given_splits else (None, parts[0])
            class_dirs.setdefault(key, [])
    skipped: list[str] = []
    for e, rel in rels:
        if e.type != pafs.FileType.File:
            continue
        parts = rel.split("/")
        name = parts[-1]
        if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            skipped.append(rel)
            continue
        if len(parts) != depth:
            skipped.append(rel)
            continue
        key = (parts[0], parts[1]) if given_splits else (None, parts[0])
        class_dirs[key].append(rel)
    if not class_dirs:
        raise DataError(f"{input_uri} has no class folders: expected ROOT/<class>/<image>")
    for (split, cls), files in sorted(class_dirs.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if not files:
            where = "/".join(p for p in (split, cls) if p)
            raise DataError(
                f"class folder {storage.join(input_uri, where)} holds no images; add images or "
                "remove the folder"
            )
    found = {cls for (_, cls) in class_dirs}
    if classes is not None:
        unknown = sorted(found - set(classes))
        if unknown:
            raise DataError(f"{input_uri}: class folders {unknown} are not in --classes {classes}")
        class_names = list(classes)
    else:
        class_names = _ordered_names(found)
    index = {n: i for i, n in enumerate(class_names)}
    records = [
        Record(source=rel, label=index[cls], split=split, ref=f"{root}/{rel}")
        for (split, cls), files in sorted(class_dirs.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))
        for rel in sorted(files)
    ]
    return Scanned(records, class_names, given_splits, "folder", skipped)


def scan_csv(input_uri: str, classes: list[str] | None) -> Scanned:
    fs, csv_path = storage.resolve(input_uri)
    text = storage.read_bytes(fs, csv_path, input_uri).decode("utf-8-sig")
    root = csv_path.rsplit("/", 1)[0]
    local = isinstance(fs, pafs.LocalFileSystem)
    real_root = os.path.realpath(root) if local else root
    rows = list(csv.reader(io.StringIO(text)))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        header, rows, first_line = rows[0], rows[1:], 2
        has_split = len(header) > 2 and header[2].strip().lower() == "split"
    else:
        first_line = 1
        has_split = bool(rows) and len(rows[0]) > 2
    raw: list[tuple[str, str, str | None, str]] = []
    for lineno, row in enumerate(rows, start=first_line):
        where = f"{input_uri} line {lineno}"
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2:
            raise DataError(f"{where}: expected 'path,label[,split]', got {row}")
        rel, label = row[0].strip(), row[1].strip()
        if not label:
            raise DataError(f"{where}: the label of {rel!r} is empty; give every row a class name "
                            "(or drop the row)")
        split = row[2].strip() if has_split and len(row) > 2 else None
        if split is not None and split not in SPLITS:
            raise DataError(f"{where}: split {split!r} is not one of {list(SPLITS)}")
        if rel.startswith("/") or "://" in rel or (len(rel) > 1 and rel[1] == ":"):
            raise DataError(f"{where}: path {rel!r} is absolute; CSV paths must be relative to "
                            f"the CSV's folder {root}")
        norm = posixpath.normpath(rel)
        if norm == ".." or norm.startswith("../"):
            raise DataError(f"{where}: path {rel!r} leaves the CSV's folder {root}; move the "
                            "images under it or write a CSV next to them")
        full = f"{root}/{norm}"
        if local:
            if not os.path.isfile(full):
                raise DataError(f"{where}: file {full} does not exist; fix the path or drop the row")
            real = os.path.realpath(full)
            if os.path.commonpath([real, real_root]) != real_root:
                raise DataError(f"{where}: path {rel!r} is a link to {real}, outside the CSV's "
                                f"folder {root}; copy the file in instead")
        elif fs.get_file_info(full).type != pafs.FileType.File:
            raise DataError(f"{where}: file {storage.join(input_uri.rsplit('/', 1)[0], norm)} "
                            "does not exist; fix the path or drop the row")
        raw.append((norm, _resolve_label(label, classes, where), split, full))
    if not raw:
        raise DataError(f"{input_uri} lists no images")
    class_names = list(classes) if classes is not None else _ordered_names({r[1] for r in raw})
    index = {n: i for i, n in enumerate(class_names)}
    if has_split and any(r[2] is None for r in raw):
        raise DataError(f"{input_uri}: some rows have a split and some do not; give all or none")
    records = [Record(source=rel, label=index[lab], split=split, ref=full)
               for rel, lab, split, full in raw]
    return Scanned(records, class_names, has_split, "csv")


def scan_npz(input_uri: str, classes: list[str] | None) -> Scanned:
    fs, path = storage.resolve(input_uri)
    data = storage.read_bytes(fs, path, input_uri)
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{input_uri} is not a readable .npz file: {exc}") from exc
    splits = [s for s in SPLITS if f"{s}_images" in npz.files]
    if not splits:
        raise DataError(f"{input_uri} has no '<split>_images' arrays (found {npz.files}); expected "
                        "the MedMNIST layout train_images/train_labels/...")
    arrays: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for split in splits:
        if f"{split}_labels" not in npz.files:
            raise DataError(f"{input_uri} has {split}_images but no {split}_labels")
        images, lab = npz[f"{split}_images"], np.asarray(npz[f"{split}_labels"])
        if not ((images.dtype == np.uint8 and images.ndim in (3, 4)) or (images.dtype == np.uint16 and images.ndim == 3)):
            raise DataError(f"{input_uri}: {split}_images must be uint8 N x H x W [x C] or uint16 N x H x W "
                            f"(16-bit grey), got {images.dtype} {images.shape}")
        lab = lab.reshape(len(lab), -1)
        if lab.shape[1] != 1 or len(lab) != len(images):
            raise DataError(f"{input_uri}: {split}_labels must be N or N x 1 (single-label) with "
                            f"N = {len(images)}, got {lab.shape}")
        arrays[split], labels[split] = images, lab[:, 0].astype(np.int64)
    max_label = max(int(v.max()) for v in labels.values() if len(v))
    if classes is not None:
        class_names = list(classes)
    else:
        class_names = [str(i) for i in range(max_label + 1)]
    for split in splits:
        bad = np.flatnonzero((labels[split] < 0) | (labels[split] >= len(class_names)))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{input_uri}: {split}_labels row {i} is {int(labels[split][i])}, "
                            f"outside the {len(class_names)} classes {class_names}; fix the label "
                            "or pass the full list with --classes")
    records = [Record(source=f"{split}:{i}", label=int(labels[split][i]), split=split, ref=i)
               for split in splits for i in range(len(labels[split]))]
    return Scanned(records, class_names, True, "npz", arrays=arrays)


def scan(input_uri: str, fmt: str = "auto", classes: list[str] | None = None) -> Scanned:
    """Scan an input; every path, label and class-folder check happens here."""
    fmt = detect_format(input_uri) if fmt == "auto" else fmt
    scanners = {"folder": scan_folder, "csv": scan_csv, "npz": scan_npz}
    if fmt not in scanners:
        raise DataError(f"unknown --format {fmt!r}; use auto, folder, npz or csv")
    return scanners[fmt](input_uri, classes)


# ----------------------------------------------------------------------------- splitting
def assign_splits(records: list[Record], class_names: list[str], val: float, test: float,
                  seed: int, small_classes: str = "error") -> list[Record]:
    """Stratified split by seed (used when the input gives no splits).

    Per class of ``n`` images: ``n_test = max(1, round(n * test))`` and
    ``n_val = max(1, round(n * val))`` when the fraction is > 0 (so every class appears in every
    split), the rest is train. A class with fewer images than splits is "too small":
    ``small_classes="error"`` refuses with a message, ``"train-only"`` keeps it whole in train.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(f"--val {val} and --test {test} must be in [0, 1) with a sum below 1")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Record]] = {}
    for r in records:
        by_class.setdefault(r.label, []).append(r)
    wanted = 1 + (val > 0) + (test > 0)
    out: list[Record] = []
    for label in sorted(by_class):
        group = by_class[label]
        order = rng.permutation(len(group))
        n = len(group)
        if n < wanted:
            if small_classes == "train-only":
                logger.warning("class %r has %d image(s), too few for %d splits: kept in train only",
                               class_names[label], n, wanted)
                out += [dataclasses.replace(group[i], split="train") for i in order]
                continue
            raise DataError(
                f"class {class_names[label]!r} has {n} image(s), too few to appear in train, val "
                f"and test; add images, lower the splits (--val/--test 0), or pass "
                f"--small-classes train-only to keep it in train only"
            )
        n_test = max(1, round(n * test)) if test > 0 else 0
        n_val = max(1, round(n * val)) if val > 0 else 0
        if n - n_test - n_val < 1:
            n_val = max(0, n - n_test - 1) if val > 0 else 0
        for k, i in enumerate(order):
            split = "test" if k < n_test else "val" if k < n_test + n_val else "train"
            out.append(dataclasses.replace(group[i], split=split))
    return out


def shuffled_within_splits(records: list[Record], seed: int) -> list[Record]:
    """The records split by split (train, val, test), each split shuffled by ``seed``: every shard
    then mixes classes."""
    rng = np.random.default_rng(seed + 1)
    ordered: list[Record] = []
    for split in SPLITS:
        group = [r for r in records if r.split == split]
        ordered += [group[i] for i in rng.permutation(len(group))]
    return ordered


def ingest(input_uri: str, output: str, *, fmt: str = "auto", val: float = 0.1, test: float = 0.2,
           seed: int = 0, classes: list[str] | None = None, small_classes: str = "error",
           shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
           workers: int | None = None, window: str = "auto", window_scope: str = "image",
           frames: str | None = None) -> Manifest:
    """Scan, split, encode (in ``workers`` processes) and write a shard dataset.

    Args:
        window, window_scope: how 16-bit/float/DICOM values map to [0, 1] (``shards/intensity.py``).
        frames: which page/frame of multi-page TIFF / multi-frame DICOM files to take (else refused).

    Returns:
        The published manifest.

    Raises:
        DataError: naming the file/row at fault; nothing is left at ``output``.
    """
    spec = Window.parse(window, window_scope)
    scanned = scan(input_uri, fmt, classes)
    records = scanned.records
    if not scanned.given_splits:
        records = assign_splits(records, scanned.class_names, val, test, seed, small_classes)
    ordered = shuffled_within_splits(records, seed)
    # Where a file's errors point: the folder itself, or the CSV's folder.
    base_uri = input_uri if scanned.fmt == "folder" else input_uri.rsplit("/", 1)[0]
    writer = ShardWriter(output, scanned.class_names, shard_bytes, overwrite)
    workers = workers or os.cpu_count() or 1
    progress = Progress(len(ordered))
    stats = TrainStats(spec)
    windowed_rows = 0
    started = time.perf_counter()
    chunks = [ordered[i:i + CHUNK] for i in range(0, len(ordered), CHUNK)]
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))

    def submit(chunk: list[Record]):
        if scanned.fmt == "npz":
            return pool.submit(encode_arrays, np.stack([scanned.arrays[r.split][r.ref] for r in chunk]), spec)
        return pool.submit(encode_files, input_uri, [(storage.join(base_uri, r.source), r.ref) for r in chunk],
                           spec, frames)

    try:
        # A bounded window of chunks in flight: memory stays flat however large the input is, and
        # results are written in input order.
        in_flight: collections.deque = collections.deque()
        pending = iter(chunks)
        for chunk in itertools.islice(pending, 2 * workers + 2):
            in_flight.append((chunk, submit(chunk)))
        while in_flight:
            chunk, future = in_flight.popleft()
            for record, encoded in zip(chunk, future.result()):
                writer.add({**encoded.row(), "label": record.label, "split": record.split,
                            "source": record.source, "synthetic": False, "sha256": sha256_hex(encoded.image)})
                windowed_rows += encoded.summary["windowed"]
                if record.split == "train":
                    stats.add(encoded.summary)
            progress.step(len(chunk))
            following = next(pending, None)
            if following is not None:
                in_flight.append((following, submit(following)))
        pool.shutdown(wait=True)
        resolved, pixel_stats = stats.finish()  # a dataset window from the train split's images
        if not windowed_rows and spec.kind != "auto":
            logger.warning("--window %s was not used: no image is 16-bit, float or grey DICOM (8-bit "
                           "images are never windowed)", spec)
        intensity = {"window": str(resolved), "requested": str(spec), "scope": spec.scope, "frames": frames,
                     "windowed_rows": windowed_rows}
        manifest = writer.publish({
            "input": input_uri, "format": scanned.fmt, "seed": seed,
            "split_ratios": None if scanned.given_splits else {"val": val, "test": test},
            "splits_from_input": scanned.given_splits, "small_classes": small_classes,
            "skipped_files": scanned.skipped[:100], "num_skipped_files": len(scanned.skipped),
            "medbalance_version": medbalance.__version__,
            "seconds": round(time.perf_counter() - started, 3),
        }, intensity=intensity, pixel_stats=pixel_stats)
    except BaseException:  # also KeyboardInterrupt and SIGTERM (ray_jobs.runtime.cli): leave nothing behind
        stop_pool(pool)
        writer.abort()
        raise
    return manifest


def summary_table(manifest: Manifest) -> str:
    """Per-class counts per split, share of the dataset and imbalance ratio (max / class)."""
    splits = manifest.splits()
    totals = [sum(manifest.counts.get(s, {}).get(c, 0) for s in splits) for c in manifest.class_names]
    grand = sum(totals) or 1
    biggest = max(totals) if totals else 0
    width = max([5] + [len(c) for c in manifest.class_names])
    head = f"{'class':<{width}} " + " ".join(f"{s:>7}" for s in splits) + f" {'total':>7} {'share':>7} {'ratio':>7}"
    lines = [head, "-" * len(head)]
    for name, total in zip(manifest.class_names, totals):
        cells = " ".join(f"{manifest.counts.get(s, {}).get(name, 0):>7}" for s in splits)
        ratio = f"{biggest / total:.1f}" if total else "inf"
        lines.append(f"{name:<{width}} {cells} {total:>7} {100 * total / grand:>6.1f}% {ratio:>7}")
    split_totals = " ".join(f"{sum(manifest.counts.get(s, {}).values()):>7}" for s in splits)
    nonzero = [t for t in totals if t]
    overall = f"{max(nonzero) / min(nonzero):.1f}" if nonzero else "-"
    lines += ["-" * len(head), f"{'all':<{width}} {split_totals} {sum(totals):>7} {'100.0%':>7} {overall:>7}"]
    lines.append(f"imbalance ratio (largest / smallest class): {overall}:1")
    return "\n".join(lines)
