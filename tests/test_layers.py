"""The package's layers: every import goes down (or sideways within a layer), never up.

Layers, lowest first: errors, io < model < data < train < finetune, infer, recommend < serve < apps < cli. A module may
import only from its own layer or lower ones, and only at module level, except in apps/ and cli.py, where an
import inside a function keeps a command cheap to start.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {"errors": 0, "io": 0, "model": 1, "data": 2, "train": 3, "finetune": 4, "infer": 4, "recommend": 4,
          "serve": 5, "apps": 6, "cli": 7}
LAZY_ALLOWED = ("apps", "cli")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def room(module: str) -> str | None:
    """The layer name of a palmkit module (`palmkit.model.palm` -> model); None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imported_modules(node: ast.AST) -> list[str]:
    """The palmkit modules an import statement names (`from palmkit import x` counts as palmkit.x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "palmkit"]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "palmkit" and not node.level:
        if node.module == "palmkit":
            return [f"palmkit.{a.name}" for a in node.names]
        return [node.module]
    return []


def violations(module: str, source: str) -> list[str]:
    """Each upward import and each function-level palmkit import outside apps/ and cli.py in `source`."""
    here = room(module)
    out = []
    tree = ast.parse(source)
    top = set(tree.body)
    for node in ast.walk(tree):
        for target in imported_modules(node):
            there = room(target)
            if here is None or there is None:
                out.append(f"{module}:{node.lineno} imports {target}: the package root is not a layer")
                continue
            if there not in LAYERS:
                out.append(f"{module}:{node.lineno} imports {target}, which is in no layer")
            elif here not in LAYERS:
                out.append(f"{module} is in no layer")
            elif LAYERS[there] > LAYERS[here]:
                out.append(f"{module}:{node.lineno} imports {target}: up from {here} to {there}")
            if node not in top and here not in LAZY_ALLOWED:
                out.append(f"{module}:{node.lineno} imports {target} inside a function")
    return out


def library_modules() -> list[Path]:
    return sorted(p for p in (SRC / "palmkit").rglob("*.py") if p != SRC / "palmkit" / "__init__.py")


def test_every_module_is_in_a_layer():
    rooms = {room(module_name(p)) for p in library_modules()}
    assert rooms <= set(LAYERS), rooms - set(LAYERS)


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down(path):
    assert violations(module_name(path), path.read_text(encoding="utf-8")) == []


def test_package_root_imports_nothing_eagerly():
    """`import palmkit.errors` must not import torch: the root's public names load on first use."""
    tree = ast.parse((SRC / "palmkit" / "__init__.py").read_text(encoding="utf-8"))
    assert not [n for n in tree.body if imported_modules(n)]


def test_the_checker_catches_what_it_must():
    """A planted upward import, a lazy import in the library and a sideways import are judged correctly."""
    assert violations("palmkit.model.palm", "from palmkit.train.step import make_optimizer\n") == [
        "palmkit.model.palm:1 imports palmkit.train.step: up from model to train"]
    lazy = "def f():\n    from palmkit.model.palm import PaLM\n"
    assert violations("palmkit.train.heal", lazy) == [
        "palmkit.train.heal:2 imports palmkit.model.palm inside a function"]
    assert violations("palmkit.apps.support", lazy) == []
    assert violations("palmkit.infer.engine", "from palmkit.finetune import predict\n") == []  # one layer
    assert violations("palmkit.data.shards", "import palmkit.serve.app\n") == [
        "palmkit.data.shards:1 imports palmkit.serve.app: up from data to serve"]
