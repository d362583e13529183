"""Search spaces of sweeps: dotted ``TrainConfig`` keys, each with a distribution.

    space:
      loss_params.weight: {type: loguniform, low: 0.01, high: 10}
      optim.lr:           {type: loguniform, low: 0.005, high: 0.2}
      data.sampling:      {type: choice, values: [none, sqrt]}
      epochs:             {type: int, low: 4, high: 12}

``parse_space(spec, base, class_counts)`` checks the whole space before any trial starts and returns
Optuna distributions (``OptunaSearch`` samples them; the plots rebuild a study with them):

* the type is one of ``uniform`` (low, high), ``loguniform`` (0 < low), ``int`` (low, high both
  included; ``log: true`` optional) or ``choice`` (``values``: a non-empty list of scalars);
  low < high;
* every end of a range and every choice builds a valid ``TrainConfig`` from the base config through
  ``config.load_config`` (so an unknown key, or a value the config refuses, names the key), and the
  loss accepts the resulting ``loss_params`` (``losses.create_loss``: names and value ranges);
* keys the sweep sets itself (name, storage, and the per-trial resources num_workers, use_gpu,
  cpus_per_worker) cannot be searched.
"""
from __future__ import annotations

import copy
import math
import numbers

from medbalance.errors import ConfigError
from ray_jobs.classifier.config import TrainConfig
from ray_jobs.runtime import configs as config_lib

TYPES = ("uniform", "loguniform", "int", "choice")
RESERVED = ("name", "storage", "num_workers", "use_gpu", "cpus_per_worker")
_FIELDS = {"uniform": {"low", "high"}, "loguniform": {"low", "high"}, "int": {"low", "high", "log"},
           "choice": {"values"}}


def apply_params(tree: dict, params: dict) -> dict:
    """A copy of a ``TrainConfig`` dict with each dotted key of ``params`` set to its value."""
    out = copy.deepcopy(tree)
    for key, value in params.items():
        config_lib.set_path(out, key, value)  # the same setter as --set key.sub=value
    return out


def build_config(tree: dict, params: dict, where: str) -> TrainConfig:
    """``TrainConfig`` of ``tree`` with ``params`` set, through ``load_config`` (its checks apply)."""
    try:
        return config_lib.load_config(TrainConfig, base=apply_params(tree, params))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _number(key: str, spec: dict, field: str, integer: bool = False) -> float:
    if field not in spec:
        raise ConfigError(f"search space {key}: {spec['type']} needs {field!r}")
    value = spec[field]
    ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"search space {key}: {field} must be {kind}, got {value!r}")
    return value


def _distribution(key: str, spec):
    import optuna.distributions as od

    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"search space {key}: expected a mapping like {{type: loguniform, low: 0.01, "
                          f"high: 10}}, got {spec!r}")
    kind = spec["type"]
    if kind not in TYPES:
        raise ConfigError(f"search space {key}: unknown type {kind!r}; use one of {', '.join(TYPES)}")
    extra = sorted(set(spec) - _FIELDS[kind] - {"type"})
    if extra:
        raise ConfigError(f"search space {key}: {kind} takes {sorted(_FIELDS[kind])}, not {extra}")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search space {key}: choice needs a non-empty list 'values'")
        for value in values:
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise ConfigError(f"search space {key}: choice values must be scalars, got {value!r}")
        return od.CategoricalDistribution(values)
    integer = kind == "int"
    low, high = _number(key, spec, "low", integer), _number(key, spec, "high", integer)
    if not low < high:
        raise ConfigError(f"search space {key}: low ({low}) must be below high ({high})")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"search space {key}: loguniform needs low > 0, got {low}")
    if integer:
        log = bool(spec.get("log", False))
        if log and low < 1:
            raise ConfigError(f"search space {key}: int with log: true needs low >= 1, got {low}")
        return od.IntDistribution(int(low), int(high), log=log)
    return od.FloatDistribution(float(low), float(high), log=kind == "loguniform")


def _ends(distribution) -> list:
    import optuna.distributions as od

    if isinstance(distribution, od.CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def check_params(tree: dict, params: dict, where: str, class_counts: list[int] | None = None) -> TrainConfig:
    """Build the trial config of ``params`` and the loss it names; ConfigError names ``where``."""
    from losses import create_loss
    from models import list_models

    cfg = build_config(tree, params, where)
    if cfg.model not in list_models():
        raise ConfigError(f"{where}: unknown model {cfg.model!r}; known: {', '.join(list_models())}")
    try:
        create_loss(cfg.loss, class_counts=class_counts, **cfg.loss_params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return cfg


def parse_space(spec: dict, base: TrainConfig, class_counts: list[int] | None = None) -> dict:
    """Check a search space against the base config; returns ``{key: optuna distribution}``.

    Args:
        spec: ``{dotted key: {type: ..., ...}}`` as in the YAML presets.
        base: the sweep's base training config.
        class_counts: the training split's class counts (losses that need them check with them).

    Raises:
        ConfigError: naming the key, for an unknown key, type or field, a bad range, or a value
            that the training config or the loss refuses.
    """
    if not isinstance(spec, dict) or not spec:
        raise ConfigError("the sweep has no search space: give `space:` with at least one key, e.g. "
                          "loss_params.weight: {type: loguniform, low: 0.01, high: 10}")
    tree = config_lib.to_dict(base)
    distributions = {}
    for key, entry in spec.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"search space: keys must be dotted config keys, got {key!r}")
        if key in RESERVED:
            raise ConfigError(f"search space {key}: set by the sweep itself (per-trial name, storage and "
                              f"resources), so it cannot be searched; set base.{key} instead")
        distributions[key] = _distribution(key, entry)
        for value in _ends(distributions[key]):
            check_params(tree, {key: value}, f"search space {key}={value!r}", class_counts)
    return distributions


def check_points(points: list, distributions: dict, base: TrainConfig,
                 class_counts: list[int] | None = None) -> list[dict]:
    """Check ``points_to_evaluate``: each a mapping of every space key to a value inside its range."""
    if not isinstance(points, list):
        raise ConfigError(f"points_to_evaluate must be a list of mappings, got {points!r}")
    tree = config_lib.to_dict(base)
    for index, point in enumerate(points):
        where = f"points_to_evaluate[{index}]"
        if not isinstance(point, dict) or set(point) != set(distributions):
            raise ConfigError(f"{where} must give exactly the space's keys {sorted(distributions)}, "
                              f"got {point!r}")
        for key, value in point.items():
            distribution = distributions[key]
            try:
                inside = distribution._contains(distribution.to_internal_repr(value))
            except (ValueError, TypeError):
                inside = False
            if not inside:
                raise ConfigError(f"{where}: {key}={value!r} is outside the search space {distribution}")
        check_params(tree, point, where, class_counts)
    return points
