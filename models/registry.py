"""Model registry: register classifiers by name with a decorator, build them with ``create_model``.

The pattern is timm's (``timm/models/_registry.py``): every model file decorates one small
entry function per name,

    @register_model
    def resnet50(num_classes: int, in_chans: int = 3) -> ResNet:
        ...

and ``create_model("resnet50", num_classes=7)`` looks the name up, checks the options against the
entry function's signature, builds the model and (optionally) loads weights from a local file.
Nothing is ever downloaded.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable

from torch import nn

from medbalance.errors import ConfigError
from models.pretrained import load_pretrained

_MODEL_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name; use as a decorator.

    The entry function must accept ``num_classes`` and ``in_chans`` keyword arguments; any other
    keyword argument it takes becomes an option of ``create_model`` for that name.

    Raises:
        ValueError: if the name is already registered (two files claiming one name is a bug).
    """
    name = fn.__name__
    if name in _MODEL_ENTRYPOINTS:
        raise ValueError(f"model name {name!r} is registered twice ({fn.__module__} and "
                         f"{_MODEL_ENTRYPOINTS[name].__module__})")
    _MODEL_ENTRYPOINTS[name] = fn
    return fn


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_MODEL_ENTRYPOINTS)


def model_options(name: str) -> dict[str, Any]:
    """The options of model ``name`` (besides num_classes and in_chans) and their defaults.

    Raises:
        ConfigError: unknown name.
    """
    if name not in _MODEL_ENTRYPOINTS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    params = inspect.signature(_MODEL_ENTRYPOINTS[name]).parameters.values()
    return {p.name: p.default for p in params if p.name not in ("num_classes", "in_chans")}


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered classifier by name.

    Args:
        name: a name from ``list_models()``, e.g. ``"adsr_resnet50"``.
        num_classes: size of the classifier output (0 gives an identity head where the model
            allows it: ``forward`` then returns the pooled features).
        in_chans: number of input image channels (1 for grey scale; the stem conv is resized).
        pretrained: path of a local ``.pth`` file holding a state dict (e.g. a torchvision ResNet's
            ``model.state_dict()``); every tensor whose name and shape match is loaded, except the
            classifier ``fc.*``. ``None`` keeps the random initialisation. Nothing is downloaded.
        **kwargs: model options, e.g. ``gsa="channelwise"`` or ``psf_kernels=(1, 3, 3)`` for the
            ADSR models; see ``docs/models.md``.

    Returns:
        The model, in train mode, on the CPU.

    Raises:
        ConfigError: unknown name, an option the model does not take, a bad class or channel
            count, or a weight file that cannot be used.
    """
    if name not in _MODEL_ENTRYPOINTS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError(f"model {name!r}: num_classes must be an int >= 0, got {num_classes!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError(f"model {name!r}: in_chans must be an int >= 1, got {in_chans!r}")
    entry = _MODEL_ENTRYPOINTS[name]
    signature = inspect.signature(entry)
    try:
        signature.bind(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as err:
        options = [p for p in signature.parameters if p not in ("num_classes", "in_chans")]
        raise ConfigError(
            f"model {name!r} does not take options {sorted(kwargs)} ({err}); "
            f"its options are: {', '.join(options) or 'none'}") from err
    model = entry(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if pretrained is not None:
        load_pretrained(model, pretrained, model_name=name)
    return model
