"""The one rule for selecting modules and parameters by name (layers, ``exclude``, ``params``).

A glob ``pattern`` matches a qualified name when ``fnmatch.fnmatchcase(name, pattern)`` or
``fnmatch.fnmatchcase(name, "*." + pattern)`` holds: ``"mlp.*"`` matches ``"mlp.fc"`` and
``"model.layers.0.mlp.fc"``; an exact name matches itself with or without the prefixes that a
LightningModule wrapper adds (``"net.0"`` matches ``"model.net.0"``).

Every include pattern and every exclude pattern must match at least one candidate name;
otherwise :class:`PatternError` lists the names that are available, so a typo or a module
renamed between library versions never silently selects or excludes nothing.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Optional, Sequence

from .errors import InfluenceError

__all__ = ["PatternError", "matches", "select_names", "preview"]


class PatternError(InfluenceError, ValueError):
    """A pattern matches no candidate name, or the selection is empty."""


def matches(name: str, pattern: str) -> bool:
    """Whether ``pattern`` selects ``name`` (see the module docstring for the rule)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def preview(names: Sequence[str], limit: int = 40) -> str:
    """``names`` as a short comma-separated list for error messages."""
    if not names:
        return "none"
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def select_names(
    names: Sequence[str],
    include: Optional[Iterable[str]] = None,
    exclude: Optional[Iterable[str]] = None,
    *,
    what: str = "name",
    owner: str = "select",
    include_arg: str = "layers",
    exclude_arg: str = "exclude",
) -> list[str]:
    """The names (in their given order) matched by ``include`` (all when ``None``) and by no
    ``exclude`` pattern.

    Args:
        names: candidate qualified names.
        include: glob patterns to keep (see :func:`matches`); ``None`` keeps every name.
        exclude: glob patterns to leave out.
        what: what the names are, for messages (``"layer"``, ``"trainable parameter"``).
        owner: who asks, for messages.
        include_arg: the argument name of ``include``, for messages.
        exclude_arg: the argument name of ``exclude``, for messages.

    Raises:
        PatternError: a pattern matches no candidate, or nothing is left.
    """
    names = list(names)
    inc = list(include) if include is not None else None
    exc = list(exclude or [])
    for arg, pats in ((include_arg, inc or []), (exclude_arg, exc)):
        for pat in pats:
            if not any(matches(n, pat) for n in names):
                raise PatternError(
                    f"{owner}({arg}=...): pattern {pat!r} matches no {what}; available: {preview(names)}"
                )
    chosen = [n for n in names if (inc is None or any(matches(n, p) for p in inc)) and not any(matches(n, p) for p in exc)]
    if not chosen:
        raise PatternError(
            f"{owner}: {include_arg}={inc} with {exclude_arg}={exc or None} leaves no {what}; available: {preview(names)}"
        )
    return chosen
