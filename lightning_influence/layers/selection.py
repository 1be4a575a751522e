"""Choosing the tracked layers of a model by name patterns and module types."""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from ..patterns import PatternError, matches, preview, select_names
from .base import LayerSelectionError, TrackedLayer, layer_class_for, named_modules, supported_layer_types, supported_type_names

__all__ = ["select_layers"]


def select_layers(
    model: nn.Module,
    patterns: Optional[str | Iterable[str]] = None,
    types: Optional[Iterable[type]] = None,
    exclude: Optional[str | Iterable[str]] = None,
    owner: str = "select_layers",
) -> list[TrackedLayer]:
    """Select layers by glob ``patterns`` over qualified module names and by ``types``.

    Patterns follow the library's one rule (:func:`lightning_influence.patterns.matches`):
    ``"mlp.*"`` and ``"*.dense_h_to_4h"`` match at any depth. Supported module types are those
    registered in :mod:`lightning_influence.layers` (:func:`supported_layer_types`).

    Args:
        model: the model (a LightningModule works; names include its attribute prefix).
        patterns: glob(s); ``None`` selects every supported layer. Each pattern must match at
            least one supported layer.
        types: restrict to these module types (subclasses of :func:`supported_layer_types`).
        exclude: glob(s) of names to leave out (e.g. ``"*lm_head"``); each must match a
            supported layer, so a renamed module never silently stays in.
        owner: who asks, for error messages.

    Returns:
        Tracked layers in module registration order, named as in the unwrapped model (FSDP1's
        and activation checkpointing's wrapper segments removed; see
        :func:`~lightning_influence.layers.unwrapped_name`).

    Raises:
        LayerSelectionError: a pattern matches no supported layer (the message says which
            unsupported modules it does match), nothing is selected, or a selected module of a
            supported type has a configuration that cannot be tracked (e.g. a convolution with
            ``groups > 1``: the message names each such layer and why; leave them out with
            ``exclude``). Messages list the available layer names and the supported types.
    """
    type_names = ", ".join(supported_type_names())
    if types is not None:
        supported = supported_layer_types()  # imports optional packages (transformers) only here
        types = tuple(types)
        bad = [t for t in types if not (isinstance(t, type) and issubclass(t, supported))]
        if bad:
            raise LayerSelectionError(
                f"{owner}: types={[getattr(t, '__name__', t) for t in bad]} are not supported; supported types: {type_names}"
            )
    wanted = tuple(types) if types else None
    pats = [patterns] if isinstance(patterns, str) else (None if patterns is None else list(patterns))
    excl = [exclude] if isinstance(exclude, str) else list(exclude or [])
    # the root itself counts when the model *is* a supported layer (name "")
    # names of the unwrapped model (FSDP1 / activation-checkpointing wrappers removed)
    modules = {n: m for n, m in named_modules(model).items() if n or layer_class_for(m) is not None}
    candidates = {
        n: cls for n, m in modules.items()
        if (cls := layer_class_for(m)) is not None and (wanted is None or isinstance(m, wanted))
    }
    refused = {n: reason for n, cls in candidates.items() if (reason := cls.unsupported(modules[n])) is not None}
    available = [n for n in candidates if n not in refused]
    for pat in pats or []:
        if not any(matches(n, pat) for n in available):
            hit_refused = [f"{n} ({refused[n]})" for n in refused if matches(n, pat)]
            unsupported = [f"{n} ({type(m).__name__})" for n, m in modules.items()
                           if matches(n, pat) and n not in candidates and not list(m.children())]
            detail = ""
            if hit_refused:
                detail = f"; it matches layers that cannot be tracked: {hit_refused[:10]}"
            elif unsupported:
                detail = f"; it matches unsupported modules {unsupported[:10]}"
            raise LayerSelectionError(
                f"{owner}(layers=...): pattern {pat!r} matches no supported layer{detail}. "
                f"Supported layers in this model: {_preview(available)} (supported types: {type_names})"
            )
    try:
        names = select_names(list(candidates), pats, excl, what="supported layer", owner=owner)
    except PatternError as e:
        raise LayerSelectionError(f"{e} (supported types: {type_names})") from None
    blocked = [f"{n}: {refused[n]}" for n in names if n in refused]
    if blocked:
        raise LayerSelectionError(
            f"{owner}: the selection includes layers that cannot be tracked:\n  " + "\n  ".join(blocked)
            + f"\nLeave them out with exclude={[n for n in names if n in refused][:10]} (or narrower layers=...)."
        )
    return [candidates[n](n, modules[n]) for n in names]


def _preview(names: list[str]) -> str:
    return preview(names) if names else "none"
