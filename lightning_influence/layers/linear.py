"""``nn.Linear``: rows are the tokens of the input ``(B, [T, ...,] in_features)``."""

from __future__ import annotations

from torch import Tensor, nn

from .base import TrackedLayer, as_tokens, register_layer_type

__all__ = ["LinearLayer"]


@register_layer_type(nn.Linear)
class LinearLayer(TrackedLayer):
    """``nn.Linear`` (weight ``(out_features, in_features)``): inputs of rank > 3 are flattened
    into tokens, inputs of rank 2 are one token per example."""

    type_name = "torch.nn.Linear"

    @classmethod
    def geometry(cls, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def input_rows(self, x: Tensor) -> Tensor:
        return as_tokens(x)

    def gradient_rows(self, ds: Tensor) -> Tensor:
        return as_tokens(ds)

    def weight_matrix(self, w: Tensor) -> Tensor:
        return w

    def weight_from_matrix(self, g: Tensor) -> Tensor:
        return g
