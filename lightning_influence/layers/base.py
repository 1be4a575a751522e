"""The tracked-layer contract and the registry of module types it is implemented for.

A tracked layer computes, for each example ``b`` and each of its ``T`` *rows* ``t``,
``s_bt = W a_bt (+ b)``: a linear layer's rows are the tokens of a sequence (``T = 1`` for a
plain feature vector), a convolution's rows are its output positions with ``a_bt`` the unfolded
input patch. The library describes every layer's gradient as a matrix in one orientation,
``(d_out, a_dim)``: ``DW_b = sum_t ds_bt a_btᵀ``, with a constant ``1`` appended to ``a`` when
the layer has a bias (so the last column is the bias gradient).

One :class:`TrackedLayer` subclass per module type says how to read that module: its geometry
(``d_in``, ``d_out``, bias), how a forward input becomes rows ``[B, T, d_in]``
(:meth:`TrackedLayer.input_rows`), how an output gradient becomes rows ``[B, T, d_out]``
(:meth:`TrackedLayer.gradient_rows`), and how the ``(d_out, d_in)`` matrix maps to the stored
weight (:meth:`TrackedLayer.weight_matrix` / :meth:`TrackedLayer.weight_from_matrix`).
Subclasses register themselves with :func:`register_layer_type`; adding a module type is one
file with one such class (see ``linear.py``, ``conv.py``, ``transformers_conv1d.py``, ``lora.py``).

**Sharded models.** Under FSDP a layer's parameters are shards (FSDP2: ``DTensor`` shards; FSDP1
with ``use_orig_params=True``: flat 1-D views of this rank's piece, often empty), so geometry is
read from what the module *declares* (``in_features``, ``out_channels``, ``kernel_size``, ...),
never from its parameters' shapes. FSDP1 and activation checkpointing wrap modules and put
segments such as ``_fsdp_wrapped_module`` into qualified names; :func:`unwrapped_name` and
:func:`named_modules` give the names of the unwrapped model, so factors fitted on a sharded model
apply to its consolidated checkpoint and the other way round.
"""

from __future__ import annotations

import importlib
from typing import Callable, ClassVar, Optional, Sequence, TypeVar

import torch
from torch import Tensor, nn

from ..patterns import PatternError

__all__ = [
    "TrackedLayer",
    "LayerSelectionError",
    "register_layer_type",
    "layer_class_for",
    "supported_layer_types",
    "supported_type_names",
    "as_tokens",
    "in_backward_pass",
    "unwrapped_name",
    "named_modules",
    "WRAPPER_SEGMENTS",
]


class LayerSelectionError(PatternError):
    """Patterns or types that select no layer, or select an unsupported one."""


ModuleType = type | str
"""A module class, or its dotted path (``"transformers.pytorch_utils.Conv1D"``) for classes of
optional packages, which are then never imported just to be registered."""

_REGISTRY: dict[ModuleType, type["TrackedLayer"]] = {}
L = TypeVar("L", bound=type["TrackedLayer"])


def register_layer_type(module_type: ModuleType) -> Callable[[L], L]:
    """Class decorator: ``cls`` tracks modules of ``module_type`` (and its subclasses).

    Args:
        module_type: the module class, or its dotted import path (``"package.module.Class"``)
            when the class lives in an optional package.

    Returns:
        The decorator (it returns the class unchanged, with ``module_type`` set).
    """

    def decorate(cls: L) -> L:
        cls.module_type = module_type
        _REGISTRY[module_type] = cls
        return cls

    return decorate


def _dotted(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def layer_class_for(module: nn.Module) -> Optional[type["TrackedLayer"]]:
    """The registered :class:`TrackedLayer` subclass for ``module``'s type (the nearest
    registered class in its method resolution order), or ``None``."""
    for klass in type(module).__mro__:
        cls = _REGISTRY.get(klass) or _REGISTRY.get(_dotted(klass))
        if cls is not None:
            return cls
    return None


def _resolve(module_type: ModuleType) -> Optional[type]:
    if isinstance(module_type, type):
        return module_type
    path, _, name = module_type.rpartition(".")
    try:
        return getattr(importlib.import_module(path), name)
    except Exception:  # the optional package is absent or changed: the type is simply not available
        return None


def supported_layer_types() -> tuple[type, ...]:
    """Module types whose Kronecker factors this library computes (registration order; types
    of optional packages that are not installed are left out)."""
    return tuple(t for t in (_resolve(k) for k in _REGISTRY) if t is not None)


def supported_type_names() -> list[str]:
    """Readable names of the registered module types, for messages."""
    return [cls.type_name for cls in _REGISTRY.values()]


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
"""Name segments that wrappers insert into qualified names: FSDP1's ``FullyShardedDataParallel``
and activation checkpointing's ``CheckpointWrapper`` (FSDP2's ``fully_shard`` keeps names)."""


def unwrapped_name(name: str) -> str:
    """``name`` without wrapper segments: ``"net._fsdp_wrapped_module.0"`` → ``"net.0"``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name (wrapper segments removed, see :func:`unwrapped_name`) → module.

    A wrapper and the module it wraps share one name; the wrapped module is kept (it comes later
    in ``model.named_modules()``), so the dict names the modules of the unwrapped model.
    """
    return {unwrapped_name(n): m for n, m in model.named_modules()}


def as_tokens(x: Tensor) -> Tensor:
    """Reshape ``(B, d)`` → ``(B, 1, d)`` and ``(B, ..., d)`` → ``(B, T, d)``."""
    if x.dim() == 2:
        return x[:, None, :]
    if x.dim() == 3:
        return x
    return x.reshape(x.shape[0], -1, x.shape[-1])


class TrackedLayer:
    """A selected layer: its qualified name, module, gradient geometry and how its data is read.

    Construct with :meth:`from_module` (which picks the subclass registered for the module's
    type). Subclasses implement :meth:`geometry`, :meth:`input_rows`, :meth:`gradient_rows`,
    :meth:`weight_matrix` and :meth:`weight_from_matrix`, and may override :meth:`unsupported`
    (a configuration of the type that cannot be tracked) and :meth:`mask_applies`.

    Attributes:
        name: qualified module name in the model.
        module: the module.
        d_in: input width of one row (``in_features``; ``in_channels · prod(kernel_size)`` for
            a convolution).
        d_out: output width of one row (``out_features`` / ``out_channels``).
        has_bias: whether the module has a bias (a constant-one input column).
    """

    module_type: ClassVar[ModuleType]
    type_name: ClassVar[str] = "layer"

    def __init__(self, name: str, module: nn.Module) -> None:
        reason = self.unsupported(module)
        if reason is not None:
            raise LayerSelectionError(f"layer {name!r} ({type(module).__name__}) cannot be tracked: {reason}")
        self.name = name
        self.module = module
        self.d_in, self.d_out = self.geometry(module)
        self.has_bias = getattr(module, "bias", None) is not None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, d_in={self.d_in}, d_out={self.d_out}, "
                f"has_bias={self.has_bias})")

    @classmethod
    def from_module(cls, name: str, module: nn.Module) -> "TrackedLayer":
        """The tracked layer for ``module`` (the subclass registered for its type).

        Raises:
            LayerSelectionError: the type is not registered, or this configuration of it cannot
                be tracked (the message says why and lists the supported types).
        """
        klass = layer_class_for(module)
        if klass is None:
            raise LayerSelectionError(
                f"layer {name!r} has unsupported type {type(module).__name__}; supported types: "
                f"{', '.join(supported_type_names())}"
            )
        return klass(name, module)

    @classmethod
    def geometry_only(cls, name: str, d_in: int, d_out: int, has_bias: bool) -> "TrackedLayer":
        """A layer known only by its name and gradient geometry (no module): enough for the
        factor arithmetic (covariances, eigendecompositions, stored factors), e.g. when factors
        are finished from a checkpoint without the model. Reading data through it needs a module.
        """
        layer = cls.__new__(cls)
        layer.name, layer.module, layer.d_in, layer.d_out, layer.has_bias = name, None, int(d_in), int(d_out), bool(has_bias)
        return layer

    # -- per type ---------------------------------------------------------------------------
    @classmethod
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        """Why this module (of the registered type) cannot be tracked, or ``None``."""
        return None

    @classmethod
    def represented(cls, module: nn.Module) -> tuple[nn.Module, ...]:
        """Submodules this layer stands for, never selected on their own (a wrapper's wrapped
        layer: a peft LoRA layer's ``base_layer``). Default: none."""
        return ()

    @classmethod
    def geometry(cls, module: nn.Module) -> tuple[int, int]:
        """``(d_in, d_out)`` of one row, from the module's declared sizes (never from its
        parameters' shapes, which are shards under FSDP)."""
        raise NotImplementedError

    def forward_input(self, inputs: tuple) -> Tensor:
        """The tensor the weight multiplies, from a forward hook's positional ``inputs``."""
        return inputs[0]

    def input_rows(self, x: Tensor) -> Tensor:
        """Forward input → rows ``Tensor[B, T, d_in]`` (no bias column)."""
        raise NotImplementedError

    def gradient_rows(self, ds: Tensor) -> Tensor:
        """Gradient w.r.t. the module's output → rows ``Tensor[B, T, d_out]`` (same row order as
        :meth:`input_rows`)."""
        raise NotImplementedError

    def weight_matrix(self, w: Tensor) -> Tensor:
        """A weight-shaped tensor ``[..., *weight.shape]`` → ``[..., d_out, d_in]``."""
        raise NotImplementedError

    def weight_from_matrix(self, g: Tensor) -> Tensor:
        """Inverse of :meth:`weight_matrix`: ``[..., d_out, d_in]`` → ``[..., *weight.shape]``."""
        raise NotImplementedError

    def mask_applies(self, mask: Tensor, rows: Tensor) -> bool:
        """Whether a batch padding mask ``BoolTensor[B, T]`` describes these ``rows`` (its
        tokens are this layer's rows). Default: when the shapes agree."""
        return mask.dim() == 2 and tuple(mask.shape) == tuple(rows.shape[:2])

    # -- shared -----------------------------------------------------------------------------
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

    def augment(self, a: Tensor) -> Tensor:
        """Append the constant-one bias column to rows ``(..., d_in)``."""
        if not self.has_bias:
            return a
        return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)

    def rows(self, x: Tensor, ds: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Raw ``(forward input, output gradient)`` → ``(a[B, T, a_dim], ds[B, T, d_out], mask)``.

        ``a`` has the bias column; with a padding ``mask`` (``BoolTensor[B, T]``, True = real
        token) that applies to this layer (:meth:`mask_applies`) and hides some tokens, padding
        rows of both are zeroed and the mask is returned, else the mask returned is ``None``.
        """
        a = self.augment(self.input_rows(x))
        g = self.gradient_rows(ds)
        if mask is None or not self.mask_applies(mask, a) or bool(mask.all()):
            return a, g, None
        m = mask[..., None]
        return a * m.to(a.dtype), g * m.to(g.dtype), mask

    def flatten_param_grads(self, grads: Sequence[Tensor]) -> Tensor:
        """Autograd's parameter gradients ``(weight[, bias])`` → ``Tensor[..., d_out, a_dim]``."""
        gw = self.weight_matrix(grads[0])
        if self.has_bias:
            return torch.cat([gw, grads[1][..., None]], dim=-1)
        return gw

    def param_gradient(self, g: Tensor) -> list[Tensor]:
        """Inverse of :meth:`flatten_param_grads`: ``[..., d_out, a_dim]`` → ``[dW, (db)]`` in the
        parameters' own shapes."""
        gw = self.weight_from_matrix(g[..., : self.d_in])
        return [gw] + ([g[..., self.d_in]] if self.has_bias else [])


def in_backward_pass() -> bool:
    """True while the autograd engine is executing (e.g. checkpoint recomputation)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - very old torch
        return False
