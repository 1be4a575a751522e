"""The base of every error the library raises on purpose.

Rule: each error class is defined in the module that raises it (next to the code it describes)
and derives from :class:`InfluenceError` *and* from the builtin exception it specialises
(``ValueError``, ``MemoryError``, ``OSError``, ...), so both ``except InfluenceError`` and the
builtin ``except`` catch it. ``tests/test_errors.py`` checks every exception class in the package.
"""

from __future__ import annotations

__all__ = ["InfluenceError"]


class InfluenceError(Exception):
    """Base class of every lightning-influence error; catch it to handle any of them."""
