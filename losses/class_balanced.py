"""Class-balanced loss (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019).

Effective number of class c: E_c = (1 - beta^n_c) / (1 - beta) (eq. 3); class weight
w_c = 1 / E_c = (1 - beta) / (1 - beta^n_c), normalised so that sum_c w_c = C (as in the authors'
code). The loss weights each sample's base loss by its class's weight and averages over the batch:

    L = (1/B) * sum_i w_{y_i} * l_i,   l_i = -log p_i (base="ce")  or  -(1 - p_i)^gamma log p_i (base="focal")

Dividing by B, not by sum_i w_{y_i}, follows the authors' code (their focal variant divides by the
number of labels); PyTorch's ``cross_entropy(weight=...)`` would divide by the weight sum instead.
beta in [0, 1): beta = 0 gives w_c = 1 (plain CE / focal); beta -> 1 approaches inverse-frequency
weights. Default beta 0.9999 (DESIGN 4.6). Departure: the authors' softmax variant applies a
binary cross-entropy to softmax outputs; we use the softmax cross-entropy (and softmax focal loss),
the form the paper's equations describe.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from losses.base import ClassificationLoss, choice_param, class_counts_tensor, float_param
from losses.focal import focal_terms
from losses.registry import register_loss
from medbalance.errors import ConfigError


def effective_number_weights(counts: Tensor, beta: float) -> Tensor:
    """w_c = (1 - beta) / (1 - beta^n_c), normalised to sum C: counts (C,) float64 > 0 -> (C,) float64."""
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.as_tensor(beta, dtype=torch.float64), counts))
    return weights * len(counts) / weights.sum()


@register_loss("class_balanced")
class ClassBalancedLoss(ClassificationLoss):
    """Effective-number re-weighted CE or focal loss.

    Args:
        class_counts: the training split's per-class counts; required, all > 0.
        beta: in [0, 1) (default 0.9999).
        base: "ce" (default) or "focal".
        gamma: focal gamma >= 0, only with base="focal" (default 2.0 there).
    """

    def __init__(self, class_counts: Sequence[int] | None = None, *, beta: float = 0.9999, base: str = "ce",
                 gamma: float | None = None) -> None:
        super().__init__(class_counts)
        self.beta = float_param(self.name, "beta", beta, low=0.0, high=1.0, high_open=True)
        self.base = choice_param(self.name, "base", base, ("ce", "focal"))
        if self.base == "ce" and gamma is not None:
            raise ConfigError("loss 'class_balanced': gamma only applies to base='focal'; set base='focal' "
                              "or drop gamma.")
        self.gamma = 0.0 if self.base == "ce" else float_param(self.name, "gamma", 2.0 if gamma is None else gamma,
                                                               low=0.0)
        counts = class_counts_tensor(self.name, class_counts, need_positive=True,
                                     why=" (its effective number 1 - beta^0 = 0 would give an infinite weight)")
        self.register_buffer("class_weights", effective_number_weights(counts, self.beta).float(), persistent=False)

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        per_sample = focal_terms(logits, target, self.gamma)  # gamma 0: -log p_i exactly
        return (self.class_weights.to(logits.device)[target] * per_sample).mean()

    def extra_repr(self) -> str:
        return f"beta={self.beta}, base={self.base!r}, gamma={self.gamma}"
