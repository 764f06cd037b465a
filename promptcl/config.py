"""Typed, keyword-only method configs: overrides from ``key=value`` strings, validation helpers."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
    """A bad hyperparameter or override; raised before any work starts."""


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _coerce(name: str, hint: Any, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            lowered = value.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return value
        if origin is tuple:
            (item, *_rest) = typing.get_args(hint)
            parts = [p for p in value.replace(",", " ").split() if p]
            return tuple(_coerce(name, item, p) for p in parts)
        if origin is typing.Literal:
            if value not in typing.get_args(hint):
                raise ValueError(value)
            return value
    except ValueError:
        expected = (f"one of {', '.join(map(str, typing.get_args(hint)))}" if origin is typing.Literal
                    else getattr(hint, "__name__", hint))
        raise ConfigError(f"invalid value {value!r} for {name} (expected {expected})") from None
    raise ConfigError(f"{name} cannot be set from the command line")


def apply_overrides(config, overrides: Mapping[str, Any]):
    """A copy of dataclass ``config`` with ``overrides`` (strings are parsed by field type)."""
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)} for {type(config).__qualname__}; "
            f"known: {', '.join(sorted(names))}"
        )
    values = {k: _coerce(k, hints[k], v) for k, v in overrides.items()}
    for key, value in values.items():  # "inf" and "nan" parse as floats, and pass every "> 0" check
        items = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise ConfigError(f"{key} must be finite, got {overrides[key]!r}")
    return dataclasses.replace(config, **values)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def require_layers(name: str, layers: tuple[int, ...], *, allow_empty: bool = False) -> None:
    """Block indices: distinct and non-negative (fit to a backbone is checked by the method)."""
    require((allow_empty or len(layers) >= 1) and (not layers or min(layers) >= 0) and len(set(layers)) == len(layers),
            f"{name} must be distinct non-negative block indices, got {layers}")


def as_flat_dict(config, prefix: str = "") -> dict[str, Any]:
    """Flatten a (possibly nested) dataclass/dict into ``a/b`` keys, for MLflow params."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(as_flat_dict(value, prefix=f"{name}/"))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat
