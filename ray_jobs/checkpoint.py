"""Training checkpoints: what they hold, writing them, loading them safely.

A checkpoint is a directory (local or on object storage) with ``checkpoint.pt`` and the resolved
``config.yaml``. ``checkpoint.pt`` is a dict of tensors and plain Python values only, so it loads
with ``torch.load(weights_only=True)`` (no arbitrary pickle):

    model, optimizer, scheduler, scaler      state dicts
    epoch                                    last finished epoch (0-based)
    config                                   the resolved TrainConfig as a dict
    class_names, class_counts                of the training split
    metrics                                  the validation metrics of this epoch
"""
from __future__ import annotations

import io
import os

import torch

from medbalance.errors import ConfigError, StorageError
from shards import storage

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(state: dict, directory: str) -> str:
    """Write ``state`` to ``directory/checkpoint.pt`` (temp file + rename: never half-written)."""
    path = os.path.join(directory, CHECKPOINT_FILE)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict:
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
    missing = {"model", "config", "class_names"} - set(state)
    if missing:
        raise ConfigError(f"{target} lacks {sorted(missing)}: not a medbalance training checkpoint")
    return state


def model_from_checkpoint(state: dict) -> torch.nn.Module:
    """Rebuild the model named in the checkpoint's config and load its weights (eval mode)."""
    from models import create_model

    cfg = state["config"]
    model = create_model(cfg["model"], num_classes=len(state["class_names"]), **cfg.get("model_kwargs", {}))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ConfigError(
            f"the checkpoint's weights do not fit model {cfg['model']!r} as this medbalance builds it "
            f"(was it made by another version?): {str(exc)[:500]}"
        ) from exc
    return model.eval()
