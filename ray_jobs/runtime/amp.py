"""Mixed precision: which autocast dtype a worker uses, from the ``amp`` setting and its device.

``auto``: bf16 on a GPU that supports it, else fp16 (with a ``GradScaler``); off on CPU.
``bf16`` also runs on CPU; ``fp16`` needs a GPU.
"""
from __future__ import annotations

import torch

from medbalance.errors import ConfigError

AMP_MODES = ("auto", "bf16", "fp16", "off")


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device``; None means full precision."""
    if mode not in AMP_MODES:
        raise ConfigError(f"unknown amp mode {mode!r}; use one of {AMP_MODES}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if device.type != "cuda":
        raise ConfigError("amp=fp16 needs a GPU; use bf16 or off on CPU")
    return torch.float16


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
