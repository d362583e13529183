"""Turn user inputs (numpy arrays, lists or tensors on any device) into checked CPU tensors.

probs (N, C) float64 rows summing to 1, logits (N, C) float64, targets (N,) int64 in [0, C);
anything else raises ``DataError`` saying what was wrong.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from medbalance.errors import DataError

ROW_SUM_TOLERANCE = 1e-2  # loose enough for bf16/fp16 probabilities, tight enough to catch logits


def as_tensor(values: object, what: str) -> Tensor:
    if isinstance(values, Tensor):
        return values.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(values))
    except (TypeError, ValueError) as err:
        raise DataError(f"{what} must be an array or tensor; got {type(values).__name__} ({err}).") from None


def as_scores(values: object, what: str) -> Tensor:
    """(N, C) finite float64, N >= 1, C >= 2."""
    scores = as_tensor(values, what)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] < 2 or not (
            scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64)):
        raise DataError(f"{what} must be a numeric array of shape (samples, classes) with >= 1 sample and "
                        f">= 2 classes; got shape {tuple(scores.shape)} and dtype {scores.dtype}.")
    scores = scores.double()
    if not torch.isfinite(scores).all():
        raise DataError(f"{what} hold NaN or infinite values (rows {_rows(~torch.isfinite(scores).all(1))}).")
    return scores


def as_probs(values: object) -> Tensor:
    """(N, C) float64 probabilities in [0, 1] whose rows sum to 1 (within ROW_SUM_TOLERANCE)."""
    probs = as_scores(values, "probs")
    if (probs < 0).any() or (probs > 1 + 1e-6).any():
        raise DataError("probs must lie in [0, 1]; these look like logits: apply softmax first "
                        f"(rows {_rows(((probs < 0) | (probs > 1 + 1e-6)).any(1))}).")
    off = (probs.sum(1) - 1).abs() > ROW_SUM_TOLERANCE
    if off.any():
        raise DataError(f"probs rows must sum to 1 (softmax outputs); rows {_rows(off)} do not.")
    return probs


def as_targets(values: object, num_samples: int, num_classes: int) -> Tensor:
    """(N,) int64 class ids in [0, C)."""
    targets = as_tensor(values, "targets")
    if targets.ndim != 1 or targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise DataError("targets must be a 1-D array of integer class ids; got shape "
                        f"{tuple(targets.shape)} and dtype {targets.dtype}.")
    if targets.shape[0] != num_samples:
        raise DataError(f"targets has {targets.shape[0]} labels but the scores have {num_samples} rows.")
    bad = (targets < 0) | (targets >= num_classes)
    if bad.any():
        raise DataError(f"targets hold class id(s) {sorted(set(targets[bad].tolist()))[:10]} outside "
                        f"[0, {num_classes}) (rows {_rows(bad)}); check the label mapping.")
    return targets.long()


def as_class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """The given names (as str), or "0", "1", ... when None."""
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes or len(set(names)) != len(names):
        raise DataError(f"class_names must hold {num_classes} distinct names (one per column); got {names}.")
    return names


def _rows(mask: Tensor) -> list[int]:
    return torch.nonzero(mask).flatten()[:10].tolist()
