"""Finding a recipe by built-in name or by file path."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import mnemax.recipes
from mnemax.errors import ConfigError
from mnemax.recipes.overrides import apply_overrides
from mnemax.trainer.recipe import Recipe

_NOT_RECIPES = {"overrides", "registry", "summary"}  # and _private modules


def builtin_names() -> list[str]:
    """Names of the recipe modules shipped in `mnemax/recipes/`."""
    return sorted(m.name for m in pkgutil.iter_modules(mnemax.recipes.__path__)
                  if m.name not in _NOT_RECIPES and not m.name.startswith("_"))


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Resolves a recipe (built-in name, or a .py file defining `recipe() -> Recipe`), then
    applies `key=value` overrides."""
    path = Path(name_or_path)
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
