"""Shared scaffolding stays shared: test files import the helper modules (``scaffold``, ``cases``,
``lora_cases``, ``browser``, ``ekfac_reference``), never another test file, and no benchmark
script imports another (they share ``benchmarks/common.py`` and the other non-``bench_`` modules)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, function-level imports included."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_no_test_file_imports_another():
    found = {p.name: sorted(m for m in _imported(p) if m.startswith("test_") or m == "tests")
             for p in sorted((ROOT / "tests").glob("*.py"))}
    assert {k: v for k, v in found.items() if v} == {}


def test_no_benchmark_script_imports_another():
    found = {p.name: sorted(m for m in _imported(p) if m.startswith("bench_"))
             for p in sorted((ROOT / "benchmarks").glob("*.py"))}
    assert {k: v for k, v in found.items() if v} == {}
