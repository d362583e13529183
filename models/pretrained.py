"""Load weights from a local state-dict file into any registered model (no downloads, ever).

The file is read with ``torch.load(path, weights_only=True, map_location="cpu")``: only tensors
and plain containers are unpickled, never arbitrary objects. Every tensor whose name AND shape
match a tensor of the model is copied in, except the classifier (``fc.*``, whose shape depends
on the number of classes). The names of every ResNet-family model here (resnet*, adsr_resnet*,
se_resnet50, srm_resnet50, cabnet50) line up with torchvision's, so a torchvision ResNet state dict
fills the whole backbone and the added modules (``*.adsr.*``, ``*.se.*``, ``*.srm.*``, ``gab``,
``cab``) are reported as missing.

Input channels: when the model was built with ``in_chans != 3``, the file's 3-channel stem conv
weight ``W`` (O x 3 x k x k) is adapted instead of skipped (timm's ``adapt_input_conv`` rule):
``in_chans == 1`` takes ``W.sum(dim=1)`` (a grey image replicated to RGB gives the same output);
otherwise the RGB filters are repeated cyclically to ``in_chans`` channels and scaled by
``3 / in_chans`` (keeps the output scale for inputs with similar per-channel statistics).

Accepted file layouts: a flat state dict, or a dict holding one under ``"model"`` or
``"state_dict"`` (our training checkpoints hold ``{"model": ...}``); a ``"module."`` prefix on every
key (a DDP-wrapped model's state dict) is stripped.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medbalance.errors import ConfigError

log = logging.getLogger(__name__)

CLASSIFIER_PREFIX = "fc."
_HOW_TO_SAVE = ("save one with torch.save(model.state_dict(), PATH) from a torchvision ResNet "
                "(or from a model built by models.create_model), or pass pretrained=None")


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: each list holds state-dict keys.

    Attributes:
        path: the file read.
        loaded: keys copied from the file (same name and shape).
        adapted: keys copied after adapting the input-channel dimension (the stem conv).
        missing: model keys the file did not fill (classifier excluded), e.g. the ADSR modules.
        unexpected: file keys with no model key of that name (classifier excluded).
        mismatched: keys present in both with different shapes (not loaded).
        classifier: the file's ``fc.*`` keys, skipped on purpose.
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    classifier: list[str] = field(default_factory=list)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"pretrained weight file {str(path)!r} does not exist (or is not a "
                          f"file); {_HOW_TO_SAVE}")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch.load raises many types (UnpicklingError, RuntimeError, ...)
        raise ConfigError(
            f"pretrained weight file {str(path)!r} cannot be read as a PyTorch state dict "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"{_HOW_TO_SAVE}") from err
    if isinstance(obj, Mapping):
        for wrapper_key in ("model", "state_dict"):
            if isinstance(obj.get(wrapper_key), Mapping):
                obj = obj[wrapper_key]
                break
    if (not isinstance(obj, Mapping) or not obj
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise ConfigError(f"pretrained weight file {str(path)!r} holds a {type(obj).__name__}, "
                          f"not a state dict (a dict of name -> tensor); {_HOW_TO_SAVE}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Turn an O x 3 x k x k stem weight into O x in_chans x k x k (see module docstring)."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // weight.shape[1])  # ceil
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def load_pretrained(model: nn.Module, path: str | os.PathLike,
                    model_name: str = "model") -> LoadReport:
    """Copy matching tensors of a local state-dict file into ``model`` (in place).

    Args:
        model: the freshly built model.
        path: the ``.pth`` file (see the module docstring for accepted layouts).
        model_name: used in messages only.

    Returns:
        A ``LoadReport``; the same lists are logged (INFO; WARNING for unexpected/mismatched).

    Raises:
        ConfigError: the file is missing, unreadable, not a state dict, or none of its tensors
            match the model by name and shape.
    """
    path = Path(path)
    file_state = _read_state_dict(path)
    model_state = model.state_dict()
    report = LoadReport(path=str(path))
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in file_state.items():
        if key.startswith(CLASSIFIER_PREFIX):
            report.classifier.append(key)
        elif key not in model_state:
            report.unexpected.append(key)
        elif tensor.shape == model_state[key].shape:
            to_load[key] = tensor
            report.loaded.append(key)
        elif (tensor.ndim == 4 and tensor.shape[1] == 3 and model_state[key].ndim == 4
              and tensor.shape[0] == model_state[key].shape[0]
              and tensor.shape[2:] == model_state[key].shape[2:]):
            to_load[key] = _adapt_input_conv(tensor, model_state[key].shape[1])
            report.adapted.append(key)
        else:
            report.mismatched.append(key)
    if not report.loaded:
        raise ConfigError(
            f"pretrained weight file {str(path)!r}: none of its {len(file_state)} tensors match "
            f"{model_name} by name and shape (file keys look like {sorted(file_state)[:3]}, model "
            f"keys like {sorted(model_state)[:3]}); use a state dict of the same architecture "
            f"family (e.g. torchvision resnet50 for adsr_resnet50), or pretrained=None")
    model.load_state_dict(to_load, strict=False)
    filled = set(to_load)
    report.missing = [k for k in model_state
                      if k not in filled and not k.startswith(CLASSIFIER_PREFIX)]
    log.info("%s: loaded %d tensors from %s (%d adapted to in_chans: %s); classifier skipped: %s; "
             "missing (kept at init): %s", model_name, len(report.loaded), path,
             len(report.adapted), report.adapted, report.classifier, report.missing)
    if report.unexpected or report.mismatched:
        log.warning("%s: %s has tensors that were not loaded: unexpected %s; shape mismatch %s",
                    model_name, path, report.unexpected, report.mismatched)
    return report
