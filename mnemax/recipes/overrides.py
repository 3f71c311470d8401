"""`--set a.b.c=value` overrides, parsed to the type of the field they replace."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any

from mnemax.errors import ConfigError, MnemaxError, unknown_choice

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def apply_overrides(config: Any, overrides: Iterable[str]) -> Any:
    """Returns `config` (a dataclass tree) with each `key=value` applied in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (example: --set "
                              "model.num_layers=4)")
        config = _set(config, key.strip().split("."), raw.strip(), key.strip())
    return config


def _set(node: Any, path: list[str], raw: str, full_key: str) -> Any:
    name, rest = path[0], path[1:]
    fields = {f.name: f for f in dataclasses.fields(node)}
    if name not in fields:
        prefix = full_key[: len(full_key) - len(".".join(path))]
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        raise ConfigError(
            f"unknown override key {full_key!r}: {type(node).__name__} has no field {name!r}"
            f"{hint} (fields: {', '.join(fields)})"
        )
    current = getattr(node, name)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"override key {full_key!r}: {name!r} is a value, not a section")
        value = _set(current, rest, raw, full_key)
    else:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"override key {full_key!r} names a whole section; set one of its "
                              f"fields, e.g. {full_key}.{dataclasses.fields(current)[0].name}=...")
        hint = typing.get_type_hints(type(node))[name]
        value = parse_value(raw, hint, full_key)
    try:
        return dataclasses.replace(node, **{name: value})
    except MnemaxError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"override {full_key}={raw!r} is invalid: {err}") from None


def parse_value(raw: str, hint: Any, key: str) -> Any:
    """Parses `raw` as a value of type `hint` (bool, int, float, str, Optional, tuple, Literal)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null"):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(raw, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"override {key}={raw!r}: not a valid value of {hint}")
    if origin is typing.Literal:
        if raw not in [str(a) for a in args]:
            raise unknown_choice(key, raw, args)
        return next(a for a in args if str(a) == raw)
    if origin is tuple:
        items = [s.strip() for s in raw.split(",") if s.strip()]
        item_type = args[0] if args else str
        return tuple(parse_value(s, item_type, key) for s in items)
    if hint is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"override {key}={raw!r}: expected a boolean (true or false)")
    if hint is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"override {key}={raw!r}: expected an integer") from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"override {key}={raw!r}: expected a number") from None
    if hint is str:
        return raw
    raise ConfigError(f"override {key}: fields of type {hint} cannot be set from the command line")
