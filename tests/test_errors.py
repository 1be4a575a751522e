"""Every exception class the package defines derives from ``InfluenceError`` (issue 22)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import lightning_influence
from lightning_influence.errors import InfluenceError


def package_exceptions() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(lightning_influence.__path__, "lightning_influence."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found.append(obj)
    return found


def test_every_library_error_derives_from_influence_error():
    classes = package_exceptions()
    assert len(classes) >= 20
    outside = [f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, InfluenceError)]
    assert not outside, f"derive these from lightning_influence.errors.InfluenceError: {outside}"


def test_errors_keep_their_builtin_base():
    from lightning_influence.memory import InsufficientMemoryError
    from lightning_influence.storage import ArtifactError
    from lightning_influence.validation import InvalidArgumentError

    assert issubclass(InsufficientMemoryError, MemoryError)
    assert issubclass(ArtifactError, RuntimeError)
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(InvalidArgumentError, TypeError)
    assert lightning_influence.InfluenceError is InfluenceError
