"""``nn.Conv2d`` and ``nn.Conv1d``: rows are output positions, inputs are unfolded patches.

For an output position ``p`` the convolution computes ``s_p = W a_p (+ b)`` where ``a_p`` is the
input patch that position reads (``in_channels · prod(kernel_size)`` values, in the order of
``weight.reshape(out_channels, -1)``), so the layer is a linear layer over ``L = prod(output
size)`` rows per example: ``A`` is the covariance of patch vectors, ``S`` that of the output
gradients over positions, and an example's gradient is ``sum_p ds_p a_pᵀ`` (summed over
positions). Patches are taken with the module's own stride, dilation and padding, including
``padding="same"`` (also when uneven) and every ``padding_mode`` (the input is padded exactly as
the module's forward pads it).

``groups > 1`` (grouped and depthwise convolutions) is refused: each group has its own
Kronecker factors, which one ``(A, S)`` pair per layer cannot hold.
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .base import TrackedLayer, register_layer_type

__all__ = ["ConvLayer", "Conv1dLayer", "Conv2dLayer"]


class ConvLayer(TrackedLayer):
    """Shared by :class:`Conv1dLayer` and :class:`Conv2dLayer` (``spatial_dims`` = 1 or 2)."""

    spatial_dims: ClassVar[int]

    @classmethod
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        if module.groups != 1:
            return (f"groups={module.groups} (grouped or depthwise convolution); only groups=1 is supported, "
                    "leave it out with exclude=[...]")
        return None

    @classmethod
    def geometry(cls, module: nn.Module) -> tuple[int, int]:
        return module.in_channels * math.prod(module.kernel_size), module.out_channels

    def _check_rank(self, t: Tensor, what: str) -> None:
        if t.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"{self.type_name} {self.name!r}: expected a batched {what} of rank {self.spatial_dims + 2} "
                f"(B, C, ...), got shape {tuple(t.shape)}; unbatched inputs are not supported"
            )

    def input_rows(self, x: Tensor) -> Tensor:
        """``[B, C_in, *size]`` → patches ``[B, L, C_in · prod(kernel_size)]``."""
        self._check_rank(x, "input")
        m, n = self.module, self.spatial_dims
        padding = m.padding
        if m.padding_mode != "zeros" or isinstance(padding, str):
            if padding != "valid":
                mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
                x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)  # as the module's forward pads
            padding = (0,) * n
        kernel, stride, dilation = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
        if n == 1:  # unfold is 2-d: a length-L sequence is a 1 × L image
            x = x.unsqueeze(2)
            kernel, stride, dilation, padding = (1,) + kernel, (1,) + stride, (1,) + dilation, (0,) + tuple(padding)
        cols = F.unfold(x, kernel, dilation=dilation, padding=tuple(padding), stride=stride)
        return cols.transpose(1, 2)

    def gradient_rows(self, ds: Tensor) -> Tensor:
        """``[B, C_out, *out_size]`` → ``[B, L, C_out]``."""
        self._check_rank(ds, "output gradient")
        return ds.flatten(2).transpose(1, 2)

    def weight_matrix(self, w: Tensor) -> Tensor:
        return w.flatten(-(self.spatial_dims + 1))

    def weight_from_matrix(self, g: Tensor) -> Tensor:
        # the declared kernel shape (groups=1), not weight.shape: under FSDP the weight is a shard
        return g.reshape(*g.shape[:-1], self.module.in_channels, *self.module.kernel_size)


@register_layer_type(nn.Conv1d)
class Conv1dLayer(ConvLayer):
    """``nn.Conv1d`` with ``groups=1``; rows are the ``L_out`` output positions. A padding mask
    ``[B, T]`` applies when ``L_out = T`` (a length-preserving convolution over the tokens)."""

    type_name = "torch.nn.Conv1d"
    spatial_dims = 1


@register_layer_type(nn.Conv2d)
class Conv2dLayer(ConvLayer):
    """``nn.Conv2d`` with ``groups=1``; rows are the ``H_out · W_out`` output positions. A
    sequence padding mask never applies (positions are not tokens)."""

    type_name = "torch.nn.Conv2d"
    spatial_dims = 2

    def mask_applies(self, mask: Tensor, rows: Tensor) -> bool:
        return False
