"""`--set key=value` overrides for a method's frozen hyper-parameter dataclass.

Values arrive as strings from the command line (or as JSON values from a result record being reproduced);
each is converted to the field's declared type, and anything that does not fit is refused with a message that
names the key, the value, the expected type and the valid keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """An override that names no field, or whose value does not fit the field's type."""


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """Turn `["T=4", "alpha=0.9"]` into `{"T": "4", "alpha": "0.9"}`; a duplicate or malformed item is an error."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not of the form key=value (for example --set sparsity=0.7)")
        if key in out:
            raise ConfigError(f"--set {key} is given twice ({out[key]!r} and {value!r})")
        out[key] = value.strip()
    return out


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(raw: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (raw is None or (isinstance(raw, str) and raw.lower() in {"none", "null"})):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(raw, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot convert {raw!r}")
    if origin is Literal:
        for a in args:
            if str(a) == str(raw):
                return a
        raise ConfigError(f"{key}={raw!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin is tuple:
        items = raw if isinstance(raw, (list, tuple)) else [s for s in str(raw).split(",") if s.strip()]
        inner = args[0] if args else str
        return tuple(_convert(i.strip() if isinstance(i, str) else i, inner, key) for i in items)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).lower()
        if s in _TRUE | _FALSE:
            return s in _TRUE
        raise ConfigError(f"{key}={raw!r} is not a boolean (use true or false)")
    if tp is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}={raw!r} is not an integer")
        try:
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
            return int(str(raw), 10)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not an integer") from None
    if tp is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}={raw!r} is not a number")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}={raw!r} is not a finite number")
        return value
    if tp is str:
        return str(raw)
    raise ConfigError(f"{key}: fields of type {tp!r} cannot be set from the command line")


def field_types(config_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def apply_overrides(config: Any, overrides: dict[str, Any], owner: str = "config") -> Any:
    """Return a copy of the frozen dataclass `config` with `overrides` converted and applied, then validated.

    A config class may define `validate(self)` raising `ConfigError` for values of the right type that are
    still out of range (a sparsity of 1.5, a negative temperature).
    """
    types_ = field_types(type(config))
    unknown = sorted(set(overrides) - set(types_))
    if unknown:
        valid = ", ".join(f"{k} ({getattr(t, '__name__', t)})" for k, t in types_.items()) or "none"
        raise ConfigError(f"{owner} has no hyper-parameter {', '.join(map(repr, unknown))}; valid keys: {valid}")
    converted = {k: _convert(v, types_[k], k) for k, v in overrides.items()}
    new = dataclasses.replace(config, **converted)
    if hasattr(new, "validate"):
        try:
            new.validate()
        except ConfigError as e:
            raise ConfigError(f"{owner}: {e}") from None
    return new


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise `ConfigError` unless lo <= value <= hi (with `*_open` making that bound strict)."""
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{name}={value} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ConfigError(f"{name}={value} must be {'<' if hi_open else '<='} {hi}")


def to_jsonable(config: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
