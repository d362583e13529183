"""Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, eq. 4), softmax form.

    L = mean_i[ -(1 - p_i)^gamma * log p_i ],   p_i = softmax(z_i)_{y_i}

gamma >= 0 (default 2); gamma = 0 is cross-entropy. No alpha balancing term here (the
``class_balanced`` loss with base="focal" provides class weights). The paper states the loss for
sigmoid outputs; the softmax form is the usual multiclass one. (1 - p)^gamma is evaluated as
exp(gamma * log(1 - p)) with log(1 - p) from a logsumexp, finite at saturated logits.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from losses.base import ClassificationLoss, float_param, true_class_log_probs
from losses.registry import register_loss


def focal_terms(logits: Tensor, target: Tensor, gamma: float) -> Tensor:
    """Per-sample focal loss -(1 - p_i)^gamma * log p_i: (B, C), (B,) -> (B,)."""
    log_p, log_1m_p = true_class_log_probs(logits, target)
    return -torch.exp(gamma * log_1m_p) * log_p


@register_loss("focal")
class FocalLoss(ClassificationLoss):
    """Softmax focal loss.

    Args:
        class_counts: optional; only used to check the logits' width.
        gamma: focusing parameter >= 0 (default 2.0).
    """

    def __init__(self, class_counts: Sequence[int] | None = None, *, gamma: float = 2.0) -> None:
        super().__init__(class_counts)
        self.gamma = float_param(self.name, "gamma", gamma, low=0.0)

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return focal_terms(logits, target, self.gamma).mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"
