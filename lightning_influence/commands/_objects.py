"""Objects named on the command line: ``module.path:name`` or ``file.py:name`` (the one rule
every subcommand uses)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["load_object", "load_callable"]


def load_object(spec: str) -> Any:
    """The object named by ``module.path:name`` or ``file.py:name``.

    Raises:
        ValueError: ``spec`` has no ``:name`` part, or the name is missing.
    """
    if ":" not in spec:
        raise ValueError(f"{spec!r} must be module.path:name or file.py:name")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"{where} is not a file")
        mod_name = f"_lightning_influence_cli_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where} has no {name!r}")
        obj = getattr(obj, part)
    return obj



def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """:func:`load_object` of ``spec``, which must be callable (``what`` names the option in errors).

    Raises:
        ValueError: ``spec`` is malformed, names nothing, or names something not callable.
    """
    try:
        fn = load_object(spec)
    except ValueError as e:
        raise ValueError(f"--{what}: {e}") from None
    if not callable(fn):
        raise ValueError(f"--{what} {spec!r} is not callable")
    return fn
