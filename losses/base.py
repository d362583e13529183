"""What every loss shares: input checks, float32 computation, ``set_epoch``, hyperparameter checks.

A loss is an ``nn.Module`` called as ``loss(logits, target)``:
logits (B, C) float (any dtype, any autocast state), target (B,) integer class ids in [0, C);
it returns a float32 scalar. Subclasses implement ``compute(logits, target)``, which receives
float32 logits with autocast switched off, so that log/exp/pow run in float32 under bf16 autocast.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from medbalance.errors import ConfigError, DataError


class ClassificationLoss(nn.Module):
    """Base class of the registered losses.

    Args:
        class_counts: the training split's per-class counts (length C), or None for losses
            that do not use them. When given, ``forward`` checks that the logits have C columns.
    """

    name: str = "?"  # set by ``register_loss``

    def __init__(self, class_counts: Sequence[int] | None = None) -> None:
        super().__init__()
        self.num_classes: int | None = None if class_counts is None else len(class_counts)

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at the start of every epoch; a no-op unless overridden."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = check_inputs(logits, target, self.num_classes, self.name)
        with _autocast_off(logits.device.type):
            return self.compute(logits.float(), target)

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class _autocast_off:
    """``torch.autocast(device, enabled=False)`` where autocast exists for the device type."""

    def __init__(self, device_type: str) -> None:
        available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))
        self._ctx = torch.autocast(device_type, enabled=False) if available(device_type) else None

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def check_inputs(logits: Tensor, target: Tensor, num_classes: int | None, loss_name: str) -> Tensor:
    """Raise ``DataError`` unless logits is (B, C) float and target (B,) integer in [0, C).

    Returns the target as int64. The range check reads one boolean from the device (a sync on
    GPU); it turns a CUDA device-side assert into a readable error.
    """
    where = f"loss {loss_name!r}"
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim != 2:
        raise DataError(f"{where}: logits must be a float tensor of shape (batch, classes); got "
                        f"{_describe(logits)}.")
    if not isinstance(target, Tensor) or target.ndim != 1 or target.is_floating_point() \
            or target.dtype == torch.bool or target.is_complex():
        raise DataError(f"{where}: target must be an integer tensor of shape (batch,) holding class "
                        f"ids; got {_describe(target)}.")
    batch, classes = logits.shape
    if target.shape[0] != batch:
        raise DataError(f"{where}: logits have {batch} rows but target has {target.shape[0]} labels.")
    if batch == 0:
        raise DataError(f"{where}: empty batch; use a loader that never yields empty batches "
                        "(e.g. drop_last=True).")
    if classes < 2:
        raise DataError(f"{where}: logits have {classes} column(s); a classifier needs at least 2.")
    if num_classes is not None and classes != num_classes:
        raise DataError(f"{where}: logits have {classes} columns but class_counts has {num_classes} "
                        "classes; build the model and the loss from the same class list.")
    if bool(((target < 0) | (target >= classes)).any()):
        bad = target[(target < 0) | (target >= classes)]
        raise DataError(f"{where}: target holds class id(s) {sorted(set(bad.tolist()))[:10]} outside "
                        f"[0, {classes}); check the label mapping of the data.")
    return target.long()


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def true_class_log_probs(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """log p_y and log(1 - p_y) per row, p = softmax(logits); both (B,), finite for finite logits.

    log(1 - p_y) = logsumexp over the other classes - logsumexp over all classes, which stays
    exact and finite where p_y rounds to 1 (unlike log1p(-p_y)), so its gradient stays finite too.
    """
    log_norm = torch.logsumexp(logits, dim=1)  # (B,)
    true_logit = logits.gather(1, target[:, None]).squeeze(1)  # (B,)
    others = logits.scatter(1, target[:, None], float("-inf"))  # (B, C), true class masked
    return true_logit - log_norm, torch.logsumexp(others, dim=1) - log_norm


# ----------------------------------------------------------------------------- hyperparameters
def float_param(loss_name: str, name: str, value: object, *, low: float | None = None,
                high: float | None = None, low_open: bool = False, high_open: bool = False) -> float:
    """A finite real hyperparameter in the given range, as a Python float; else ``ConfigError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"loss {loss_name!r}: {name} must be a finite number; got {value!r}.")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ConfigError(f"loss {loss_name!r}: {name}={value} is outside {bounds}.")
    return value


def bool_param(loss_name: str, name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"loss {loss_name!r}: {name} must be true or false; got {value!r}.")
    return bool(value)


def choice_param(loss_name: str, name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"loss {loss_name!r}: {name} must be one of {list(choices)}; got {value!r}.")
    return str(value)


def class_counts_tensor(loss_name: str, class_counts: Sequence[int] | None, *,
                        need_positive: bool, why: str = "") -> Tensor:
    """The counts as a float64 tensor (C,), checked: integers >= 0, and > 0 where ``need_positive``.

    ``ConfigError`` when the loss needs counts and got None; ``DataError`` for bad counts.
    """
    if class_counts is None:
        raise ConfigError(f"loss {loss_name!r} needs class_counts (the training split's per-class "
                          "counts, length C); pass class_counts=[n_0, n_1, ...].")
    counts = np.asarray(class_counts.detach().cpu() if isinstance(class_counts, Tensor) else class_counts)
    if counts.ndim != 1 or counts.size < 2 or counts.dtype.kind not in "iuf" \
            or not np.all(np.isfinite(counts)) or np.any(counts != np.round(counts)) or np.any(counts < 0):
        raise DataError(f"loss {loss_name!r}: class_counts must be a list of >= 2 non-negative "
                        f"integers; got {class_counts!r}.")
    if need_positive and np.any(counts == 0):
        missing = [int(i) for i in np.flatnonzero(counts == 0)]
        raise DataError(f"loss {loss_name!r}: class(es) {missing} have 0 samples in the training "
                        f"split{why}. Add samples of these classes to the training split, drop the "
                        "classes from the class list, or use a loss that does not need counts (ce, cws, "
                        "focal, fafl with counts='batch').")
    return torch.as_tensor(counts, dtype=torch.float64)
