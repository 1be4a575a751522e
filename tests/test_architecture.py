"""The package's shape: the callbacks' base owns the Lightning hooks, the callbacks stay small, no
module-level import cycle, and the HTML report is written whatever the callbacks' order."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Subset

import lightning_influence
from lightning_influence.callbacks.base import InfluenceCallback

PACKAGE = Path(lightning_influence.__file__).parent
MAX_CALLBACK_LINES = 250


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_no_callback_overrides_a_lightning_hook_of_the_base():
    for module in pkgutil.iter_modules([str(PACKAGE / "callbacks")]):
        importlib.import_module(f"lightning_influence.callbacks.{module.name}")
    hooks = {n for n, v in vars(Callback).items() if callable(v) and not n.startswith("_")} | {"state_dict", "load_state_dict"}
    owned = hooks & set(vars(InfluenceCallback))
    assert {"setup", "on_fit_start", "on_train_batch_start", "on_train_end", "on_fit_end", "teardown", "state_dict"} <= owned
    subclasses = [c for c in _subclasses(InfluenceCallback) if c.__module__.startswith("lightning_influence.")]
    assert {c.__name__ for c in subclasses} >= {"EKFACInfluence", "Z0Influence", "LiSSASelfInfluence", "InfluenceIndexCallback"}
    # the subclass and every class it puts before the base (mixins such as FactorWrites)
    before_base = {c: c.__mro__[: c.__mro__.index(InfluenceCallback)] for c in subclasses}
    overridden = {f"{c.__name__} ({k.__name__})": sorted(owned & set(vars(k))) for c, mro in before_base.items() for k in mro}
    assert any(len(mro) > 1 for mro in before_base.values())  # mixins are looked at too
    assert not any(overridden.values()), overridden


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements that run when the module is imported: at module level, also inside
    module-level ``if``/``try`` blocks, but not under ``if TYPE_CHECKING``."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules its module-level imports name (relative imports resolved)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "lightning_influence.callbacks.base" in graph and graph["lightning_influence.callbacks.ekfac"]
    assert cycles(graph) == []


def test_every_callback_file_is_small():
    sizes = {p.name: sum(1 for line in p.read_text().splitlines() if line.strip())
             for p in (PACKAGE / "callbacks").glob("*.py")}
    assert {n: s for n, s in sizes.items() if s > MAX_CALLBACK_LINES} == {}, sizes


def test_html_report_is_written_with_the_index_callback_last(tmp_path):
    from lightning_influence import EKFACInfluence, IndexedDataset
    from lightning_influence.callbacks.index import InfluenceIndexCallback
    from lightning_influence.demos import MLPClassifier, digits_dataset

    torch.manual_seed(0)
    train, _, _ = digits_dataset()
    data = IndexedDataset(Subset(train, range(48)))
    callbacks = [EKFACInfluence(update_every_n_steps=1, probe=Subset(data, range(8))),
                 InfluenceIndexCallback(ekfac="ekfac", compression="exact", dtype="float32")]  # as in docs/search.md
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=callbacks)
    trainer.fit(MLPClassifier(hidden=8), DataLoader(data, batch_size=16))
    root = tmp_path / "influence"
    assert (root / "index" / "index").is_dir() and (root / "ekfac" / "factors").is_dir()
    assert (root / "plots" / "report.html").is_file()
