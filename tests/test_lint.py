"""The code style CI enforces: ruff with the rules and the complexity limit (C901) set in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_passes_with_the_complexity_limit():
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                        capture_output=True).returncode != 0:
        pytest.skip("ruff not installed (pip install -e '.[dev]')")
    config = (ROOT / "pyproject.toml").read_text()
    assert '"C901"' in config and "max-complexity" in config, "the complexity rule must stay configured"
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "src", "scripts", "tests"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_function_in_src_is_longer_than_80_lines():
    import ast

    long = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)
