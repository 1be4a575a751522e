"""The documentation site builds with warnings as errors (broken links, bad docstrings)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_strict_build(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("EKFACInfluence") > 0


# -- option tables ------------------------------------------------------------------------------------
def _option_tables(page: Path) -> list[dict[str, str]]:
    """Every ``| option | default | meaning |`` table of a page: option name → default cell."""
    tables, current = [], None
    for line in page.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells and cells[:2] == ["option", "default"]:
            current = {}
            tables.append(current)
        elif cells is None:
            current = None
        elif current is not None and cells[0].startswith("`"):
            current[cells[0].strip("`")] = cells[1]
    return tables


def _literal(cell: str):
    """The first backticked Python literal of a table cell (``"auto"``, ``8``, ``None``, ``3e-3``)."""
    import ast
    import re

    m = re.search(r"`([^`]+)`", cell)
    assert m, f"default cell {cell!r} has no `literal`"
    return ast.literal_eval(m.group(1))


def _signature_defaults(obj) -> dict:
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(obj):
        return {f.name: f.default for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING}
    return {n: p.default for n, p in inspect.signature(obj).parameters.items() if p.default is not inspect.Parameter.empty}


def test_option_tables_state_the_signatures_defaults():
    """docs/ekfac.md's table documents EKFACInfluence's constructor, docs/lissa.md's LiSSAOptions: every
    option listed exists there, and its stated default is the code's."""
    from lightning_influence import EKFACInfluence, LiSSAOptions

    documented = {"ekfac.md": EKFACInfluence, "lissa.md": LiSSAOptions}
    for page, obj in documented.items():
        tables = _option_tables(ROOT / "docs" / page)
        assert len(tables) == 1 and len(tables[0]) >= 8, page
        defaults = _signature_defaults(obj)
        for option, cell in tables[0].items():
            assert option in defaults, f"docs/{page} documents {option!r}, which {obj.__name__} does not take"
            stated, actual = _literal(cell), defaults[option]
            assert stated == actual and type(stated) is type(actual), \
                f"docs/{page}: {option} default is {cell!r}, the code's is {actual!r}"


def test_readme_lists_every_example_with_the_extras_it_needs():
    """Each examples/*.py is in the README's table, whose extras cell names the extras its imports
    need: scikit-learn's digits (``demo``), LightningCLI's jsonargparse (``cli``)."""
    import re
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    rows = {}
    for line in (ROOT / "README.md").read_text().split("## Examples")[1].split("\n## ")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.match(r"`examples/(\w+\.py)`", cells[0]) if len(cells) == 4 else None
        if m:
            rows[m.group(1)] = set(re.findall(r"`([\w,]+)`", cells[2].split("(")[0]))
    for path in sorted((ROOT / "examples").glob("*.py")):
        assert path.name in rows, f"README's examples table lacks {path.name}"
        named = {e for cell in rows[path.name] for e in cell.split(",")}
        assert named <= extras, (path.name, named - extras)
        source = path.read_text()
        if re.search(r"digits_dataset|DigitsClassifier|sklearn", source):
            assert "demo" in named, f"{path.name} needs the demo extra (scikit-learn's digits)"
        if "LightningCLI" in source:
            assert "cli" in named, f"{path.name} needs the cli extra (jsonargparse)"
        if re.search(r"^\s*(import|from) peft|get_peft_model", source, re.M):
            assert "peft" in named, f"{path.name} needs the peft extra"
