"""Layers import downward only: the floor (config, runtime) and the curriculum, data and
model layers never import the distillation layer (nor the floor anything above it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "paced_ds"
# module or package -> the paced_ds packages it must not import from
FORBIDDEN = {
    "config.py": ("distill", "curriculum", "models", "data"),
    "runtime": ("distill", "curriculum", "models", "data"),
    "data": ("distill", "curriculum", "models"),
    "models": ("distill", "curriculum"),
    "curriculum": ("distill", "models"),
}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("layer", list(FORBIDDEN))
def test_layer_imports_only_downward(layer):
    files = [PACKAGE / layer] if layer.endswith(".py") else sorted((PACKAGE / layer).rglob("*.py"))
    assert files and all(f.is_file() for f in files)
    offences = [f"{f.relative_to(PACKAGE)} imports {module}" for f in files for module in imported_modules(f)
                if any(module == f"paced_ds.{upper}" or module.startswith(f"paced_ds.{upper}.")
                       for upper in FORBIDDEN[layer])]
    assert not offences, offences
