"""The size gate ruff has no rule for: no function of the library (src/palmkit outside apps/) over 60 lines.

ruff's C901 (complexity 12), PLR0912, PLR0913 (10 arguments) and PLR0915 (50 statements) gate the rest (pyproject).
A function is counted from its `def` line to its last line, docstring and comments included: what a reader has to
hold at once. apps/ is exempt, as from those ruff rules: its recipes are scripts of many steps.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "palmkit"
MAX_LINES = 60


def long_functions(root: Path = PACKAGE, limit: int = MAX_LINES) -> dict[str, int]:
    """{"path::function": lines} of every function over `limit` lines under `root`, apps/ left out."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "apps":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found[f"{rel.as_posix()}::{node.name}"] = lines
    return found


def test_no_function_is_over_60_lines():
    over = long_functions()
    assert not over, "functions over 60 lines (split them into named steps): " + ", ".join(
        f"{name} ({n} lines)" for name, n in sorted(over.items()))


def test_the_length_check_counts_def_to_last_line(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    (tmp_path / "ok.py").write_text(f"def fits():\n{body}\n")  # 60 lines
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "long.py").write_text(f"def exempt():\n{body}\n    y = 1\n")
    nested = "\n".join("    " + line for line in body.splitlines())
    (tmp_path / "m.py").write_text(f"class C:\n    async def over(self):\n{nested}\n        y = 1\n")
    assert long_functions(tmp_path) == {"m.py::over": 61}
