"""Batch inference with Ray Data: a pool of model actors over ``map_batches`` (CPU or GPU).

Used by ``ray_jobs.evaluate`` (a split of a shard dataset) and ``ray_jobs.predict`` (shards or an
image folder). Each actor loads the checkpoint once (``weights_only=True``) and turns batches of
uint8 images into logits.
"""
from __future__ import annotations

import gc

import numpy as np
import torch

from medbalance.errors import DataError
from ray_jobs.classifier.pipeline import InputSpec, normalize, preprocess_batch
from ray_jobs.runtime.checkpoint import load_checkpoint, model_from_checkpoint


class Predictor:
    """Ray Data actor: ``{"image": N x C x S x S (uint8/int16), ...}`` -> the same batch plus
    ``logits`` (N x classes), normalised as the checkpoint's training was (``state["input"]``)."""

    def __init__(self, checkpoint: str, use_gpu: bool = False, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        state = load_checkpoint(checkpoint, map_location="cpu")
        self.spec = InputSpec.from_dict(state.get("input"))
        self.model = model_from_checkpoint(state).to(self.device)

    def __call__(self, batch: dict) -> dict:
        with torch.inference_mode():
            images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
            logits = self.model(normalize(images, self.spec.mean, self.spec.std)).float().cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "image"}
        out["logits"] = logits
        return out


def logits_dataset(ds, checkpoint: str, image_size: int, *, num_actors: int = 1, use_gpu: bool = False,
                   batch_size: int = 64, spec: InputSpec | None = None):
    """Encoded rows (``image``, ``label``, ``source``[, ``pixel_map``]) -> rows with ``logits``, by an
    actor pool. ``spec``: the checkpoint's ``InputSpec`` (channels, window, depth), so images are
    prepared as in training.

    The encoded rows are re-blocked into ``batch_size``-row blocks first (a shard file is read as
    one block): decoding then runs as parallel tasks that feed every actor.
    """
    if spec is None:
        spec = InputSpec.from_dict(load_checkpoint(checkpoint).get("input"))
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    ds = ds.map_batches(preprocess_batch, batch_size=batch_size,
                        fn_kwargs=dict(image_size=image_size, augment="none", train=False, keep_source=True,
                                       spec=spec))
    return ds.map_batches(Predictor, fn_constructor_kwargs={"checkpoint": checkpoint, "use_gpu": use_gpu},
                          batch_size=batch_size, compute=_actor_pool(num_actors),
                          num_gpus=1 if use_gpu else 0, num_cpus=1)


def _actor_pool(num_actors: int):
    import ray.data

    return ray.data.ActorPoolStrategy(size=max(1, num_actors))


def split_logits(checkpoint: str, data_uri: str, split: str, image_size: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """All logits (N x C) and labels (N) of one split of a shard dataset.

    Prints a progress line every few seconds. A damaged shard raises a DataError naming it.
    """
    from ray_jobs.runtime.data_errors import data_error_message
    from ray_jobs.runtime.progress import Progress
    from shards import ray_dataset, read_manifest
    from shards.reader import read_columns

    manifest = read_manifest(data_uri)
    total = sum(manifest.counts.get(split, {}).values())
    ds = ray_dataset(data_uri, split, columns=read_columns(manifest, "image", "label", "source"),
                     include_paths=True)
    rows = logits_dataset(ds, checkpoint, image_size, **kwargs).select_columns(["logits", "label"])
    logits, labels = [], []
    progress = Progress(f"scored {split}:", total=total, unit="images")
    failure = None
    try:
        for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
            logits.append(np.stack(batch["logits"]).astype(np.float32))
            labels.append(np.asarray(batch["label"], np.int64))
            progress.update(len(labels[-1]))
    except Exception as exc:  # noqa: BLE001 (a damaged shard becomes one clear error)
        failure = data_error_message(exc, data_uri)
        if failure is None:
            raise
    if failure:
        gc.collect()  # frees the failed executor's actors (a reference cycle) now; see predict
        raise DataError(f"scoring split {split!r}: {failure}")
    if progress.done >= 10_000:
        progress.finish()
    if not logits:
        raise DataError(f"split {split!r} of {data_uri} has no rows")
    return np.concatenate(logits), np.concatenate(labels)
