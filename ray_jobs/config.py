"""Typed job configs: dataclass defaults, a YAML overlay, then ``--set a.b=c`` overrides.

    cfg = load_config(TrainConfig, "configs/demo.yaml", ["optim.lr=0.01", "epochs=3"])
    save_yaml(cfg, path)        # the resolved config, written next to the results

Values given with ``--set`` are parsed as YAML scalars (``3`` -> int, ``true`` -> bool,
``[1, 2]`` -> list). Unknown keys are errors (a typo must not be silently ignored).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

import yaml

from medbalance.errors import ConfigError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    """A config dataclass -> plain nested dict (YAML/JSON/``weights_only`` safe)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict | None, where: str = "config") -> T:
    """Build a (nested) config dataclass from a dict; unknown keys raise ConfigError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name} must be a mapping, got {value!r}")
            kwargs[name] = from_dict(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.01"`` -> ``("optim.lr", 0.01)``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value ({exc})") from exc
    return key.strip(), value


def load_config(cls: type[T], yaml_path: str | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """Defaults <- ``base`` dict <- YAML file <- ``key=value`` overrides."""
    tree: dict = to_dict(cls())
    for layer in (base or {}, _read_yaml(yaml_path) if yaml_path else {}):
        _merge(tree, layer)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    return from_dict(cls, tree)


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def _merge(tree: dict, layer: dict) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
