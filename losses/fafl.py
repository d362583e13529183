"""FAFL, the frequency-aware focal loss of the DIM paper (paper 2; DESIGN 4.3).

Logits z (B, C), labels y (B,), p_i = softmax(z_i)_{y_i}.

    f_k       = m / n_k^(1/4)   (n_k = class k's count; f_k = 0 for a class absent from the batch)
    z_hat     = z + f           (f_k added to column k of every row)
    p_hat_i   = softmax(z_hat_i)_{y_i}
    alpha_i   = alpha0 * (1 - p_i),   beta_i = beta0 * p_i      (not detached)
    L         = mean_i[ -alpha_i * (1 - p_hat_i)^beta_i * log p_hat_i ]

Defaults alpha0 = 1, beta0 = 2, m = 0.5 (DESIGN 4.3; the authors' notebook used other values,
0.5 / 3.0 / 1.0). ``counts="batch"`` (default, the paper) takes n_k from the mini-batch;
``counts="dataset"`` takes n_k from ``class_counts`` (stable under small batches).

Direction of the offset (flagged, not changed): f is largest for the rarest class and is *added*
to that class's logit in every row, so during training the rare classes get a head start that the
model's raw logits z (used at test time) do not have: the opposite direction to logit adjustment
(z + tau * log prior, log prior most negative for rare classes) and LDAM (margin subtracted from the
rare true class). Implemented as DESIGN 4.3 states; worth checking against the authors' code.

Numerics: computed in float32 from log-softmax; log(1 - p) comes from a logsumexp over the other
classes (exact where p rounds to 1), and (1 - p_hat)^beta = exp(beta * log(1 - p_hat)), so the value
and the gradient stay finite at logits of +/-1e4 and under bf16 autocast. Departure from the
written formula: none in value; only the way (1 - p) and its power are evaluated.

DDP: with ``counts="batch"`` the counts are per worker by default (``sync=False``, the paper's
single-GPU setting). ``sync=True`` all-reduces the counts, so n_k are the global batch's counts;
the mean over i stays per worker, so the average over workers of the per-worker loss equals the
single-process loss on the global batch when the workers' batch sizes are equal (and DDP's gradient
averaging then gives the global-batch gradient).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from losses.base import (ClassificationLoss, bool_param, choice_param, class_counts_tensor, float_param,
                         true_class_log_probs)
from losses.distributed import all_reduce_sum
from losses.registry import register_loss
from medbalance.errors import ConfigError


def frequency_offsets(counts: Tensor, m: float) -> Tensor:
    """f_k = m / n_k^(1/4), and 0 where n_k = 0: counts (C,) -> offsets (C,)."""
    return torch.where(counts > 0, m / counts.clamp_min(1.0) ** 0.25, torch.zeros_like(counts))


@register_loss("fafl")
class FAFLoss(ClassificationLoss):
    """Frequency-aware focal loss (DIM paper, DESIGN 4.3).

    Args:
        class_counts: the training split's counts; required (and all > 0) for counts="dataset".
        m: offset scale m >= 0 (default 0.5).
        alpha0: modulation scale alpha0 > 0 (default 1.0).
        beta0: focusing scale beta0 >= 0 (default 2.0).
        counts: "batch" (n_k from the mini-batch, the paper) or "dataset" (n_k = class_counts).
        sync: with counts="batch", all-reduce n_k over DDP workers (default False, per worker).
    """

    def __init__(self, class_counts: Sequence[int] | None = None, *, m: float = 0.5, alpha0: float = 1.0,
                 beta0: float = 2.0, counts: str = "batch", sync: bool = False) -> None:
        super().__init__(class_counts)
        self.m = float_param(self.name, "m", m, low=0.0)
        self.alpha0 = float_param(self.name, "alpha0", alpha0, low=0.0, low_open=True)
        self.beta0 = float_param(self.name, "beta0", beta0, low=0.0)
        self.counts = choice_param(self.name, "counts", counts, ("batch", "dataset"))
        self.sync = bool_param(self.name, "sync", sync)
        if self.counts == "dataset":
            if self.sync:
                raise ConfigError("fafl: sync=True only applies to counts='batch' (with "
                                  "counts='dataset' the n_k are the same on every worker); drop sync.")
            n = class_counts_tensor(self.name, class_counts, need_positive=True,
                                    why=" (counts='dataset' divides by n_k^(1/4))")
            self.register_buffer("dataset_offsets", frequency_offsets(n, self.m).float(), persistent=False)
        else:
            self.dataset_offsets = None

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.dataset_offsets is not None:
            offsets = self.dataset_offsets.to(logits.device)  # (C,)
        else:
            n = torch.bincount(target, minlength=logits.shape[1]).to(logits.dtype)  # (C,)
            if self.sync:
                n = all_reduce_sum(n)
            offsets = frequency_offsets(n, self.m)
        log_p, log_1m_p = true_class_log_probs(logits, target)  # (B,), (B,)
        log_p_hat, log_1m_p_hat = true_class_log_probs(logits + offsets, target)  # z_hat = z + f
        alpha = self.alpha0 * log_1m_p.exp()  # alpha0 * (1 - p_i)
        beta = self.beta0 * log_p.exp()  # beta0 * p_i
        return (-alpha * torch.exp(beta * log_1m_p_hat) * log_p_hat).mean()

    def extra_repr(self) -> str:
        return f"m={self.m}, alpha0={self.alpha0}, beta0={self.beta0}, counts={self.counts!r}, sync={self.sync}"

