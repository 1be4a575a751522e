"""How a Z0 recording is made during training (no Lightning import): :class:`Z0Options`."""

from __future__ import annotations

from dataclasses import InitVar, asdict, dataclass
from typing import Any, Literal, Optional

from .. import validation as check
from ..params import LAST_LAYER
from .artifact import SELF_METHODS

__all__ = ["Z0Options", "LOSS_MODES"]

LOSS_MODES = ("auto", "probe", "training_step")


@dataclass(frozen=True)
class Z0Options:
    """What ``Z0Influence`` records: frozen, plain values (YAML- and LightningCLI-friendly),
    validated on construction; the recording's manifest keeps them (``options``). The callback
    takes them as keyword arguments (see :class:`~lightning_influence.Z0Influence` for each).

    Attributes:
        every_n_steps: record after every n-th optimizer step (``None``: per epoch).
        params: ``None`` (all trainable parameters), ``"last_layer"`` or a list of glob patterns.
        losses_from: ``"auto"``, ``"probe"`` or ``"training_step"``.
        record_initial: also record a row at the initial weights.
        keep_snapshots: keep the snapshot files after training.
        snapshot_dir: where snapshot files go (``None``: ``<folder>/.snapshots``).
        self_influence: the estimator of the self-influence artifact and metrics.
        owner: who is given the values, for messages (not a field: not saved).
    """

    every_n_steps: Optional[int] = None
    params: Optional[str | list[str]] = None
    losses_from: Literal["auto", "probe", "training_step"] = "auto"
    record_initial: bool = False
    keep_snapshots: bool = False
    snapshot_dir: Optional[str] = None
    self_influence: str = "mean_loss"
    owner: InitVar[str] = "Z0Options"

    def __post_init__(self, owner: str) -> None:
        check.positive_int(owner, "every_n_steps", self.every_n_steps, allow_none=True)
        check.choice(owner, "losses_from", self.losses_from, LOSS_MODES)
        patterns = check.patterns(owner, "params", self.params)
        object.__setattr__(self, "params", LAST_LAYER if patterns == [LAST_LAYER] else patterns)
        check.boolean(owner, "record_initial", self.record_initial)
        check.boolean(owner, "keep_snapshots", self.keep_snapshots)
        path = check.optional_path(owner, "snapshot_dir", self.snapshot_dir)
        object.__setattr__(self, "snapshot_dir", None if path is None else str(path))
        check.choice(owner, "self_influence", self.self_influence, SELF_METHODS)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
