"""Argument checks shared by every public constructor and function (one validator module).

Every check takes the ``owner`` (e.g. ``"EKFACInfluence"``), the argument ``name`` and the
``value``, returns the (normalised) value, and raises :class:`InvalidArgumentError` with a
message of the form ``EKFACInfluence(top_k=...) must be a positive int, got 0``.

:class:`InvalidArgumentError` derives from both ``ValueError`` and ``TypeError``: a wrong value
and a wrong type are the same mistake from the caller's side, and code written against either
built-in keeps working.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar

from .ekfac.damping import DAMPING_RULES
from .errors import InfluenceError

__all__ = [
    "InvalidArgumentError",
    "positive_int",
    "non_negative_int",
    "integer",
    "finite_float",
    "choice",
    "boolean",
    "patterns",
    "artifact_name",
    "optional_path",
    "data_source",
    "instance",
    "map_dataset",
    "module",
    "stage_damping",
]

T = TypeVar("T")


class InvalidArgumentError(InfluenceError, ValueError, TypeError):
    """An argument has the wrong type or value; the message names the argument and what is accepted."""


def _fail(owner: str, name: str, expected: str, value: Any) -> InvalidArgumentError:
    return InvalidArgumentError(f"{owner}({name}=...) must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(owner: str, name: str, value: Any, *, minimum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    """An ``int`` (not a ``bool``) ``>= minimum`` when given; ``None`` only with ``allow_none``."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or (minimum is not None and value < minimum):
        bound = "an int" if minimum is None else f"an int >= {minimum}"
        raise _fail(owner, name, bound + (" or None" if allow_none else ""), value)
    return int(value)


def positive_int(owner: str, name: str, value: Any, *, allow_none: bool = False) -> Optional[int]:
    """An ``int >= 1`` (or ``None`` with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        raise _fail(owner, name, "a positive int" + (" or None" if allow_none else ""), value)
    return int(value)


def non_negative_int(owner: str, name: str, value: Any) -> int:
    """An ``int >= 0``."""
    return integer(owner, name, value, minimum=0)  # type: ignore[return-value]


def finite_float(
    owner: str,
    name: str,
    value: Any,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    strict_minimum: bool = False,
    strict_maximum: bool = False,
    allow_none: bool = False,
) -> Optional[float]:
    """A finite real number (``nan`` and ``inf`` are rejected) within the given bounds."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if strict_maximum else value <= maximum
    if not ok:
        parts = []
        if minimum is not None:
            parts.append(f"{'>' if strict_minimum else '>='} {minimum:g}")
        if maximum is not None:
            parts.append(f"{'<' if strict_maximum else '<='} {maximum:g}")
        expected = "a finite float" + (" " + " and ".join(parts) if parts else "")
        raise _fail(owner, name, expected + (" or None" if allow_none else ""), value)
    return float(value)


def choice(owner: str, name: str, value: Any, choices: Sequence[T]) -> T:
    """One of ``choices`` (compared with ``==``; unhashable values are rejected, not crashed on)."""
    try:
        ok = value in choices
    except TypeError:
        ok = False
    if not ok:
        raise _fail(owner, name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def boolean(owner: str, name: str, value: Any) -> bool:
    """``True`` or ``False`` (not a truthy stand-in such as ``1`` or ``"yes"``)."""
    if not isinstance(value, bool):
        raise _fail(owner, name, "True or False", value)
    return value


def patterns(owner: str, name: str, value: Any, *, allow_none: bool = True) -> Optional[list[str]]:
    """Glob pattern(s): a non-empty string or a non-empty list/tuple of non-empty strings.

    Returns the patterns as a list (``None`` stays ``None``).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) and p for p in value):
        return list(value)
    raise _fail(owner, name, "a glob pattern string or a non-empty list of them" + (" (or None)" if allow_none else ""), value)


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


def artifact_name(owner: str, name: str, value: Any) -> str:
    """A name usable as one folder of an output path: letters, digits and ``_ . = + -``, not
    starting with a dot or other punctuation (so never ``"."``, ``".."``, hidden, or nested)."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or len(value) > 100:
        raise _fail(
            owner, name,
            "a folder name of letters, digits and '_ . = + -' starting with a letter or digit (at most 100 characters)",
            value,
        )
    return value


def optional_path(owner: str, name: str, value: Any) -> Optional[Path]:
    """``None``, a ``str`` or an ``os.PathLike`` (returned as a :class:`~pathlib.Path`)."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)) and str(value):
        return Path(value)
    raise _fail(owner, name, "a path (str or os.PathLike) or None", value)


def data_source(owner: str, name: str, value: Any, *, allow_none: bool = True) -> Any:
    """A ``torch.utils.data.Dataset`` or ``DataLoader`` (or ``None``); strings and other
    iterables are rejected at construction, not after training."""
    from torch.utils.data import DataLoader, Dataset

    if value is None and allow_none:
        return None
    if isinstance(value, (Dataset, DataLoader)):
        return value
    # map-style datasets that do not subclass torch's Dataset (a list of examples, say)
    if hasattr(value, "__getitem__") and hasattr(value, "__len__") and not isinstance(value, (str, bytes, dict)):
        return value
    raise _fail(owner, name, "a torch Dataset (map-style or iterable) or a DataLoader" + (" or None" if allow_none else ""), value)


def map_dataset(owner: str, name: str, value: Any) -> Any:
    """A map-style dataset (``__len__`` and ``__getitem__``; not a DataLoader nor a string)."""
    from torch.utils.data import DataLoader

    if isinstance(value, (DataLoader, str, bytes)) or not (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        raise InvalidArgumentError(f"{owner}({name}=...) must be a map-style dataset (with __len__ and __getitem__), got {type(value).__name__}")
    return value


def instance(owner: str, name: str, value: Any, types: type | tuple[type, ...], expected: str, *, allow_none: bool = False) -> Any:
    """An instance of ``types`` (or ``None`` with ``allow_none``); ``expected`` says what in the
    message (``... must be <expected>, got <type name>``)."""
    if (value is None and allow_none) or isinstance(value, types):
        return value
    raise InvalidArgumentError(f"{owner}({name}=...) must be {expected}, got {type(value).__name__}")


def module(owner: str, name: str, value: Any) -> Any:
    """A ``torch.nn.Module`` (a LightningModule included)."""
    from torch import nn

    return instance(owner, name, value, nn.Module, "an nn.Module")


def stage_damping(owner: str, name: str, value: Any, has_factors: bool) -> Any:
    """The damping of one EK-FAC stage: a finite float ``>= 0``, a mapping layer → such a float,
    ``"identity"``, a rule name of :data:`~lightning_influence.ekfac.damping.DAMPING_RULES` or
    ``None`` (the default rule); anything but ``None`` / ``"identity"`` is refused for a stage
    without factors (``has_factors=False``: its preconditioner is the identity)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            finite_float(owner, f"{name}[{k!r}]", v, minimum=0.0)
    elif value is not None and value != "identity" and not (isinstance(value, str) and value in DAMPING_RULES):
        try:
            finite_float(owner, name, value, minimum=0.0)
        except InvalidArgumentError:
            raise InvalidArgumentError(
                f"{owner}({name}=...) must be a finite float >= 0, a mapping layer → float, 'identity', "
                f"a rule name {sorted(DAMPING_RULES)} or None (the default rule, per layer), got {value!r}"
            ) from None
    if not has_factors and value not in (None, "identity"):
        stage = "pretrained_factors" if name.endswith("_pt") else "finetuned_factors"
        raise InvalidArgumentError(
            f"{owner}({name}={value!r}) has no effect: {stage} is None (identity preconditioner); pass {name}=None or the factors"
        )
    return value
