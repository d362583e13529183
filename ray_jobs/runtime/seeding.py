"""Seeding a worker: Python, NumPy and PyTorch from one number (seed + rank, as nanoGPT does)."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, reproducible: bool = False) -> None:
    """Seed every generator this process uses.

    Args:
        seed: the worker's seed (the job passes ``cfg.seed + rank``).
        reproducible: also ask PyTorch for deterministic kernels (slower; warns where none exists).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if reproducible:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
