"""Build every loss by name: ``create_loss(name, class_counts, **hyperparameters)``.

Losses register with ``@register_loss("name")``. Their constructors take ``class_counts`` first and
keyword-only hyperparameters with defaults; ``create_loss`` checks the names against the
constructor and raises ``ConfigError`` listing what is accepted. The package ``__init__`` imports
the loss modules, so importing ``losses`` fills the registry (as ``models`` does); nothing here
imports a loss module, so there is no import circle.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from losses.base import ClassificationLoss
from medbalance.errors import ConfigError

_LOSSES: dict[str, type[ClassificationLoss]] = {}


def register_loss(name: str) -> Callable[[type[ClassificationLoss]], type[ClassificationLoss]]:
    """Class decorator: make ``create_loss(name, ...)`` build this loss."""

    def decorator(cls: type[ClassificationLoss]) -> type[ClassificationLoss]:
        if name in _LOSSES and _LOSSES[name] is not cls:
            raise ValueError(f"loss name {name!r} is already registered by {_LOSSES[name].__name__}")
        cls.name = name
        _LOSSES[name] = cls
        return cls

    return decorator


def list_losses() -> list[str]:
    """The registered loss names, sorted."""
    return sorted(_LOSSES)


def loss_hyperparameters(name: str) -> dict[str, object]:
    """The hyperparameters of loss ``name`` and their defaults, e.g. {"gamma": 2.0} for focal."""
    cls = _get(name)
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def create_loss(name: str, class_counts: Sequence[int] | None = None, **hyperparameters) -> ClassificationLoss:
    """Build the loss registered as ``name``.

    Args:
        name: one of ``list_losses()``.
        class_counts: the training split's per-class counts (length C). Losses built on the class
            prior (class_balanced, ldam, balanced_softmax, logit_adjusted, fafl with
            counts="dataset") need them; the others use them only to check the logits' width.
        **hyperparameters: the loss's hyperparameters (see ``loss_hyperparameters(name)``).

    Raises:
        ConfigError: unknown name or hyperparameter, or a value out of range.
        DataError: bad class counts (e.g. a class with no training samples where a loss needs n > 0).
    """
    cls = _get(name)
    accepted = loss_hyperparameters(name)
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        raise ConfigError(f"loss {name!r} has no hyperparameter(s) {unknown}. Accepted (with defaults): "
                          f"{listing}.")
    return cls(class_counts, **hyperparameters)


def _get(name: str) -> type[ClassificationLoss]:
    if name not in _LOSSES:
        raise ConfigError(f"unknown loss {name!r}. Known losses: {', '.join(list_losses())}.")
    return _LOSSES[name]

