"""Finding a recipe by built-in name, by file path, or from a run's resolved `recipe.json`."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import json
import pkgutil
import types
import typing
from pathlib import Path
from typing import Any

import mnemax.recipes
from mnemax.errors import ConfigError, MnemaxError
from mnemax.recipes.overrides import apply_overrides
from mnemax.trainer.recipe import Recipe

_NOT_RECIPES = {"overrides", "registry", "summary"}  # and _private modules


def builtin_names() -> list[str]:
    """Names of the recipe modules shipped in `mnemax/recipes/`."""
    return sorted(m.name for m in pkgutil.iter_modules(mnemax.recipes.__path__)
                  if m.name not in _NOT_RECIPES and not m.name.startswith("_"))


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Resolves a recipe (built-in name, a .py file defining `recipe() -> Recipe`, or the
    `recipe.json` a run wrote in its run dir), then applies `key=value` overrides."""
    path = Path(name_or_path)
    if name_or_path.endswith(".json"):
        return apply_overrides(recipe_from_json(path), overrides)
    if name_or_path.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"recipe file {name_or_path} does not exist")
        spec = importlib.util.spec_from_file_location(f"mnemax_user_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        default_name = path.stem
    elif name_or_path in builtin_names():
        module = importlib.import_module(f"mnemax.recipes.{name_or_path}")
        default_name = name_or_path
    else:
        close = difflib.get_close_matches(name_or_path, builtin_names(), n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown recipe {name_or_path!r}. {hint}Built-in recipes: "
            f"{', '.join(builtin_names())}; or pass the path of a .py file that defines recipe()"
        )
    if not hasattr(module, "recipe"):
        raise ConfigError(f"recipe module {name_or_path} does not define recipe() -> Recipe")
    recipe = module.recipe()
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipe() in {name_or_path} returned {type(recipe).__name__}, "
                          "not mnemax.trainer.recipe.Recipe")
    if recipe.name == "recipe":
        recipe = dataclasses.replace(recipe, name=default_name)
    return apply_overrides(recipe, overrides)


def recipe_from_json(path: Path) -> Recipe:
    """The recipe a run resolved, read back from its `recipe.json` (`recipe_to_dict`'s output:
    the model's class is named by `model._type`). Keys the file lacks keep their defaults (a
    file written by an older mnemax); a key the recipe has no field for is an error."""
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); pass the recipe.json a run wrote "
                          "in its run dir, a built-in recipe name or a .py recipe") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("_type"), str):
        raise ConfigError(f"{path} is not a resolved recipe: it needs a \"model\" object with "
                          "\"_type\" (the model config class), as `mnemax train` writes it")
    model = dict(model)
    model_cls = _model_class(model.pop("_type"), path)
    recipe = _build(Recipe, {**data, "model": {}}, "", path)
    return dataclasses.replace(recipe, model=_build(model_cls, model, "model.", path))


def _model_class(type_name: str, source: Path) -> type:
    module_name, _, class_name = type_name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"{source}: model._type={type_name!r} is not an importable model "
                          "config class (module.Class)")
    return cls


def _build(cls: type, value: Any, prefix: str, source: Path) -> Any:
    """Dataclass `cls` from the JSON object `value`; `prefix` is its recipe key (`model.`)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the recipe'} must be a JSON "
                          f"object of {cls.__name__} fields, not {value!r}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in value if key not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]} ({cls.__name__} has no "
                          f"field {unknown[0]!r}{hint}); fields: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _convert(hints[key], item, f"{prefix}{key}", source)
              for key, item in value.items()}
    try:
        return cls(**kwargs)
    except MnemaxError as err:
        raise ConfigError(f"{source}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'recipe'} is invalid: {err}") from None


def _convert(hint: Any, value: Any, key: str, source: Path) -> Any:
    """A JSON value as the field type `hint` wants it: nested configs, tuples, floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:
            try:
                return _convert(option, value, key, source)
            except MnemaxError:
                continue
        return _convert(options[-1], value, key, source)
    if origin is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], item, key, source) for item in value)
        if args and len(args) == len(value):
            pairs = zip(args, value, strict=True)
            return tuple(_convert(a, item, key, source) for a, item in pairs)
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
