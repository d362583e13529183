"""CE + CWS: cross-entropy plus the class-wise softmax term of ADSR-Net (paper 1; DESIGN 4.2).

With p = softmax(z) and n_c the number of samples of class c in the batch, for every class present
(n_c > 0):

    L_c   = -log( (1/n_c) * sum_{i: y_i = c} (p_{i,c} + 1e-7) )
    L_CWS = (1/C) * sum_c L_c          (absent classes add 0 but count in the 1/C)
    L     = L_CE + weight * L_CWS      (weight, "the CWS weight", default 1.0; Tune searches it)

L_CWS is small only when *every* class's mean probability of its own label is high, so a rare class
weighs as much as a frequent one, however few of its samples the batch holds.

DDP: by default (``sync=False``) the class means are per worker, as in the authors' single-GPU code
and at no communication cost; each worker then sees only B/world_size samples, so a rare class's
mean rests on fewer samples. ``sync=True`` all-reduces the per-class sums and counts (one
differentiable all-reduce of a (2, C) tensor per step), which makes L_CWS equal to the single-process
L_CWS of the global batch on every worker; the gradient DDP applies is then the global-batch
gradient of L_CWS (see ``losses/distributed.py``). The CE term is a per-worker mean either way;
DDP's gradient averaging makes it the global-batch CE when the workers' batch sizes are equal.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.base import ClassificationLoss, bool_param, float_param
from losses.distributed import all_reduce_sum
from losses.registry import register_loss

CWS_EPS = 1e-7  # added to every p_{i,c} inside the log (DESIGN 4.2)


def cws_term(logits: Tensor, target: Tensor, *, sync: bool = False) -> Tensor:
    """L_CWS alone (DESIGN 4.2): logits (B, C), target (B,) int64 -> scalar (float32).

    Args:
        sync: sum the class sums and counts over the DDP workers first (see the module docstring).
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    p_true = logits.softmax(dim=1).gather(1, target[:, None]).squeeze(1)  # (B,) p_{i, y_i}
    sums = logits.new_zeros(num_classes).index_add(0, target, p_true + CWS_EPS)  # (C,)
    counts = torch.bincount(target, minlength=num_classes).to(logits.dtype)  # (C,)
    if sync:
        sums, counts = all_reduce_sum(torch.stack([sums, counts]))
    present = counts > 0
    # absent classes: log(1) = 0, and no 0/0 anywhere in the graph (no host sync either)
    class_means = torch.where(present, sums / counts.clamp_min(1.0), torch.ones_like(sums))
    return -torch.log(class_means).sum() / num_classes


@register_loss("cws")
class CWSLoss(ClassificationLoss):
    """L = CE + weight * L_CWS (ADSR-Net, paper 1, DESIGN 4.2).

    Args:
        class_counts: optional; only used to check the logits' width (the 1/C uses the logits' C).
        weight: the CWS weight w >= 0 (default 1.0).
        sync: all-reduce the CWS class sums and counts over DDP workers (default False: per worker,
            as in the authors' code; True makes the CWS term the global-batch term).
    """

    def __init__(self, class_counts: Sequence[int] | None = None, *, weight: float = 1.0,
                 sync: bool = False) -> None:
        super().__init__(class_counts)
        self.weight = float_param(self.name, "weight", weight, low=0.0)
        self.sync = bool_param(self.name, "sync", sync)

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target) + self.weight * cws_term(logits, target, sync=self.sync)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, sync={self.sync}"
