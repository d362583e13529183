"""How every job config is built: dataclass defaults, a YAML overlay, then ``--set a.b=c`` overrides.

    cfg = load_config(TrainConfig, "configs/demo.yaml", ["optim.lr=0.01", "epochs=3"])
    dump_yaml(cfg)              # the resolved config, written next to the results

Values given with ``--set`` are parsed as YAML scalars (``3`` -> int, ``true`` -> bool,
``[1, 2]`` -> list). Unknown keys are errors (a typo must not be silently ignored). Every value is
then checked against its field's type hint and rule (``ray_jobs.runtime.config_checks``: ``1e6`` is a
float, ``epochs=two`` or ``lr=0`` an error naming the key), when the config is built: before Ray
starts. The configs themselves live next to their jobs: ``classifier.config.TrainConfig``,
``gcgan.config.GanConfig``, ``sweeps.config.SweepConfig`` / ``CompareConfig``.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

import yaml

from medbalance.errors import ConfigError
from ray_jobs.runtime.config_checks import check_value

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    """A config dataclass -> plain nested dict (YAML/JSON/``weights_only`` safe)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict | None, where: str = "config",
              sources: dict[str, str] | None = None) -> T:
    """Build a (nested) config dataclass from a dict, checking every value.

    Each value is converted and checked against its field's type hint and rule
    (:mod:`ray_jobs.runtime.config_checks`); then the class's ``validate(sources)``, if it has one, checks
    what spans fields. ``sources`` maps dotted keys to where their value came from (for messages).

    Raises:
        ConfigError: an unknown key, or a value that does not fit, naming the key and the value.
    """
    data = dict(data or {})
    sources = sources or {}
    prefix = "" if where == "config" else where.removeprefix("config.") + "."
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint, key = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping (a section), got {value!r}")
            kwargs[name] = from_dict(hint, value, f"{where}.{name}", sources)
        else:
            kwargs[name] = check_value(key, value, hint, fields[name].metadata.get("rule"), sources.get(key))
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if hasattr(obj, "validate"):
        obj.validate(sources)
    return obj


def set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``dotted`` "a.b", making sections on the way."""
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


def load_config(cls: type[T], yaml_path: str | None = None, overrides: list | None = None,
                base: dict | None = None) -> T:
    """Defaults <- ``base`` dict <- YAML file <- ``key=value`` overrides; every value checked
    (:func:`from_dict`), so a bad one fails here, before Ray starts.

    ``overrides`` are ``"key=value"`` strings (shown in messages as ``--set key=value``) or
    ``("key=value", "how the user wrote it")`` pairs, e.g. ``("epochs=3", "--epochs 3")``.
    """
    tree: dict = to_dict(cls())
    sources: dict[str, str] = {}
    for layer, source in ((base or {}, "the base config"),
                          (_read_yaml(yaml_path) if yaml_path else {}, yaml_path)):
        merge(tree, layer)
        sources.update({key: source for key in _dotted_keys(layer)})
    for item in overrides or []:
        text, source = item if isinstance(item, tuple) else (item, f"--set {item}")
        key, value = parse_override(text)
        set_path(tree, key, value)
        sources[key] = source
    return from_dict(cls, tree, sources=sources)


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted_keys(value, prefix + key + ".")
    return keys


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


def merge(tree: dict, layer: dict) -> None:
    """Merge ``layer`` into ``tree`` in place, section by section (a layer's value wins)."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            merge(tree[key], value)
        else:
            tree[key] = value


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def json_schema(cls: type, title: str | None = None) -> dict:
    """The JSON Schema (draft 2020-12) of a config dataclass, for editors that complete YAML presets
    (``--print-schema``): each field's type, default, range and names (its rule), nested sections,
    ``additionalProperties: false`` (unknown keys are errors here too)."""
    schema = _object_schema(cls)
    schema.update({"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title or cls.__name__})
    return schema


def _object_schema(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    defaults = to_dict(cls())
    properties = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            properties[f.name] = _object_schema(hint)
            continue
        prop = _type_schema(hint)
        prop["default"] = defaults[f.name]
        rule = f.metadata.get("rule")
        if rule is not None:
            allowed = rule.allowed()
            if allowed is not None:
                prop["enum"] = allowed + ([None] if None in (defaults[f.name],) else [])
            for key, bound in (("exclusiveMinimum", rule.gt), ("minimum", rule.ge), ("exclusiveMaximum", rule.lt),
                               ("maximum", rule.le)):
                if bound is not None:
                    prop[key] = bound
        properties[f.name] = prop
    return {"type": "object", "properties": properties, "additionalProperties": False}


def _type_schema(hint: Any) -> dict:
    """``int`` -> integer, ``float`` -> number, ``X | None`` -> either, ..."""
    names = {int: "integer", float: "number", bool: "boolean", str: "string", list: "array", dict: "object"}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and len(args) < len(typing.get_args(hint)):   # Optional[X]
        return {"type": [names.get(args[0], "string"), "null"]}
    return {"type": names.get(typing.get_origin(hint) or hint, "string")}
