"""The public surface: every export resolves and is documented, type checkers see the same
names as runtime, and the core imports no Lightning."""

from __future__ import annotations

import ast
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import lightning_influence

INIT = Path(lightning_influence.__file__)
# everything but the Lightning adapters and the demo models is core: it must not load Lightning
LIGHTNING_MODULES = {"lightning_influence.callbacks", "lightning_influence.demos"}


def _type_checking_imports() -> dict[str, str]:
    tree = ast.parse(INIT.read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    out = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names:
            out[alias.name] = f"lightning_influence.{node.module}"
    return out


def test_every_public_name_resolves_is_documented_and_visible_to_type_checkers():
    assert _type_checking_imports() == lightning_influence._EXPORTS
    for name in lightning_influence.__all__:
        obj = getattr(lightning_influence, name)
        if name != "__version__":
            assert inspect.getdoc(obj), f"lightning_influence.{name} has no docstring"
        if inspect.isfunction(obj):
            hints = {k for k in inspect.signature(obj).parameters}
            assert set(obj.__annotations__) >= hints - {"self"}, f"{name} lacks type hints"


def test_core_modules_import_without_lightning():
    core = sorted(
        m.name for m in pkgutil.walk_packages([str(INIT.parent)], "lightning_influence.")
        if not any(m.name == p or m.name.startswith(p + ".") for p in LIGHTNING_MODULES)
    )
    assert {"lightning_influence.ekfac.online", "lightning_influence.z0", "lightning_influence.lissa",
            "lightning_influence.multistage", "lightning_influence.storage", "lightning_influence.scores"} <= set(core)
    code = (
        "import importlib, sys\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric'))\n"
        "print(len(bad), bad[:5])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("0 "), f"core modules loaded Lightning: {out}"
