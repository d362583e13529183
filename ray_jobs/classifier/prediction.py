"""Batch prediction over shards or an image folder, with a Ray Data actor pool (CPU or GPU).

    python -m ray_jobs.predict --checkpoint runs/r18-cws --input runs/data/retina \
        --output runs/r18-cws/predictions [--split test] [--num-actors 2] [--gpu] [--overwrite]
    python -m ray_jobs.predict --checkpoint CKPT --input /path/to/images --output s3://b/preds

``--input`` is a shard dataset (its ``--split``, default all splits) or a folder of images (read
recursively; 16-bit/float PNG/TIFF and DICOM too). Images are prepared as the checkpoint's training
run prepared them (``state["input"]``: channels, the dataset's window and ``--frames``, mean/std). The output is Parquet, one row per input image: ``source``, ``probabilities``
(list of C floats), ``prediction`` (class index), ``predicted_class`` (name), and ``label`` for
shard inputs. Probabilities are ``softmax(logits / T)`` with the run's temperature ``T`` from
``<run>/calibration.json`` (``evaluate --calibrate``; ``ray_jobs.classifier.calibration``) when it
has one, else ``softmax(logits)``; ``--no-calibration`` leaves them uncalibrated. The job prints
which, and ``_SUCCESS.json`` records ``temperature`` (null for none) and ``temperature_source``.

Layout and safety. Ray Data writes the files of one run into ``<output>/predictions-<id>/``;
``<output>/_SUCCESS.json``, written last and atomically, lists them: it is the switch-over point,
and :func:`read_predictions` reads exactly what it lists. ``--overwrite`` replaces earlier
predictions only after the new ``_SUCCESS.json`` is in place, so a failing rerun keeps the old
ones; it deletes only what an earlier ``_SUCCESS.json`` listed (and unfinished
``predictions-*`` folders of interrupted runs), never a folder that is not a medbalance
predictions folder. Every deletion goes through ``shards.deletion.OutputTree``: an entry of
``_SUCCESS.json`` that is absolute, holds ``..`` or resolves (through a symlink) outside
``--output`` stops the job with exit 2 before anything is deleted. An output that is, contains or
lies inside the input is refused, and so is an output that is a file.
"""
from __future__ import annotations

import gc
import datetime as dt
import json
import time
import uuid

import numpy as np

from medbalance.errors import ConfigError, DataError
from ray_jobs.classifier.calibration import describe, run_temperature
from ray_jobs.classifier.pipeline import InputSpec
from ray_jobs.runtime.checkpoint import load_checkpoint, resolve_checkpoint
from ray_jobs.runtime.data_errors import data_error_message
from ray_jobs.runtime.progress import Progress
from shards import storage
from shards.deletion import OutputTree, UnsafeDeletion, check_outside, relative_entry
from shards.image import IMAGE_EXTENSIONS
from shards.references import location_of
from shards.schema import MANIFEST_NAME

# Inference runs on small blocks (ray_jobs.classifier.inference); the driver gathers them into files of at
# least this many rows rather than one small Parquet file per block.
OUTPUT_ROWS_PER_FILE = 50_000

SUCCESS = "_SUCCESS.json"
VERSION_PREFIX = "predictions-"


def check_not_overlapping(input_uri: str, output: str) -> None:
    """Refuse an output that is, contains or lies inside the input (it could destroy the input)."""
    check_outside(output, location_of(output), [(f"--input {input_uri}", location_of(input_uri))],
                  why=": predictions there could overwrite or delete the input; write them to a folder of their own")


def _success_files(success, where: str) -> list[str]:
    """The files a ``_SUCCESS.json`` lists, each checked as a path inside its folder and inside a
    ``predictions-*`` folder (the only thing a prediction run writes besides ``_SUCCESS.json``).

    Raises:
        UnsafeDeletion: the file lists something that is not a relative path inside the folder,
            or not inside a ``predictions-*`` folder.
    """
    files = success.get("files") if isinstance(success, dict) else None
    if not isinstance(files, list):
        raise UnsafeDeletion(f"{where} is damaged (no list of files): nothing was deleted; check the folder by "
                             "hand and remove the file, or choose another --output")
    checked = [relative_entry(f, where) for f in files]
    foreign = [f for f in checked if "/" not in f or not f.startswith(VERSION_PREFIX)]
    if foreign:
        raise UnsafeDeletion(f"{where} lists {foreign[:3]}, which are not files of a {VERSION_PREFIX}* folder "
                             "(the file was edited or damaged): nothing was deleted; check the folder by hand")
    return checked


def _previous_output(output: str, overwrite: bool) -> tuple[list[str], list[str]]:
    """What is at ``output`` now: the files its ``_SUCCESS.json`` lists and unfinished version folders.

    Raises:
        ConfigError: ``output`` is a file, holds anything but medbalance predictions, or holds
            predictions and ``overwrite`` is off.
        UnsafeDeletion: its ``_SUCCESS.json`` lists a path outside it.
    """
    import pyarrow.fs as pafs

    fs, path = storage.resolve(output)
    storage.check_folder(output, "--output")
    if not storage.exists(fs, path, output):
        return [], []
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    if not entries:
        return [], []
    names = {e.base_name: e for e in entries}
    files = []
    if SUCCESS in names:
        where = storage.join(output, SUCCESS)
        try:
            success = json.loads(storage.read_bytes(fs, f"{path}/{SUCCESS}", output))
        except ValueError:
            success = None
        files = _success_files(success, where)
    listed = {f.split("/", 1)[0] for f in files}
    ours = {SUCCESS} | listed | {n for n, e in names.items()
                                 if n.startswith(VERSION_PREFIX) and e.type == pafs.FileType.Directory}
    foreign = sorted(set(names) - ours)
    if foreign:
        raise ConfigError(
            f"{output} is not a medbalance predictions folder (it holds {foreign[:5]}"
            f"{' ...' if len(foreign) > 5 else ''}{'' if SUCCESS in names else ' and no ' + SUCCESS}); "
            "nothing was deleted. Choose an empty or new --output")
    if not overwrite:
        what = "predictions" if SUCCESS in names else "unfinished predictions of an interrupted run"
        raise ConfigError(f"{output} is not empty: it holds {what}; pass --overwrite to replace them, or "
                          "choose another --output")
    stale = sorted(n for n in names if n.startswith(VERSION_PREFIX) and n not in listed)
    return files, stale


def _listed_now(fs, path: str, output: str, version: str) -> bool:
    """True when the ``_SUCCESS.json`` at ``output`` lists ``version``'s files, or cannot be read
    (then the files are kept and a person decides)."""
    try:
        if not storage.exists(fs, f"{path}/{SUCCESS}", output):
            return False
        listed = json.loads(storage.read_bytes(fs, f"{path}/{SUCCESS}", output)).get("files", [])
    except Exception:  # noqa: BLE001
        return True
    return any(isinstance(f, str) and f.split("/", 1)[0] == version for f in listed)


def _replaced(files: list[str], stale: list[str], keep: str) -> list[str]:
    """What a finished run replaces: the folders (or top-level files) of the earlier run's files,
    and stale version folders; never ``keep``, the new version."""
    tops = {f.split("/", 1)[0] for f in files} | set(stale)
    return sorted(t for t in tops if t != keep)


class _PartWriter:
    """Parquet files of at least ``rows_per_file`` rows, each written whole (S3: one upload)."""

    def __init__(self, fs, folder: str, rows_per_file: int):
        self.fs, self.folder, self.rows_per_file = fs, folder, rows_per_file
        self.pending: list = []
        self.pending_rows = 0
        self.names: list[str] = []
        storage.ensure_dir(fs, folder)

    def write(self, table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.pending_rows += table.num_rows
        if self.pending_rows >= self.rows_per_file:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        name = f"part-{len(self.names):05d}.parquet"
        table = pa.concat_tables(self.pending, promote_options="permissive")
        with self.fs.open_output_stream(f"{self.folder}/{name}") as sink:
            pq.write_table(table, sink)
        self.names.append(name)
        self.pending, self.pending_rows = [], 0

    def close(self) -> list[str]:
        self._flush()
        return self.names


def _row_count(input_uri: str, split: str | None) -> int | None:
    """Rows a shard input holds (for the progress line); None for an image folder."""
    from shards import read_manifest

    fs, path = storage.resolve(input_uri)
    if not storage.exists(fs, f"{path}/{MANIFEST_NAME}", input_uri):
        return None
    manifest = read_manifest(input_uri)
    return sum(sum(manifest.counts.get(s, {}).values()) for s in ([split] if split else manifest.splits()))


def read_predictions(output: str):
    """The predictions at ``output`` as a pyarrow Table: exactly the files ``_SUCCESS.json`` lists.

    Raises:
        DataError: no ``_SUCCESS.json`` (not predictions, or a run that never finished).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.resolve(output)
    if not storage.exists(fs, f"{path}/{SUCCESS}", output):
        raise DataError(f"{storage.join(output, SUCCESS)} does not exist: {output} holds no finished "
                        "predictions")
    where = storage.join(output, SUCCESS)
    try:
        success = json.loads(storage.read_bytes(fs, f"{path}/{SUCCESS}", output))
    except ValueError as exc:
        raise DataError(f"{where} is not valid JSON ({exc}): the predictions cannot be read") from exc
    tables = [pq.read_table(f"{path}/{f}", filesystem=fs) for f in _success_files(success, where)]
    return pa.concat_tables(tables) if tables else None


def _input_dataset(input_uri: str, split: str | None):
    """Encoded rows (``image``, ``label``, ``source``, ``path``) of a shard dataset or an image folder."""
    import ray.data

    from shards import ray_dataset, read_manifest

    fs, path = storage.resolve(input_uri)
    if storage.exists(fs, f"{path}/{MANIFEST_NAME}", input_uri):
        manifest = read_manifest(input_uri)
        splits = [split] if split else manifest.splits()
        from shards.reader import read_columns

        parts = [ray_dataset(input_uri, s, columns=read_columns(manifest, "image", "label", "source"),
                             include_paths=True) for s in splits]
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ray.data.read_binary_files(path, filesystem=fs, include_paths=True,
                                    file_extensions=[e.lstrip(".") for e in IMAGE_EXTENSIONS]
                                    + [e.lstrip(".").upper() for e in IMAGE_EXTENSIONS])
    root = path.rstrip("/") + "/"

    def rename(batch: dict) -> dict:
        return {"image": batch["bytes"], "source": np.array([p[len(root):] if p.startswith(root) else p
                                                             for p in batch["path"]], dtype=object),
                "label": np.full(len(batch["bytes"]), -1, dtype=np.int64)}

    return ds.map_batches(rename, batch_format="numpy")


def _to_rows(batch: dict, class_names: list[str], temperature: float | None = None) -> dict:
    """Logits (N x K) -> the output columns: probabilities ``softmax(logits / T)`` by a stable
    softmax (T = 1 when ``temperature`` is None), the argmax and its name."""
    logits = np.stack(batch["logits"]).astype(np.float64)
    if temperature is not None:
        logits = logits / temperature
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    prediction = probs.argmax(axis=1)
    return {"source": batch["source"], "label": batch["label"],
            "probabilities": [p.astype(np.float32).tolist() for p in probs],
            "prediction": prediction.astype(np.int64),
            "predicted_class": np.array([class_names[i] for i in prediction], dtype=object)}


def write_predictions(checkpoint: str, input_uri: str, split: str | None, output: str, version: str, *,
                      image_size: int, class_names: list[str], total: int | None, num_actors: int,
                      use_gpu: bool, batch_size: int, spec=None, temperature: float | None = None) -> list[str]:
    """Score every input image and write the Parquet files into ``<output>/<version>``; returns their names.

    Runs as a Ray task (``ray_runtime.run_as_task``). On any failure it removes what it wrote; a
    damaged input becomes one DataError naming the file.
    """
    from ray_jobs.classifier.inference import logits_dataset

    fs, root = storage.resolve(output)
    folder = f"{root}/{version}"
    progress = Progress("predicted", total=total, unit="images")
    failure = None
    try:
        ds = logits_dataset(_input_dataset(input_uri, split), checkpoint, image_size,
                            num_actors=num_actors, use_gpu=use_gpu, batch_size=batch_size, spec=spec)
        writer = _PartWriter(fs, folder, OUTPUT_ROWS_PER_FILE)
        for batch in ds.map_batches(_to_rows, batch_format="numpy",
                                    fn_kwargs={"class_names": class_names, "temperature": temperature}).iter_batches(
                batch_size=None, batch_format="pyarrow"):
            writer.write(batch)
            progress.update(batch.num_rows)
        names = writer.close()
        progress.finish()
        return names
    except BaseException as exc:
        OutputTree(fs, root, output).discard([version])  # only what this run wrote
        failure = data_error_message(exc, input_uri, advice=None if total is not None else
                                     "remove or replace that image file and run again")
        if failure is None:
            raise
    # The failed Ray Data executor sits in a reference cycle that holds its actors (and their
    # CPUs) until the next garbage collection; collect now, or a following job could starve.
    gc.collect()
    raise DataError(failure)


def predict(checkpoint: str, input_uri: str, output: str, *, split: str | None = None, num_actors: int = 1,
            use_gpu: bool = False, overwrite: bool = False, batch_size: int = 64, calibration: bool = True) -> dict:
    """Write predictions for every image of ``input_uri``; returns the ``_SUCCESS.json`` content.

    ``calibration``: apply the run's temperature (``<run>/calibration.json``) when it has one; the
    line it prints and ``_SUCCESS.json``'s ``temperature`` and ``temperature_source`` say which.
    Every check (checkpoint, calibration, input shards, overlap, what is at ``output``) runs before
    Ray starts.
    """
    from ray_jobs.runtime.ray_setup import run_as_task
    from shards import check_shards

    checkpoint = resolve_checkpoint(checkpoint)
    state = load_checkpoint(checkpoint)
    temperature, temperature_source = run_temperature(checkpoint, calibration)
    check_not_overlapping(input_uri, output)
    previous_files, stale = _previous_output(output, overwrite)
    in_fs, in_path = storage.resolve(input_uri)
    if storage.exists(in_fs, f"{in_path}/{MANIFEST_NAME}", input_uri):
        check_shards(input_uri, splits=[split] if split else None)
    elif not storage.exists(in_fs, in_path, input_uri):
        raise DataError(f"input {input_uri} does not exist")
    version = f"{VERSION_PREFIX}{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    out_fs, out_path = storage.resolve(output)
    tree = OutputTree(out_fs, out_path, output)
    for entry in _replaced(previous_files, stale, keep=version):  # a symlink out of --output: refused now
        tree.target(entry, where=storage.join(output, SUCCESS))
    print(describe(temperature, temperature_source), flush=True)
    started = time.perf_counter()
    names = run_as_task(write_predictions, checkpoint, input_uri, split, output, version,
                        image_size=state["config"]["data"]["image_size"], class_names=state["class_names"],
                        total=_row_count(input_uri, split), num_actors=num_actors, use_gpu=use_gpu,
                        batch_size=batch_size, spec=InputSpec.from_dict(state.get("input")), temperature=temperature)
    files = [f"{version}/{name}" for name in names]
    try:
        import pyarrow.parquet as pq

        rows = sum(pq.ParquetFile(f"{out_path}/{f}", filesystem=out_fs).metadata.num_rows for f in files)
        success = {"files": files, "rows": rows, "checkpoint": checkpoint, "input": input_uri,
                   "class_names": state["class_names"], "temperature": temperature,
                   "temperature_source": temperature_source, "seconds": round(time.perf_counter() - started, 2)}
        storage.write_bytes_atomic(out_fs, f"{out_path}/{SUCCESS}", json.dumps(success, indent=2).encode(), output)
    except BaseException:
        if not _listed_now(out_fs, out_path, output, version):   # an ambiguous write may have landed
            tree.discard([version])
        raise
    tree.delete(_replaced(previous_files, stale, keep=version), where=storage.join(output, SUCCESS))
    return success
