"""Sum a tensor over the DDP workers, with gradients (the ``sync=True`` option of CWS and FAFL).

``all_reduce_sum(x)`` returns sum over workers of x when a process group of size > 1 is
initialised, and x itself otherwise (one process *is* the global batch). The backward pass of
``torch.distributed.nn.functional.all_reduce`` all-reduces (sums) the incoming gradients, so a
loss built from the summed tensor sends every worker's share of the gradient back to the worker
whose logits produced it.

Gradient scale: when every worker computes the same global loss L from the summed tensor, the
gradient that reaches worker w's logits is world_size * dL/dz_w (each of the world_size identical
copies of L contributes dL/dz_w); DDP then divides the parameter gradients by world_size, so the
update is exactly the single-process gradient of L on the global batch.
"""
from __future__ import annotations

import warnings

import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """The size of the default process group, or 1 outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all workers (differentiable); identity outside a group of size > 1."""
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    # torch 2.14 marks this autograd-aware collective deprecated (FutureWarning) in favour of the
    # private torch.distributed._functional_collectives; it still works and exists in every
    # torch >= 2.4 we support, so keep it and silence the per-call warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(tensor, op=dist.ReduceOp.SUM)

