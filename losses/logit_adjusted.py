"""Prior-adjusted softmax cross-entropy: logit adjustment and balanced softmax.

Logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, eq. 10):

    L = CE( z + tau * log pi, y ),   pi_c = n_c / sum_k n_k  (the training split's class prior)

Balanced softmax (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition",
NeurIPS 2020, eq. 4): CE( z + log n, y ), which equals logit adjustment with tau = 1 (log n and
log pi differ by a constant per row, which softmax ignores).

The adjustment is applied in the loss only: at test time the model's raw logits z are used (which
is what makes the prediction balanced). Uniform counts give log pi constant: plain CE.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from losses.base import ClassificationLoss, class_counts_tensor, float_param
from losses.registry import register_loss


@register_loss("logit_adjusted")
class LogitAdjustedLoss(ClassificationLoss):
    """CE on logits + tau * log(class prior).

    Args:
        class_counts: the training split's per-class counts; required, all > 0.
        tau: adjustment strength >= 0 (default 1.0; 0 is plain CE).
    """

    def __init__(self, class_counts: Sequence[int] | None = None, *, tau: float = 1.0) -> None:
        super().__init__(class_counts)
        self.tau = float_param(self.name, "tau", tau, low=0.0)
        counts = class_counts_tensor(self.name, class_counts, need_positive=True,
                                     why=" (its log prior would be -inf)")
        self.register_buffer("log_prior", (counts / counts.sum()).log().float(), persistent=False)

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits + self.tau * self.log_prior.to(logits.device), target)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


@register_loss("balanced_softmax")
class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax (Ren et al. 2020): CE on logits + log(class counts). No hyperparameters.

    Args:
        class_counts: the training split's per-class counts; required, all > 0.
    """

    def __init__(self, class_counts: Sequence[int] | None = None) -> None:
        super().__init__(class_counts, tau=1.0)

    def extra_repr(self) -> str:
        return ""
