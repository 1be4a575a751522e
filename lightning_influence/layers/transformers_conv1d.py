"""transformers' ``Conv1D`` (GPT-2's linear layer, weight stored transposed)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import TrackedLayer, as_tokens, register_layer_type

__all__ = ["TransformersConv1DLayer"]


@register_layer_type("transformers.pytorch_utils.Conv1D")
class TransformersConv1DLayer(TrackedLayer):
    """``transformers.pytorch_utils.Conv1D``: a linear layer whose weight is stored as
    ``(d_in, d_out)``; its gradient is reported in the library's ``(d_out, d_in)`` orientation.
    Registered by dotted path, so transformers is imported only by models that use it."""

    type_name = "transformers Conv1D"

    @classmethod
    def geometry(cls, module: nn.Module) -> tuple[int, int]:
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)

    def input_rows(self, x: Tensor) -> Tensor:
        return as_tokens(x)

    def gradient_rows(self, ds: Tensor) -> Tensor:
        return as_tokens(ds)

    def weight_matrix(self, w: Tensor) -> Tensor:
        return w.transpose(-1, -2)

    def weight_from_matrix(self, g: Tensor) -> Tensor:
        return g.transpose(-1, -2)
