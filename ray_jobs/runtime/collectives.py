"""The few collectives the jobs' workers share: rank/world, gather, and agreeing to stop.

A worker must never leave the loop alone: the others would wait in the next all-reduce for ever.
So every per-step check ends in :func:`agree`, one tiny all-reduce of a status code, and all
workers stop together when any of them has a reason to (a non-finite loss, a damaged shard):
:func:`stop_if_any` raises :class:`Stop` on every worker, with the first complaining worker's message.
Without a process group (one worker, tests) each function is the local identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# Per-step status codes; the largest one wins (a data error outranks a non-finite loss).
OK, NON_FINITE, DATA_ERROR = 0, 1, 2


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    if _group_size() == 1:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-worker tensor (first dim may differ) over all workers, on CPU."""
    if _group_size() == 1:
        return tensor.cpu()
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def gather_objects(value) -> list:
    """Every worker's ``value`` (picklable), in rank order."""
    if _group_size() == 1:
        return [value]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def agree(status: int, device: torch.device | None = None) -> int:
    """The largest status code over all workers (one all-reduce of one number)."""
    flag = torch.tensor([float(status)], device=device or "cpu")
    if _group_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def loss_status(loss: torch.Tensor) -> int:
    """``NON_FINITE`` for a NaN/inf loss, else ``OK``."""
    return OK if bool(torch.isfinite(loss.detach()).all()) else NON_FINITE


class Stop(Exception):
    """Every worker agreed to stop (non-finite loss or damaged data); carries the outcome.

    ``status`` is ``"non_finite"`` or ``"data_error"``; ``message`` is the first complaint.
    """

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def stop_if_any(status: int, message: str, device: torch.device | None = None) -> None:
    """Agree with every worker; if any had a problem, raise :class:`Stop` with the first one's message."""
    worst = agree(status, device)
    if worst == OK:
        return
    messages = [m for m in gather_objects(message if status else "") if m]
    raise Stop("data_error" if worst == DATA_ERROR else "non_finite", messages[0])
