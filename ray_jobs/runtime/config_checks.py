"""Type and range checks of config values, applied when a config is built (``config.from_dict``).

Every value, whether it came from a dataclass default, a YAML preset, a flag or ``--set``, is
checked against its field's type hint and converted where the conversion is unambiguous:

=============== ============================================================================
hint            accepted (anything else is a ConfigError)
=============== ============================================================================
``int``         an int, an integral float (``3.0``) or a string of one (``"3"``, ``"1e3"``)
``float``       an int or float, or a string of a finite number: ``"1e6"`` (YAML 1.1 reads an
                exponent without a dot as a string) becomes ``1000000.0``
``bool``        ``true``/``false`` (YAML's spellings, or the strings ``"true"``/``"false"``)
``str``         a string, or a number (``name=2024`` is the string ``"2024"``); not a bool
``list``        a list (``[30, 60]``); its items are checked when the rule names their type
``dict``        a mapping
``X | None``    ``null`` (YAML) or an ``X``
=============== ============================================================================

A field's :class:`Rule` (``dataclasses.field(metadata=rule(...))``) adds what the type cannot say:
a range (``gt``, ``ge``, ``lt``, ``le``), the allowed names (``choices``: a tuple, or a function
returning the names of a registry, so a new model or loss is accepted without touching this
file) and the type of list items. The message names the key, the value, where it came from and
what is expected::

    data.image_size = -3 (from --set data.image_size=-3): expected an integer >= 8
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from medbalance.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field's value may be, beyond its type (see the module docstring)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    items: type | None = None
    nonempty: bool = False

    def allowed(self) -> list[Any] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    def describe(self, noun: str) -> str:
        """``"an integer >= 8"``, ``"one of sgd, adam, adamw"``, ``"a number > 0 and < 1"``."""
        allowed = self.allowed()
        if allowed is not None:
            return "one of " + ", ".join(str(a) for a in allowed)
        bounds = [f"{op} {_number(v)}" for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt),
                                                      ("<=", self.le)) if v is not None]
        if self.nonempty:
            bounds.append("not empty")
        return f"{noun} {' and '.join(bounds)}".strip()

    def holds(self, value: Any) -> bool:
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            return False
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if ((self.gt is not None and not value > self.gt) or (self.ge is not None and not value >= self.ge)
                    or (self.lt is not None and not value < self.lt) or (self.le is not None and not value <= self.le)):
                return False
        if self.nonempty and not value:
            return False
        return True


def _number(value: float) -> str:
    """A bound as written: ``8``, ``4294967295``, ``0.5``, ``1e-08``."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def field(default, **checks):
    """A dataclass field with a default (a callable: a factory) and a :class:`Rule`:
    ``epochs: int = field(10, ge=1)``."""
    if callable(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=rule(**checks))
    return dataclasses.field(default=default, metadata=rule(**checks))


def rule(**kwargs) -> dict:
    """Field metadata carrying a :class:`Rule`: ``field(default=0.01, metadata=rule(gt=0))``."""
    return {"rule": Rule(**kwargs)}


_NOUNS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
          list: "a list", dict: "a mapping"}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


class _Mismatch(Exception):
    """A value that does not fit its type (turned into a ConfigError naming the key)."""


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            value = _to_float(text)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Mismatch


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Mismatch
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise _Mismatch from None
    if not math.isfinite(number):
        raise _Mismatch
    return number


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Mismatch


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _Mismatch


_CONVERTERS: dict[type, Callable[[Any], Any]] = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}


def convert(value: Any, hint: Any, items: type | None = None) -> Any:
    """``value`` converted to ``hint`` (see the module table).

    Raises:
        _Mismatch: it does not fit.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        for arg in args:
            try:
                return convert(value, arg, items)
            except _Mismatch:
                continue
        raise _Mismatch
    base = origin or hint
    if value is None:
        raise _Mismatch
    if base in _CONVERTERS:
        return _CONVERTERS[base](value)
    if base in (list, tuple) or (isinstance(base, type) and issubclass(base, (list, tuple))):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [convert(v, items) for v in value] if items else list(value)
    if base is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if base is Any:
        return value
    raise TypeError(f"config_checks cannot check values of type {hint!r}")  # a bug in a config class


def noun(hint: Any, items: type | None = None) -> str:
    """``"an integer"``, ``"a number or null"``, ``"a list of integers"`` for a hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return " or ".join(noun(a, items) for a in args if a is not type(None))
    base = origin or hint
    if base is list and items is not None:
        return f"a list of {_PLURALS.get(items, items.__name__)}"
    return _NOUNS.get(base, getattr(base, "__name__", str(base)))


def check_value(key: str, value: Any, hint: Any, field_rule: Rule | None = None, source: str | None = None) -> Any:
    """Convert and check one value.

    Args:
        key: the dotted key, for the message (``"optim.lr"``).
        value: as read from YAML / ``--set`` / a flag.
        hint: the field's type hint.
        field_rule: the field's :class:`Rule`, if any.
        source: where the value came from (``"--set optim.lr=1e6"``, a YAML path), for the message.

    Returns:
        The converted value.

    Raises:
        ConfigError: ``"<key> = <value> (from <source>): expected <what>"``.
    """
    field_rule = field_rule or Rule()
    items = field_rule.items
    if isinstance(value, bool) and field_rule.allowed() is not None:
        # YAML 1.1 reads unquoted off/on/no/yes as booleans: amp=off means the name "off".
        spelling = {False: ("off", "no", "false"), True: ("on", "yes", "true")}[value]
        value = next((name for name in spelling if name in field_rule.allowed()), value)
    expected = field_rule.describe(noun(hint, items))
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        expected += ", or null"
    where = f" (from {source})" if source else ""
    try:
        converted = convert(value, hint, items)
    except _Mismatch:
        raise ConfigError(f"{key} = {value!r}{where}: expected {expected}") from None
    if converted is not None and not field_rule.holds(converted):
        raise ConfigError(f"{key} = {value!r}{where}: expected {expected}")
    return converted


def check_options(key: str, options: dict, defaults: dict[str, Any], what: str,
                  sources: dict[str, str] | None = None) -> dict:
    """Check a free-form options mapping (``loss_params``, ``model_kwargs``) against the accepted
    names and their defaults: unknown names are errors; a value whose default is a number or a bool
    is converted like a field of that type (``"1e-3"`` -> 0.001).

    Args:
        key: the mapping's key (``"loss_params"``).
        options: its value.
        defaults: accepted name -> default.
        what: what takes them, for the message (``"loss 'cws'"``).
        sources: dotted key -> where the value came from.

    Raises:
        ConfigError: naming the key, the unknown option and what is accepted.
    """
    sources = sources or {}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        source = sources.get(f"{key}.{unknown[0]}") or sources.get(key)
        listing = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
        raise ConfigError(f"{key}{f' (from {source})' if source else ''}: {what} has no option(s) {unknown}; "
                          f"accepted (with defaults): {listing}")
    out = {}
    for name, value in options.items():
        default = defaults[name]
        kind = type(default) if isinstance(default, (bool, int, float)) else None
        if kind is int and isinstance(value, float) and not value.is_integer():
            kind = float  # an int default does not forbid a fractional value (e.g. a weight of 1)
        dotted = f"{key}.{name}"
        out[name] = (check_value(dotted, value, kind, source=sources.get(dotted) or sources.get(key))
                     if kind else value)
    return out
