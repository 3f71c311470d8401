"""The package's layers import only downward: layers < parallel < trainer < recipes < launch.

`mnemax` itself and `mnemax.errors` sit below every layer and import nothing of the others.
Two checks: the source of every module (top-level and function-level imports alike, since an
import inside a function to dodge a cycle is still an upward dependency), and a fresh
interpreter that imports every module lowest layer first and sees which modules each import
loads (a module that fails to import, as a cycle makes it, or pulls in a higher layer
fails). Both failed while `mnemax.trainer.setup` and `.loop` imported the `Recipe` schema from
`mnemax.recipes.schema` (now `mnemax.trainer.recipe`).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mnemax"
LAYERS = ("layers", "parallel", "trainer", "recipes", "launch")
BASE = ("mnemax", "mnemax.errors")  # importable by every layer


def layer(module: str) -> int:
    """-1 for the base modules, else the position of the module's package in `LAYERS`."""
    if module in BASE:
        return -1
    parts = module.split(".")
    if parts[0] != "mnemax" or len(parts) < 2 or parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add its package to LAYERS or BASE")
    return LAYERS.index(parts[1])


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> list[str]:
    """Every module under mnemax/, lowest layer first (the order the subprocess imports them)."""
    names = [module_name(p) for p in PACKAGE.rglob("*.py")]
    return sorted(names, key=lambda m: (layer(m), m))


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """The mnemax modules that `source` (the text of `module`) imports anywhere in its body;
    `from mnemax import x` counts as `mnemax.x` (x is a subpackage or a module)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            if base == "mnemax":
                found.update(f"mnemax.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == "mnemax"}


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """`"module -> target"` for each import of a higher layer than `module`'s."""
    return [f"{module} -> {target}"
            for target in sorted(imported_modules(source, module, is_package))
            if layer(target) > layer(module)]


def test_no_module_imports_a_higher_layer():
    upward = [edge for path in sorted(PACKAGE.rglob("*.py"))
              for edge in upward_imports(path.read_text(), module_name(path),
                                         path.name == "__init__.py")]
    assert not upward, ("upward imports (allowed: layers < parallel < trainer < recipes < "
                        "launch, mnemax.errors by all): " + "; ".join(upward))


IMPORT_ALL = """
import importlib, json, sys
report = {}
for name in json.loads(sys.argv[1]):
    before = set(sys.modules)
    importlib.import_module(name)
    report[name] = sorted(m for m in set(sys.modules) - before
                          if m == "mnemax" or m.startswith("mnemax."))
print(json.dumps(report))
"""


def test_every_module_imports_in_dependency_order_without_a_higher_layer():
    modules = all_modules()
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL, json.dumps(modules)],
                          capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    pulled_up = [f"{name} loaded {other}" for name in modules for other in loaded[name]
                 if layer(other) > layer(name)]
    assert not pulled_up, "; ".join(pulled_up)


def test_the_source_check_sees_imports_in_functions_and_relative_imports():
    source = ("import jax\n"
              "from . import step\n"
              "from mnemax import errors\n"
              "def f():\n    from mnemax.recipes.registry import load_recipe\n"
              "class C:\n    def g(self):\n        from ..launch import cli\n")
    assert imported_modules(source, "mnemax.trainer.example") == {
        "mnemax.trainer", "mnemax.recipes.registry", "mnemax.launch", "mnemax",
        "mnemax.errors"}
    assert upward_imports(source, "mnemax.trainer.example") == [
        "mnemax.trainer.example -> mnemax.launch",
        "mnemax.trainer.example -> mnemax.recipes.registry"]
