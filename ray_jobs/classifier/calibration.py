"""A run's fitted temperature: ``<run>/calibration.json``, written by ``evaluate --calibrate`` and
applied by ``predict`` and ``export`` (temperature scaling, Guo et al. 2017, "On Calibration of
Modern Neural Networks": ``p = softmax(z / T)`` for logits ``z`` of shape N x K).

Where it lives (:func:`run_folder`): a Ray Train checkpoint ``<storage>/<name>/checkpoint_<time>``
belongs to the run folder ``<storage>/<name>`` (next to ``result.json``); a ``checkpoint.pt``
file counts as its folder; any other checkpoint folder (one made by hand) is its own run folder.
A run has one file, fitted for one checkpoint, which it names: predicting with another checkpoint
of the run refuses it rather than apply a temperature fitted to other weights.

The temperature must be fitted on the val split: one fitted on test has seen the labels it is
then judged on, and is refused wherever it is read.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import posixpath

from medbalance import __version__
from medbalance.errors import ConfigError
from shards import storage

CALIBRATION_FILE = "calibration.json"
FITTED_SPLIT = "val"
_ADVICE = "rerun `python -m ray_jobs.evaluate --checkpoint CKPT --calibrate` (it fits on val), or pass --no-calibration"


def _checkpoint_folder(checkpoint: str) -> str:
    """A checkpoint URI (folder or ``.pt`` file) -> its folder, without a trailing slash."""
    folder = checkpoint.rstrip("/")
    return posixpath.dirname(folder) if folder.endswith(".pt") else folder


def checkpoint_name(checkpoint: str) -> str:
    """The checkpoint's folder name (``checkpoint_<time>`` for Ray Train's), which identifies it in its run."""
    return posixpath.basename(_checkpoint_folder(checkpoint))


def run_folder(checkpoint: str) -> str:
    """The run folder that holds ``calibration.json`` for ``checkpoint`` (see the module docstring)."""
    folder = _checkpoint_folder(checkpoint)
    if posixpath.basename(folder).startswith("checkpoint_"):
        return posixpath.dirname(folder) or "."
    return folder


def calibration_path(checkpoint: str) -> str:
    return storage.join(run_folder(checkpoint), CALIBRATION_FILE)


def write_calibration(checkpoint: str, data: str, temperature: float, fitted: dict, evaluated: dict | None = None,
                      evaluated_split: str | None = None) -> str:
    """Write ``<run>/calibration.json`` atomically; returns its URI.

    Args:
        checkpoint: the resolved checkpoint the temperature belongs to.
        data: the dataset whose val split it was fitted on.
        temperature: T > 0.
        fitted: ``metrics.calibration.calibration_summary`` on val (ECE, MCE, Brier, NLL before/after).
        evaluated, evaluated_split: the same on the split evaluate reported, when that is not val.
    """
    keep = ("ece_before", "ece_after", "brier_before", "brier_after", "mce_before", "mce_after",
            "nll_before", "nll_after")
    content = {"temperature": float(temperature), "split": FITTED_SPLIT, "checkpoint": checkpoint,
               "checkpoint_name": checkpoint_name(checkpoint), "data": data,
               FITTED_SPLIT: {k: fitted[k] for k in keep if k in fitted},
               "medbalance_version": __version__, "created": dt.datetime.now(dt.timezone.utc).isoformat()}
    if evaluated is not None and evaluated_split and evaluated_split != FITTED_SPLIT:
        content[evaluated_split] = {k: evaluated[k] for k in keep if k in evaluated}
    uri = calibration_path(checkpoint)
    fs, path = storage.resolve(uri)
    storage.write_bytes_atomic(fs, path, (json.dumps(content, indent=2) + "\n").encode(), uri)
    return uri


def read_calibration(checkpoint: str) -> dict | None:
    """The checked content of ``checkpoint``'s ``calibration.json``, or None where the run has none.

    Raises:
        ConfigError (naming the file): not JSON, no positive finite temperature, fitted on a split
            other than val, or fitted for another checkpoint of the run.
    """
    uri = calibration_path(checkpoint)
    fs, path = storage.resolve(uri)
    if not storage.exists(fs, path, uri):
        return None
    try:
        content = json.loads(storage.read_bytes(fs, path, uri))
    except ValueError as exc:
        raise ConfigError(f"{uri} is not valid JSON ({exc}); {_ADVICE}") from exc
    temperature = content.get("temperature") if isinstance(content, dict) else None
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or \
            not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"{uri} holds no positive temperature ({temperature!r}); {_ADVICE}")
    if content.get("split") != FITTED_SPLIT:
        raise ConfigError(f"{uri} holds a temperature fitted on the {content.get('split')!r} split; only one "
                          f"fitted on {FITTED_SPLIT!r} is applied (a test-fitted temperature has seen the labels "
                          f"it is judged on); {_ADVICE}")
    if content.get("checkpoint_name") != checkpoint_name(checkpoint):
        raise ConfigError(f"{uri} was fitted for checkpoint {content.get('checkpoint_name')!r}, not "
                          f"{checkpoint_name(checkpoint)!r} ({checkpoint}); {_ADVICE}")
    return content


def run_temperature(checkpoint: str, use_calibration: bool = True) -> tuple[float | None, str]:
    """The temperature to apply to ``checkpoint``'s logits and where it came from.

    Returns:
        ``(T, "<run>/calibration.json")``; ``(None, "--no-calibration")`` when turned off;
        ``(None, "none: no <run>/calibration.json")`` when the run has none.
    """
    if not use_calibration:
        return None, "--no-calibration"
    content = read_calibration(checkpoint)
    if content is None:
        return None, f"none: no {calibration_path(checkpoint)}"
    return float(content["temperature"]), calibration_path(checkpoint)


def describe(temperature: float | None, source: str) -> str:
    """One line for a job's output: which temperature it applies."""
    if temperature is None:
        return f"calibration: none applied ({source}); probabilities are softmax(logits)"
    return f"calibration: temperature {temperature:.4f} from {source}; probabilities are softmax(logits / T)"
