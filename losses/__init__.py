"""Loss registry: build every loss by name.

    >>> from losses import create_loss
    >>> criterion = create_loss("fafl", class_counts=[700, 180, 90], m=0.5)
    >>> loss = criterion(logits, target)   # logits B x C, target B (int64) -> scalar
"""
from losses.registry import create_loss, list_losses, register_loss

__all__ = ["create_loss", "list_losses", "register_loss"]
