"""Loss registry: build every loss by name.

    >>> from losses import create_loss
    >>> criterion = create_loss("fafl", class_counts=[700, 180, 90], m=0.5)
    >>> loss = criterion(logits, target)   # logits B x C, target B (int64) -> scalar
"""
from losses.registry import create_loss, list_losses, register_loss

# Importing the loss files registers their names (as models/ does); nothing else is exported.
from losses import ce, class_balanced, cws, fafl, focal, ldam, logit_adjusted  # noqa: F401, E402

__all__ = ["create_loss", "list_losses", "register_loss"]
