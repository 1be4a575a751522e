"""Rules for accumulating EK-FAC factors from a training run (no Lightning import): which layers
(trainable ones), how often (``update_every_n_steps="auto"``), at what gradient scale, and where
trajectory segments end.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

from ..distributed import UnsupportedStrategyError
from ..layers import LayerSelectionError, TrackedLayer
from ..validation import InvalidArgumentError

__all__ = ["AUTO_OVERHEAD", "AUTO_MIN_UPDATES", "resolve_update_every", "gradient_factor", "trainable_layers",
           "segment_end_epochs", "check_segments"]

AUTO_OVERHEAD = 0.10
"""``update_every_n_steps="auto"``: the covariance updates' share of training compute to aim for."""
AUTO_MIN_UPDATES = 8
"""``update_every_n_steps="auto"``: the fewest updates a run of known length gets."""


def resolve_update_every(layers: Sequence[TrackedLayer], n_params: int, total_steps: Optional[int]) -> int:
    """``update_every_n_steps`` for ``"auto"``: ``⌈Σ(a² + o²) / (6·P·AUTO_OVERHEAD)⌉`` (the
    updates' multiply-adds per token over a training step's ``6·P``), lowered to
    ``total_steps // AUTO_MIN_UPDATES`` so a short run still gets enough updates; at least 1."""
    work = sum(l.a_dim ** 2 + l.d_out ** 2 for l in layers)
    n = max(1, math.ceil(work / (6 * max(1, n_params) * AUTO_OVERHEAD)))
    if total_steps is not None and total_steps > 0:
        n = min(n, max(1, total_steps // AUTO_MIN_UPDATES))
    return n


def gradient_factor(gradient_scale: float, accumulate_grad_batches: int = 1, loss_scale: float = 1.0) -> float:
    """What turns the output gradients a training backward produces into those of the summed
    per-example loss: ``accumulate_grad_batches / (gradient_scale · loss_scale)``, undoing the
    loss's reduction over the batch (``task.gradient_scale(batch)``: the loss is that times the
    sum), the division by the number of accumulated batches and AMP's loss scaling."""
    return accumulate_grad_batches / (float(gradient_scale) * loss_scale)


def trainable_layers(layers: list[TrackedLayer], owner: str, warn: Callable[[str], None]) -> list[TrackedLayer]:
    """``layers`` without those whose parameters are all frozen (``warn`` is told which).

    Raises:
        LayerSelectionError: every layer is frozen.
    """
    frozen = [l.name for l in layers if not any(p.requires_grad for p in l.parameters())]
    if not frozen:
        return layers
    kept = [l for l in layers if l.name not in frozen]
    if not kept:
        raise LayerSelectionError(
            f"{owner}(layers=None): every supported layer is frozen ({frozen}); unfreeze some, or name the "
            "layers to track in layers="
        )
    warn(f"{owner}(layers=None) skips {len(frozen)} layers without trainable parameters: {frozen[:10]}; "
         "name them in layers= to track them anyway")
    return kept


def segment_end_epochs(max_epochs: int, segments: int) -> list[int]:
    """0-based epochs after which each of ``segments`` trajectory segments ends:
    ``(k+1)·max_epochs // segments - 1``."""
    return [(k + 1) * max_epochs // segments - 1 for k in range(segments)]


def check_segments(segments: int, max_epochs: Optional[int], sharded: bool, owner: str) -> None:
    """Refuse trajectory segments a run cannot have: more segments than epochs, or sharded
    parameters (the segments' end weights are saved from whole tensors).

    Raises:
        InvalidArgumentError: ``max_epochs`` unknown or below ``segments``.
        UnsupportedStrategyError: ``sharded``.
    """
    if max_epochs is None or max_epochs < segments:
        raise InvalidArgumentError(
            f"{owner}(segments={segments}) cuts training into segments of whole epochs and needs "
            f"Trainer(max_epochs >= {segments}), got max_epochs={max_epochs}"
        )
    if sharded:
        raise UnsupportedStrategyError(
            f"{owner}(segments={segments}) saves the tracked modules' weights at every segment end, "
            "which is not implemented for sharded parameters (FSDP); use segments=1 or strategy='ddp'"
        )
