"""LDAM(-DRW) (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019).

Margins Delta_c = K / n_c^(1/4) (eq. 12), K chosen so that max_c Delta_c = max_m (authors' code).
The margin is subtracted from the true class's logit, the result scaled by s:

    L = CE( s * (z - Delta_y * onehot(y)), y )

DRW (deferred re-weighting, Sec. 3.2): from epoch ``drw_epoch`` on (compared with the value the
training loop passes to ``set_epoch``; 0-based, so drw_epoch=160 re-weights from the 161st epoch as
in the authors' CIFAR schedule), the CE is weighted by the class-balanced weights of Cui et al. with
beta 0.9999, normalised to sum C, and averaged as PyTorch's weighted ``cross_entropy`` does
(divided by the batch's weight sum), as in the authors' code. drw_epoch None or -1: no DRW.

Note on s: the authors use s = 30 with a cosine-normalised classifier (NormedLinear, logits in
[-1, 1]). With an ordinary linear head the logits are unbounded and s = 30 makes the softmax very
sharp; use s = 1 there (then max_m is a margin in logit units).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from losses.base import ClassificationLoss, class_counts_tensor, float_param
from losses.class_balanced import effective_number_weights
from losses.registry import register_loss
from medbalance.errors import ConfigError

DRW_BETA = 0.9999  # Cao et al.'s re-weighting beta


@register_loss("ldam")
class LDAMLoss(ClassificationLoss):
    """Label-distribution-aware margin loss with optional deferred re-weighting.

    Args:
        class_counts: the training split's per-class counts; required, all > 0.
        max_m: the largest margin (the rarest class's), >= 0 (default 0.5).
        s: logit scale > 0 (default 30.0, for cosine logits; see the module docstring).
        drw_epoch: first epoch with class-balanced weights (int >= 0), or None / -1 for none (default None).
    """

    def __init__(self, class_counts: Sequence[int] | None = None, *, max_m: float = 0.5, s: float = 30.0,
                 drw_epoch: int | None = None) -> None:
        super().__init__(class_counts)
        self.max_m = float_param(self.name, "max_m", max_m, low=0.0)
        self.s = float_param(self.name, "s", s, low=0.0, low_open=True)
        self.drw_epoch = _epoch_param(drw_epoch)
        counts = class_counts_tensor(self.name, class_counts, need_positive=True,
                                     why=" (its margin 1/n^(1/4) would be infinite)")
        margins = counts ** -0.25
        margins = margins * (self.max_m / margins.max())
        self.register_buffer("margins", margins.float(), persistent=False)
        self.register_buffer("drw_weights", effective_number_weights(counts, DRW_BETA).float(), persistent=False)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def reweighting(self) -> bool:
        """True once DRW is on (epoch >= drw_epoch)."""
        return self.drw_epoch is not None and self.epoch >= self.drw_epoch

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        margins = self.margins.to(logits.device)[target]  # (B,)
        shifted = logits.scatter_add(1, target[:, None], -margins[:, None])  # z - Delta_y onehot(y)
        weight = self.drw_weights.to(logits.device) if self.reweighting else None
        return F.cross_entropy(self.s * shifted, target, weight=weight)

    def extra_repr(self) -> str:
        return f"max_m={self.max_m}, s={self.s}, drw_epoch={self.drw_epoch}"


def _epoch_param(value: object) -> int | None:
    """None / -1 -> None; an integer >= 0 (or an integral float, as Tune may send) -> int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value) or value < -1:
        raise ConfigError(f"loss 'ldam': drw_epoch must be an integer epoch >= 0, or None / -1 to disable "
                          f"DRW; got {value!r}.")
    return None if int(value) == -1 else int(value)
