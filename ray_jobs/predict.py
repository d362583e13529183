"""Batch prediction over shards or an image folder, with a Ray Data actor pool (CPU or GPU).

    python -m ray_jobs.predict --checkpoint runs/r18-cws --input runs/data/retina \
        --output runs/r18-cws/predictions [--split test] [--num-actors 2] [--gpu] [--overwrite]
    python -m ray_jobs.predict --checkpoint CKPT --input /path/to/images --output s3://b/preds

``--input`` is a shard dataset (its ``--split``, default all splits) or a folder of images (read
recursively). The output is Parquet, one row per input image: ``source``, ``probabilities``
(list of C floats), ``prediction`` (class index), ``predicted_class`` (name), and ``label`` for
shard inputs. Ray Data writes the Parquet files; ``<output>/_SUCCESS.json`` (written last) lists
them, so a reader never mistakes an unfinished output for a finished one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from medbalance.errors import ConfigError, DataError
from ray_jobs.checkpoint import load_checkpoint
from ray_jobs.cli import run_main
from ray_jobs.evaluate import resolve_checkpoint
from shards import storage
from shards.image import IMAGE_EXTENSIONS
from shards.schema import MANIFEST_NAME

# Inference runs on small blocks (ray_jobs.inference); gather them into files of at least this
# many rows rather than one small Parquet file per block.
OUTPUT_ROWS_PER_FILE = 50_000

SUCCESS = "_SUCCESS.json"


def _input_dataset(input_uri: str, split: str | None):
    import ray.data

    from shards import ray_dataset, read_manifest

    fs, path = storage.resolve(input_uri)
    if storage.exists(fs, f"{path}/{MANIFEST_NAME}", input_uri):
        manifest = read_manifest(input_uri)
        splits = [split] if split else manifest.splits()
        parts = [ray_dataset(input_uri, s, columns=["image", "label", "source"]) for s in splits]
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if not storage.exists(fs, path, input_uri):
        raise DataError(f"input {input_uri} does not exist")
    ds = ray.data.read_binary_files(path, filesystem=fs, include_paths=True,
                                    file_extensions=[e.lstrip(".") for e in IMAGE_EXTENSIONS]
                                    + [e.lstrip(".").upper() for e in IMAGE_EXTENSIONS])
    root = path.rstrip("/") + "/"

    def rename(batch: dict) -> dict:
        return {"image": batch["bytes"], "source": np.array([p[len(root):] if p.startswith(root) else p
                                                             for p in batch["path"]], dtype=object),
                "label": np.full(len(batch["bytes"]), -1, dtype=np.int64)}

    return ds.map_batches(rename, batch_format="numpy")


def predict(checkpoint: str, input_uri: str, output: str, *, split: str | None = None, num_actors: int = 1,
            use_gpu: bool = False, overwrite: bool = False, batch_size: int = 64) -> dict:
    """Write predictions for every image of ``input_uri``; returns the ``_SUCCESS.json`` content."""
    import pyarrow.fs as pafs

    from ray_jobs.inference import logits_dataset

    checkpoint = resolve_checkpoint(checkpoint)
    state = load_checkpoint(checkpoint)
    class_names = state["class_names"]
    out_fs, out_path = storage.resolve(output)
    if storage.exists(out_fs, out_path, output):
        existing = out_fs.get_file_info(pafs.FileSelector(out_path, recursive=True))
        if existing and not overwrite:
            raise ConfigError(f"{output} is not empty; pass --overwrite to replace it, or choose another --output")
        storage.delete_dir(out_fs, out_path)
    started = time.perf_counter()
    ds = logits_dataset(_input_dataset(input_uri, split), checkpoint, state["config"]["data"]["image_size"],
                        num_actors=num_actors, use_gpu=use_gpu, batch_size=batch_size)

    def to_rows(batch: dict) -> dict:
        logits = np.stack(batch["logits"]).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        prediction = probs.argmax(axis=1)
        return {"source": batch["source"], "label": batch["label"],
                "probabilities": [p.astype(np.float32).tolist() for p in probs],
                "prediction": prediction.astype(np.int64),
                "predicted_class": np.array([class_names[i] for i in prediction], dtype=object)}

    ds.map_batches(to_rows, batch_format="numpy").write_parquet(out_path, filesystem=out_fs,
                                                                 min_rows_per_file=OUTPUT_ROWS_PER_FILE)
    files = sorted(i.path[len(out_path) + 1:] for i in out_fs.get_file_info(pafs.FileSelector(out_path))
                   if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    import pyarrow.parquet as pq
    rows = sum(pq.ParquetFile(f"{out_path}/{f}", filesystem=out_fs).metadata.num_rows for f in files)
    success = {"files": files, "rows": rows, "checkpoint": checkpoint, "input": input_uri,
               "class_names": class_names, "seconds": round(time.perf_counter() - started, 2)}
    storage.write_bytes_atomic(out_fs, f"{out_path}/{SUCCESS}", json.dumps(success, indent=2).encode(), output)
    return success


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.predict", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint dir/file, or a run folder")
    p.add_argument("--input", required=True, help="shard dataset URI or image folder")
    p.add_argument("--output", required=True, help="output folder URI (Parquet)")
    p.add_argument("--split", default=None, help="for shard input: one split (default: all)")
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from ray_jobs.train import init_ray

    args = get_args_parser().parse_args(argv)
    init_ray()
    success = predict(args.checkpoint, args.input, args.output, split=args.split, num_actors=args.num_actors,
                      use_gpu=args.gpu, overwrite=args.overwrite, batch_size=args.batch_size)
    print(f"wrote {success['rows']} predictions in {len(success['files'])} file(s) to {args.output} "
          f"in {success['seconds']} s")
    return 0


if __name__ == "__main__":
    from ray_jobs import predict as _module
    sys.exit(run_main(_module.main))
