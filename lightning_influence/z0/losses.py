"""The per-example losses of a Z0 row, with no Lightning import: a pass over a probe or query
loader (:func:`evaluate_losses`), a ``training_step`` that returns them (:func:`step_losses`), or
the epoch's training forward passes read by hooks (:class:`EpochLosses`, ``losses_from="auto"``).
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..batches import move_to_device
from ..data import DuplicateIdsError
from ..task import MissingExampleIdsError, TaskLike
from .capture import TrainingLossCapture
from .recorder import Z0Recorder

__all__ = ["example_ids", "evaluate_losses", "step_losses", "drop_positions", "EpochLosses"]


def example_ids(task: TaskLike, batch: Any, what: str, owner: str) -> Tensor:
    """The batch's example ids.

    Raises:
        MissingExampleIdsError: the batch carries none.
    """
    ids = task.example_ids(batch)
    if ids is None:
        raise MissingExampleIdsError(f"{owner}: a {what} batch carries no example ids; wrap the dataset in lightning_influence."
                                     "IndexedDataset, or define `example_ids(batch)` on your LightningModule or task")
    return ids


def evaluate_losses(model: nn.Module, loader: Iterable[Any], fn: Callable[[nn.Module, Any], Tensor], task: TaskLike,
                    device: torch.device, what: str, owner: str,
                    forward_context: Callable[[], ContextManager]) -> tuple[Tensor, Tensor]:
    """``(ids int64 [n], fn(model, batch) float32 [n])`` over ``loader``, on ``device`` (modes and
    gradients are the caller's; shapes are checked when recorded)."""
    ids_all = [torch.zeros(0, dtype=torch.long, device=device)]
    loss_all = [torch.zeros(0, device=device)]
    for batch in loader:
        batch = move_to_device(batch, device)
        ids = example_ids(task, batch, what, owner)
        with forward_context():
            loss_all.append(fn(model, batch).float())
        ids_all.append(ids.to(torch.long))
    return torch.cat(ids_all), torch.cat(loss_all)


def step_losses(outputs: Any, batch: Any, task: TaskLike, owner: str) -> tuple[Tensor, Tensor]:
    """``(ids, per_example_loss)`` from what ``training_step`` returned (``losses_from="training_step"``).

    Raises:
        ValueError: ``outputs`` is not a dict with a ``per_example_loss`` tensor.
    """
    if not isinstance(outputs, dict) or not isinstance(outputs.get("per_example_loss"), Tensor):
        got = type(outputs).__name__ + (f" with keys {sorted(outputs)}" if isinstance(outputs, dict) else "")
        raise ValueError(f"{owner}(losses_from='training_step') needs training_step to return a dict with 'loss' and "
                         f"'per_example_loss' (Tensor[B], summed over tokens) and optionally 'ids'; got {got}")
    ids = outputs.get("ids")
    return (example_ids(task, batch, "training", owner) if ids is None else ids), outputs["per_example_loss"]


def drop_positions(ids: Tensor, losses: Tensor, positions: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``ids`` and ``losses`` without the examples at ``positions`` (a sampler's padding duplicates)."""
    if not positions:
        return ids, losses
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[list(positions)] = False
    return ids[keep.to(ids.device)], losses[keep.to(losses.device)]


class EpochLosses:
    """The probe's losses read from an epoch's training forward passes, when the probe is the
    training set (``losses_from="auto"``): each batch's ``per_example_loss`` when the step returns
    one, else :class:`~.capture.TrainingLossCapture`'s (verified against the step's loss), buffered
    in the recorder; at the recording point :meth:`row` gathers them, or says to fall back to a
    probe pass (``None``) when they do not cover the probe exactly once.

    Args:
        recorder: where the losses are buffered.
        task: how to read batches.
        owner: for messages, e.g. ``"Z0Influence(name='z0', losses_from='auto')"``.
    """

    def __init__(self, recorder: Z0Recorder, task: TaskLike, owner: str) -> None:
        self.recorder, self.task, self.owner = recorder, task, owner
        self.capture: Optional[TrainingLossCapture] = None
        self.ok = True  # every training batch of this epoch gave verified losses (this rank)
        self.problem: Optional[str] = None
        self.fallback_warned = False

    def start(self, model: nn.Module) -> None:
        """Attach the hooks (once per fit, at train start)."""
        self.detach()
        self.ok, self.fallback_warned = True, False
        self.capture = TrainingLossCapture(model, self.task)
        self.capture.attach()

    def detach(self) -> None:
        if self.capture is not None:
            self.capture.detach()
        self.capture = None

    def begin_epoch(self) -> None:
        self.ok = self.capture.attached  # detached: given up for this fit (the first batch failed)
        self.capture.reset_check()

    def begin_batch(self, batch: Any) -> None:
        if self.capture.attached:
            self.capture.begin(batch)

    def after_batch(self, outputs: Any, batch: Any, accumulate_grad_batches: int, padded: Callable[[int], list[int]]) -> None:
        """Buffer one training batch's losses; ``padded(n)`` gives the positions of a sampler's
        padding duplicates in a batch of ``n`` examples (each example is recorded once)."""
        if not self.capture.attached:
            return
        step_loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(step_loss, Tensor) and step_loss.numel() == 1 and accumulate_grad_batches != 1:
            step_loss = step_loss.detach() * accumulate_grad_batches  # Lightning divides it by that
        explicit = isinstance(outputs, dict) and isinstance(outputs.get("per_example_loss"), Tensor)
        ids = step_losses(outputs, batch, self.task, self.owner)[0] if explicit else example_ids(self.task, batch, "training", self.owner)
        got = self.capture.end(step_loss if isinstance(step_loss, Tensor) else None, int(ids.numel()))
        losses = outputs["per_example_loss"] if explicit else got.losses
        positions = padded(int(ids.numel()))
        if losses is None or not self.ok:
            if self.ok:
                self.ok, self.problem = False, got.problem
            if self.capture.chosen is None and not explicit:  # no module reproduced the first loss: give up
                self.capture.detach()
            return
        ids, losses = drop_positions(ids, losses, positions)
        if ids.numel() != losses.numel():
            self.ok, self.problem = False, f"per_example_loss has {losses.numel()} values for {ids.numel()} examples"
            return
        self.recorder.observe_training_losses(ids, losses)

    def row(self, ranks: Any, n_probe: int, step: int, warn: Callable[[str], None]) -> Optional[tuple[Tensor, Tensor]]:
        """The probe row from this epoch's training steps, gathered by id (every rank), or ``None``
        when they do not cover the probe exactly once or a step's losses could not be verified:
        then the row comes from a probe pass (``warn`` is called once per fit)."""
        ok = self.ok and self.capture.consistent()
        problem = None if ok else (self.problem or "a training step's per-example losses did not add up to its training loss")
        ids, losses = self.recorder.pop_training_losses()
        if not ok:
            ids, losses = ids[:0], losses[:0]
        try:
            ids, losses = ranks.gather_by_id(ids.to(ranks.device), losses.to(ranks.device))
        except DuplicateIdsError:
            ids, losses, problem = ids[:0], losses[:0], "an example was trained on more than once in the epoch"
        known = self.recorder.probe_ids
        if problem is None and (ids.numel() != n_probe or (known is not None and not torch.equal(known, ids.cpu()))):
            problem = (f"the epoch's training steps covered {ids.numel()} of the {n_probe} probe examples (limit_train_batches, "
                       "drop_last, max_steps or a sampler that leaves examples out)")
        if problem is None:
            return ids, losses
        if not self.fallback_warned:
            self.fallback_warned = True
            warn(f"{self.owner}: the probe is the training set, but its losses could not be read from the training steps "
                 f"at step {step} ({problem}); this row and any other such row come from a pass over the probe instead "
                 "(losses_from='probe' says so from the start)")
        return None
