"""Training checkpoints: what they hold, writing them, loading them safely.

A checkpoint is a directory (local or on object storage) with ``checkpoint.pt`` and the resolved
``config.yaml``. Workers write them through Ray Train (:func:`report`, rank 0 only) and read them
back with :func:`restore_state` (Ray's own checkpoint after a failure, else the newest one of an
interrupted earlier run). ``checkpoint.pt`` is a dict of tensors and plain Python values only, so it loads
with ``torch.load(weights_only=True)`` (no arbitrary pickle):

    model, optimizer, scheduler, scaler      state dicts
    epoch                                    last finished epoch (0-based)
    config                                   the resolved TrainConfig as a dict
    class_names, class_counts                of the training split
    metrics                                  the validation metrics of this epoch
    input                                    how images become inputs (ray_jobs.classifier.pipeline.InputSpec:
                                             channels, window, depth, mean/std); absent in
                                             checkpoints made before it existed (= the defaults)
"""
from __future__ import annotations

import io
import json
import os

import torch

from medbalance.errors import ConfigError, StorageError
from shards import storage

CHECKPOINT_FILE = "checkpoint.pt"
# torch.save writes a zip archive; its end-of-central-directory record (22 bytes, no archive
# comment) is the last thing written.
_ZIP_END, _ZIP_END_SIZE = b"PK\x05\x06", 22


def save_checkpoint(state: dict, directory: str) -> str:
    """Write ``state`` to ``directory/checkpoint.pt`` (temp file + rename: never half-written)."""
    path = os.path.join(directory, CHECKPOINT_FILE)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def is_complete(uri: str) -> bool:
    """Whether checkpoint folder ``uri`` holds a whole ``checkpoint.pt`` (reads only its last 22 bytes).

    Ray Train persists a reported checkpoint by copying its folder to the run's storage; a driver
    killed during that copy leaves a folder whose ``checkpoint.pt`` was cut off, and so lacks the
    zip end record that ``torch.save`` writes last.

    Raises:
        StorageError: the storage cannot be read.
    """
    target = storage.join(uri, CHECKPOINT_FILE)
    fs, path = storage.resolve(target)
    try:
        with fs.open_input_file(path) as f:
            size = f.size()
            if size < _ZIP_END_SIZE:
                return False
            f.seek(size - _ZIP_END_SIZE)
            tail = f.read(_ZIP_END_SIZE)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise storage.explain(target, exc, "read") from exc
    return tail.startswith(_ZIP_END) and tail[-2:] == b"\x00\x00"


def report(metrics: dict, state: dict | None = None, files: dict[str, str] | None = None) -> None:
    """``ray.train.report`` this worker's metrics, with a checkpoint when ``state`` is given.

    Args:
        metrics: this epoch's (or iteration's) metrics.
        state: the checkpoint's content (rank 0 passes it, other ranks None).
        files: extra text files to put in the checkpoint folder, name -> content.
    """
    import tempfile

    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(state, tmp)
        for name, text in (files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore_state(resume_from: str | None, map_location) -> dict | None:
    """The state a worker starts from: the newer of Ray's checkpoint (after a worker failure, or a
    run Ray restored) and the one at ``resume_from`` (the newest complete checkpoint folder the
    driver found), else None.

    Both can exist and disagree after a killed driver: Ray Train restores its checkpoint manager's
    snapshot, which lists only the checkpoints the dead controller had registered, while the workers
    may have written newer ones before they were stopped. Ray names checkpoint folders
    ``checkpoint_<date and time>``, so the later name is the newer checkpoint.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint and not (resume_from and _is_newer(resume_from, checkpoint.path)):
        with checkpoint.as_directory() as ckpt_dir:
            return torch.load(os.path.join(ckpt_dir, CHECKPOINT_FILE), map_location=map_location,
                              weights_only=True)
    if resume_from:
        return load_checkpoint(resume_from, map_location=map_location, required=())
    return None


def _is_newer(uri: str, path: str) -> bool:
    """Whether checkpoint folder ``uri`` was written after ``path`` (both named by Ray Train)."""
    a, b = uri.rstrip("/").rsplit("/", 1)[-1], path.rstrip("/").rsplit("/", 1)[-1]
    return a.startswith("checkpoint_") and b.startswith("checkpoint_") and a > b


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu",
                    required: tuple[str, ...] = ("model", "config", "class_names")) -> dict:
    """Load a checkpoint from a directory, a ``checkpoint.pt`` file, or an ``s3://`` URI of either.

    Raises:
        ConfigError: if nothing loadable is there.
    """
    target = uri if str(uri).endswith(".pt") else storage.join(uri, CHECKPOINT_FILE)
    fs, path = storage.resolve(target)
    try:
        data = storage.read_bytes(fs, path, target)
    except StorageError as exc:
        raise ConfigError(f"no checkpoint at {uri}: {exc}. Pass a checkpoint directory (see "
                          "best_checkpoint in the run's result.json) or its checkpoint.pt") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for bad files
        raise ConfigError(f"{target} is not a medbalance checkpoint that loads with "
                          f"weights_only=True: {exc}") from exc
    missing = set(required) - set(state)
    if missing:
        raise ConfigError(f"{target} lacks {sorted(missing)}: not a medbalance training checkpoint")
    return state


def model_from_checkpoint(state: dict) -> torch.nn.Module:
    """Rebuild the model named in the checkpoint's config and load its weights (eval mode)."""
    from models import create_model

    cfg = state["config"]
    channels = int((state.get("input") or {}).get("channels", 3))
    model = create_model(cfg["model"], num_classes=len(state["class_names"]), in_chans=channels,
                         **cfg.get("model_kwargs", {}))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ConfigError(
            f"the checkpoint's weights do not fit model {cfg['model']!r} as this medbalance builds it "
            f"(was it made by another version?): {str(exc)[:500]}"
        ) from exc
    return model.eval()


def resolve_checkpoint(uri: str) -> str:
    """A checkpoint directory/file as given, or a run folder's best checkpoint."""
    fs, path = storage.resolve(uri)
    if storage.exists(fs, f"{path}/result.json", uri):
        best = json.loads(storage.read_bytes(fs, f"{path}/result.json", uri))["best_checkpoint"]
        if not best:
            raise ConfigError(f"{uri}/result.json names no best checkpoint (did the run finish an epoch?)")
        return best
    return uri
