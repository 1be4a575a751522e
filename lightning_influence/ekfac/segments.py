"""Trajectory segments written during training (no Lightning import): the clock that measures
each segment (steps, mean learning rate, weight) and the writer of its two artifacts,
``<folder>/segment=KK/factors`` and ``<folder>/segment=KK/weights``, which
:func:`lightning_influence.trajectory.load_segments` reads back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from torch import Tensor

from ..layers import TrackedLayer
from ..storage import write_artifact
from ..trajectory import SEGMENT_WEIGHTS_KIND, segment_dirname
from .factors import EKFACFactors, save_factors

__all__ = ["SegmentClock", "segment_weights", "save_segment"]


class SegmentClock:
    """Steps and learning rates of the current trajectory segment (checkpointed with the
    callback): every training batch adds the learning rate it ran at (the first optimizer's
    first parameter group's); a segment's ``weight`` is its mean learning rate × its optimizer
    steps."""

    def __init__(self) -> None:
        self.index = 0  # segments finished
        self.start_step = 0
        self.start_epoch = 0
        self.batches = 0
        self.lr_sum = 0.0
        self.last_epoch = 0  # the last epoch that ended

    def observe(self, lr: float) -> None:
        """One training batch at learning rate ``lr``."""
        self.batches += 1
        self.lr_sum += float(lr)

    def finish(self, global_step: int, index: int, epoch: int, segments: int) -> dict[str, Any]:
        """The finished segment's record (for both artifacts' manifests); starts the next."""
        steps = global_step - self.start_step
        mean_lr = self.lr_sum / self.batches if self.batches else 0.0
        info = {"segment": index, "segments": segments, "first_epoch": self.start_epoch, "last_epoch": epoch,
                "global_step": global_step, "steps": steps, "batches": self.batches, "mean_lr": mean_lr,
                "weight": mean_lr * steps}
        self.index, self.start_epoch, self.batches, self.lr_sum = index + 1, epoch + 1, 0, 0.0
        self.start_step = global_step
        return info

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def segment_weights(layers: Sequence[TrackedLayer]) -> dict[str, Tensor]:
    """The tracked modules' own parameters, ``"<layer>.<parameter>"`` → tensor (detached)."""
    return {f"{l.name}.{p}": t.detach() for l in layers for p, t in l.module.named_parameters(recurse=False)}


def save_segment(folder: Path, index: int, factors: EKFACFactors, weights: dict[str, Tensor], layers: Sequence[str],
                 info: dict[str, Any], fingerprint: Optional[Any] = None, storage: str = "exact") -> Path:
    """Write segment ``index``'s factors and end weights under ``folder/segment=KK/``; returns that folder."""
    out = Path(folder) / segment_dirname(index)
    save_factors(factors, out / "factors", weights=fingerprint, storage=storage, in_place=True)
    write_artifact(out / "weights", SEGMENT_WEIGHTS_KIND, weights, {"layers": list(layers), "meta": info})
    return out
