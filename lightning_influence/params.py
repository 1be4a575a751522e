"""Which parameters a parameter-space method (Z0-Inf, LiSSA) works on: glob patterns over
parameter names (the library's one rule, :mod:`lightning_influence.patterns`), the output head,
or every trainable parameter."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from .patterns import select_names
from .validation import InvalidArgumentError

__all__ = ["select_parameters", "LAST_LAYER"]

LAST_LAYER = "last_layer"


def select_parameters(
    model: nn.Module, params: Optional[str | Sequence[str]] = None, owner: str = "select_parameters"
) -> dict[str, nn.Parameter]:
    """Trainable parameters, name → parameter, in registration order.

    Args:
        model: the model (a LightningModule's names carry its attribute prefixes).
        params: ``None`` (every trainable parameter), ``"last_layer"`` (the trainable parameters
            of the last module, in registration order, that owns parameters directly: the output
            head of the usual models), or glob pattern(s) such as ``"net.2.*"`` (see
            :func:`~lightning_influence.patterns.matches`).
        owner: who asks, for error messages.

    Raises:
        InvalidArgumentError: the model has no trainable parameter.
        PatternError: a pattern matches no trainable parameter (the message lists them).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise InvalidArgumentError(f"{owner}: the model has no trainable parameter (requires_grad=True)")
    if params is None:
        return dict(named)
    if params == LAST_LAYER:
        chosen: list = []
        for mname, mod in model.named_modules():
            own = [(f"{mname}.{n}" if mname else n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if own:
                chosen = own
        return dict(chosen)
    pats = [params] if isinstance(params, str) else list(params)
    keep = set(select_names([n for n, _ in named], pats, what="trainable parameter", owner=owner, include_arg="params"))
    return {n: p for n, p in named if n in keep}
