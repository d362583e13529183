"""Cross-entropy, the baseline: L = mean_i -log softmax(z_i)_{y_i}.

Input (B, C) logits and (B,) targets; output a scalar. No hyperparameters.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from losses.base import ClassificationLoss
from losses.registry import register_loss


@register_loss("ce")
class CrossEntropyLoss(ClassificationLoss):
    """Plain softmax cross-entropy (mean over the batch).

    Args:
        class_counts: optional; only used to check the logits' width.
    """

    def __init__(self, class_counts: Sequence[int] | None = None) -> None:
        super().__init__(class_counts)

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target)
