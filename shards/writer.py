"""Write image rows into Parquet shards of about ``shard_bytes`` each, then publish a manifest.

Nothing a reader can see changes until :meth:`ShardWriter.publish`: shards go to a fresh
``shards-<run_id>/`` folder that no manifest names yet; ``publish`` writes ``manifest.json``
atomically (the one switch-over point) and only then removes the shards of the dataset it
replaced. :meth:`ShardWriter.abort` removes the new folder, so a failed job leaves the output as
it found it. Both delete through ``shards.deletion.OutputTree``: only ``shards-*`` folders inside
the output (symlinks resolved), never a path the old manifest lists that is not relative to it,
and never what the new manifest or a dataset it includes references (every target is checked
before the manifest is written, so a refusal leaves the old dataset as it was).

A ``shards-*`` folder that no manifest lists was left by an ingest that was killed (SIGKILL, a
lost machine) before it could clean up. :func:`unlisted_shard_dirs` finds them; a rerun and
``--verify`` report them, and ``--overwrite`` removes them after the new manifest is published.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from medbalance.errors import DataError
from shards import storage
from shards.deletion import OutputTree, relative_entry
from shards.image import sha256_hex
from shards.references import referenced_files
from shards.schema import (EXTRA_COLUMNS, MANIFEST_NAME, SHARD_DIR_PREFIX, SPLITS, WRITE_SCHEMA, Manifest,
                           ShardInfo, unlisted_shard_dirs)

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 128 * 1024 * 1024
ROW_GROUP_BYTES = 16 * 1024 * 1024


class ShardWriter:
    """Buffer rows per split and flush them as Parquet shards.

    Args:
        output: dataset URI (local path, ``file://`` or ``s3://bucket/prefix``).
        class_names: class index -> name.
        shard_bytes: flush a shard once its image bytes reach this size.
        overwrite: replace a dataset already at ``output`` (else refuse).
    """

    def __init__(self, output: str, class_names: list[str], shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False):
        self.output = output
        storage.check_folder(output, "--output")
        self.fs, self.root = storage.resolve(output)
        self.class_names = list(class_names)
        self.shard_bytes = int(shard_bytes)
        self.previous = self._check_output(overwrite)
        self.unlisted = unlisted_shard_dirs(self.fs, self.root, self.previous)
        if self.unlisted and not overwrite:
            logger.warning("%s holds %d shard folder(s) that no manifest lists, left by an interrupted "
                           "ingest: %s; they are not part of any dataset. --overwrite removes them",
                           output, len(self.unlisted), ", ".join(self.unlisted[:5]))
        self.remove_unlisted = overwrite
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.run_dir = f"{SHARD_DIR_PREFIX}{stamp}-{uuid.uuid4().hex[:6]}"
        self._switching = self._published = False   # publish(): writing the manifest / written
        self.shards: list[ShardInfo] = []
        self.counts = {s: {c: 0 for c in self.class_names} for s in SPLITS}
        self.synthetic_counts = {c: 0 for c in self.class_names}  # train only
        self._synthetic_in_buffer = {s: 0 for s in SPLITS}
        self._buffers: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self._buffer_bytes = {s: 0 for s in SPLITS}
        self._next_index = {s: 0 for s in SPLITS}

    def _check_output(self, overwrite: bool) -> Manifest | None:
        manifest_path = f"{self.root}/{MANIFEST_NAME}"
        if not storage.exists(self.fs, manifest_path, self.output):
            storage.ensure_dir(self.fs, self.root, self.output)
            return None
        if not overwrite:
            raise DataError(
                f"{self.output} already holds a dataset ({MANIFEST_NAME} exists); pass --overwrite "
                "to replace it, or choose another --output"
            )
        text = storage.read_bytes(self.fs, manifest_path, self.output).decode("utf-8")
        return Manifest.from_json(text, where=storage.join(self.output, MANIFEST_NAME))

    def add(self, row: dict) -> None:
        """Add one row (keys as :data:`shards.schema.SCHEMA`). Synthetic rows may only be train."""
        split = row["split"]
        if row.get("synthetic"):
            if split != "train":
                raise DataError(f"row {row.get('source')!r}: a synthetic image cannot go to split {split!r}; "
                                "synthetic images may only be in train (val and test stay real)")
            self.synthetic_counts[self.class_names[row["label"]]] += 1
            self._synthetic_in_buffer[split] += 1
        self._buffers[split].append(row)
        self._buffer_bytes[split] += len(row["image"])
        self.counts[split][self.class_names[row["label"]]] += 1
        if self._buffer_bytes[split] >= self.shard_bytes:
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self._buffers[split]
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=WRITE_SCHEMA)  # missing optional columns: null
        mean_bytes = max(1, self._buffer_bytes[split] // len(rows))
        sink = io.BytesIO()
        pq.write_table(
            table, sink,
            row_group_size=max(16, ROW_GROUP_BYTES // mean_bytes),
            compression={name: ("NONE" if name == "image" else "ZSTD") for name in WRITE_SCHEMA.names},
        )
        data = sink.getvalue()
        rel = f"{self.run_dir}/{split}-{self._next_index[split]:05d}.parquet"
        storage.write_bytes_atomic(self.fs, f"{self.root}/{rel}", data, storage.join(self.output, rel))
        self.shards.append(ShardInfo(path=rel, split=split, rows=len(rows), bytes=len(data),
                                     sha256=sha256_hex(data), synthetic_rows=self._synthetic_in_buffer[split]))
        self._next_index[split] += 1
        self._buffers[split] = []
        self._buffer_bytes[split] = 0
        self._synthetic_in_buffer[split] = 0

    def publish(self, provenance: dict, intensity: dict | None = None, pixel_stats: dict | None = None,
                include: tuple[str, Manifest, str] | None = None) -> Manifest:
        """Flush what is buffered, write the manifest (atomically), drop a replaced dataset.

        Args:
            provenance: recorded in the manifest.
            intensity, pixel_stats: see ``shards.schema``; for a dataset version they are the
                included dataset's (its images decide the window and the normalisation).
            include: ``(uri, manifest, manifest_sha256)`` of a dataset whose shards the new
                manifest includes BY REFERENCE (a dataset version, format 2): they stay where they
                are, untouched; its counts are added to this writer's.
        """
        for split in SPLITS:
            self._flush(split)
        counts = {s: dict(c) for s, c in self.counts.items()}
        synthetic = {"train": dict(self.synthetic_counts)}
        shards, references = list(self.shards), []
        if include is not None:
            base_uri, base, base_sha = include
            if base.class_names != self.class_names:
                raise DataError(f"{base_uri} has classes {base.class_names}, not {self.class_names}")
            shards = [dataclasses.replace(s, dataset=s.dataset or base_uri) for s in base.shards] + shards
            for split, per in base.counts.items():
                for name, n in per.items():
                    counts.setdefault(split, {c: 0 for c in self.class_names})[name] += int(n)
            for name, n in base.synthetic_counts.get("train", {}).items():
                synthetic["train"][name] += int(n)
            references = [{"uri": base_uri, "manifest_sha256": base_sha}] + list(base.references)
            intensity, pixel_stats = base.intensity, base.pixel_stats
            # readers ask only for the optional columns every shard holds (this writer's hold all)
            extra_columns = [c for c in EXTRA_COLUMNS if c in base.extra_columns]
        else:
            extra_columns = list(EXTRA_COLUMNS)
        manifest = Manifest(
            class_names=self.class_names,
            counts={s: c for s, c in counts.items() if sum(c.values()) > 0},
            shards=shards,
            provenance=provenance,
            intensity=intensity,
            pixel_stats=pixel_stats,
            extra_columns=extra_columns,
            synthetic_counts={s: c for s, c in synthetic.items() if sum(c.values()) > 0},
            references=references,
        )
        # Check every deletion before the switch-over: a refusal leaves the old dataset as it was.
        where = f"{storage.join(self.output, MANIFEST_NAME)} (the dataset being replaced)"
        doomed = self._replaced_dirs(where)
        tree = OutputTree(self.fs, self.root, self.output)
        protect = referenced_files(manifest, self.output)
        for entry in doomed:
            tree.target(entry, where, protect)
        self._switching = True
        storage.write_bytes_atomic(self.fs, f"{self.root}/{MANIFEST_NAME}",
                                   manifest.to_json().encode("utf-8"),
                                   storage.join(self.output, MANIFEST_NAME))
        self._published = True   # from here on the new shards are the dataset: abort() keeps them
        tree.delete(doomed, where=where, protect=protect)
        return manifest

    def _replaced_dirs(self, where: str) -> list[str]:
        """Shard folders a publish replaces: the old dataset's own and, with ``--overwrite``,
        unlisted leftovers. Only ``shards-*`` folders (a manifest naming anything else is not
        obeyed); shards the old dataset included by reference are never among them.

        Raises:
            UnsafeDeletion: the old manifest lists a path that is not relative to the dataset.
        """
        listed = [relative_entry(s.path, where) for s in (self.previous.shards if self.previous else [])
                  if not s.dataset]
        old = {path.split("/", 1)[0] for path in listed} | (set(self.unlisted) if self.remove_unlisted else set())
        return sorted(d for d in old if d != self.run_dir and d.startswith(SHARD_DIR_PREFIX))

    def abort(self) -> None:
        """Remove every shard this writer wrote; the output is left as it was found.

        Once the new manifest is written (:meth:`publish`), the new shards are the dataset and are
        kept. If the manifest write itself failed in an ambiguous way (an object store that
        stored the object but timed out answering, a signal inside the rename), the manifest
        on disk decides: the shards are kept if it lists them or cannot be read.
        """
        if self._published or (self._switching and self._listed_now()):
            logger.warning("%s: the new manifest is in place; its shards are kept", self.output)
            return
        OutputTree(self.fs, self.root, self.output).discard([self.run_dir])

    def _listed_now(self) -> bool:
        """True when the manifest at the output lists this writer's shards, or cannot be read."""
        path = f"{self.root}/{MANIFEST_NAME}"
        try:
            if not storage.exists(self.fs, path, self.output):
                return False
            manifest = Manifest.from_json(storage.read_bytes(self.fs, path, self.output).decode("utf-8"))
        except Exception:  # noqa: BLE001 (unreadable: keep the shards, a person decides)
            return True
        return any(s.path.split("/", 1)[0] == self.run_dir for s in manifest.shards if not s.dataset)
