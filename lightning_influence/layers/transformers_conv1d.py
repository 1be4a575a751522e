"""transformers' ``Conv1D`` (GPT-2's linear layer, weight stored transposed)."""

from __future__ import annotations

from typing import Optional

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
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        if getattr(module, "nx", None) is None and module.weight.dim() != 2:
            return ("its weight is a flat shard (FSDP1) and this transformers version's Conv1D does not declare its "
                    "input width (nx); use FSDP2 (ModelParallelStrategy) or a newer transformers")
        return None

    @classmethod
    def geometry(cls, module: nn.Module) -> tuple[int, int]:
        # declared sizes (nx, nf): under FSDP1 the weight is a flat shard; a DTensor's shape is the full one
        nx = getattr(module, "nx", None)
        d_in = int(nx) if nx is not None else int(module.weight.shape[0])
        return d_in, int(module.nf)

    def input_rows(self, x: Tensor) -> Tensor:
        return as_tokens(x)

    def gradient_rows(self, ds: Tensor) -> Tensor:
        return as_tokens(ds)

    def weight_matrix(self, w: Tensor) -> Tensor:
        return w.transpose(-1, -2)

    def weight_from_matrix(self, g: Tensor) -> Tensor:
        return g.transpose(-1, -2)
