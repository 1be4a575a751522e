"""Which layers are tracked, and the hooks that read their inputs and output gradients.

A tracked layer computes ``s = W a (+ b)`` per token. We always describe its gradient in the
``(d_out, d_in + has_bias)`` orientation: ``DW = sum_t ds_t a_t^T`` with a constant ``1``
appended to ``a`` when the layer has a bias (so the last column is the bias gradient).
``transformers``' GPT-2 ``Conv1D`` stores ``W`` transposed (``(d_in, d_out)``); its gradient is
reported in the same ``(d_out, d_in)`` orientation, and :meth:`TrackedLayer.param_gradient`
converts back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .patterns import PatternError, matches, preview, select_names

__all__ = ["TrackedLayer", "select_layers", "LayerSelectionError", "supported_layer_types", "in_backward_pass"]


class LayerSelectionError(PatternError):
    """Patterns or types that select no layer, or select an unsupported one."""


def _conv1d_type() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers is a dependency, but stay importable
        return None
    return Conv1D


def supported_layer_types() -> tuple[type, ...]:
    """Module types whose Kronecker factors this library computes."""
    conv1d = _conv1d_type()
    return (nn.Linear,) + ((conv1d,) if conv1d is not None else ())


@dataclass(eq=False)
class TrackedLayer:
    """A selected layer: its qualified name, module and gradient geometry."""

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    has_bias: bool
    transposed: bool  # True for transformers' Conv1D (weight stored as (d_in, d_out))

    @classmethod
    def from_module(cls, name: str, module: nn.Module) -> "TrackedLayer":
        if isinstance(module, nn.Linear):
            return cls(name, module, module.in_features, module.out_features, module.bias is not None, False)
        conv1d = _conv1d_type()
        if conv1d is not None and isinstance(module, conv1d):
            d_in, d_out = module.weight.shape
            return cls(name, module, d_in, d_out, module.bias is not None, True)
        raise LayerSelectionError(f"layer {name!r} has unsupported type {type(module).__name__}")

    @property
    def a_dim(self) -> int:
        """Width of the augmented input (``d_in + 1`` with a bias)."""
        return self.d_in + int(self.has_bias)

    @property
    def grad_shape(self) -> tuple[int, int]:
        """``(d_out, a_dim)``: shape of the layer's gradient in this library's orientation."""
        return (self.d_out, self.a_dim)

    def parameters(self) -> list[nn.Parameter]:
        """``[weight]`` or ``[weight, bias]`` in the order of :meth:`param_gradient`."""
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    def flatten_param_grads(self, grads: Sequence[Tensor]) -> Tensor:
        """Turn autograd gradients ``(weight, [bias])`` into the ``(d_out, a_dim)`` layout."""
        gw = grads[0].t() if self.transposed else grads[0]
        if self.has_bias:
            return torch.cat([gw, grads[1][:, None]], dim=1)
        return gw

    def param_gradient(self, g: Tensor) -> list[Tensor]:
        """Inverse of :meth:`flatten_param_grads`: ``(d_out, a_dim)`` → ``[dW, (db)]`` in storage layout."""
        gw = g[..., : self.d_in]
        gw = gw.transpose(-1, -2) if self.transposed else gw
        return [gw] + ([g[..., self.d_in]] if self.has_bias else [])

    def augment(self, a: Tensor) -> Tensor:
        """Append the constant-one bias column to inputs ``(..., d_in)``."""
        if not self.has_bias:
            return a
        return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


def select_layers(
    model: nn.Module,
    patterns: Optional[str | Iterable[str]] = None,
    types: Optional[Iterable[type]] = None,
    exclude: Optional[str | Iterable[str]] = None,
    owner: str = "select_layers",
) -> list[TrackedLayer]:
    """Select layers by glob ``patterns`` over qualified module names and by ``types``.

    Patterns follow the library's one rule (:func:`lightning_influence.patterns.matches`):
    ``"mlp.*"`` and ``"*.dense_h_to_4h"`` match at any depth.

    Args:
        model: the model (a LightningModule works; names include its attribute prefix).
        patterns: glob(s); ``None`` selects every supported layer. Each pattern must match at
            least one supported layer.
        types: restrict to these module types (subset of :func:`supported_layer_types`).
        exclude: glob(s) of names to leave out (e.g. ``"*lm_head"``); each must match a
            supported layer, so a renamed module never silently stays in.
        owner: who asks, for error messages.

    Returns:
        Tracked layers in module registration order.

    Raises:
        LayerSelectionError: a pattern matches no supported layer (the message says which
            unsupported modules it does match), or nothing is selected; the message lists the
            available layer names.
    """
    supported = supported_layer_types()
    if types is not None:
        types = tuple(types)
        bad = [t for t in types if not issubclass(t, supported)]
        if bad:
            raise LayerSelectionError(
                f"types={[t.__name__ for t in bad]} are not supported; supported: {[t.__name__ for t in supported]}"
            )
    wanted = tuple(types) if types else supported
    pats = [patterns] if isinstance(patterns, str) else (None if patterns is None else list(patterns))
    excl = [exclude] if isinstance(exclude, str) else list(exclude or [])
    # the root itself counts when the model *is* a supported layer (name "")
    modules = {n: m for n, m in model.named_modules() if n or isinstance(m, supported)}
    available = [n for n, m in modules.items() if isinstance(m, wanted)]
    for pat in pats or []:
        if not any(matches(n, pat) for n in available):
            unsupported = [f"{n} ({type(m).__name__})" for n, m in modules.items() if matches(n, pat) and not list(m.children())]
            detail = f"; it matches unsupported modules {unsupported[:10]}" if unsupported else ""
            raise LayerSelectionError(
                f"{owner}(layers=...): pattern {pat!r} matches no supported layer{detail}. "
                f"Supported layers in this model: {_preview(available)}"
            )
    try:
        names = select_names(available, pats, excl, what="supported layer", owner=owner)
    except PatternError as e:
        raise LayerSelectionError(f"{e} (supported types: {[t.__name__ for t in supported]})") from None
    return [TrackedLayer.from_module(n, modules[n]) for n in names]


def _preview(names: list[str]) -> str:
    return preview(names) if names else "none (this library tracks nn.Linear and transformers' Conv1D)"


def in_backward_pass() -> bool:
    """True while the autograd engine is executing (e.g. checkpoint recomputation)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - very old torch
        return False

