"""Per-example losses read from the training forward pass, with no Lightning import.

When Z0's probe is the training set, every probe example passes through the model once per epoch
anyway. :class:`TrainingLossCapture` reads its per-example loss from that pass instead of a second
pass over the probe: forward hooks on the model (the root module and its direct children) compute
``task.loss_from_outputs(outputs, batch)`` from the training forward's outputs (detached, no
gradient, so nothing of the step changes), and the result is accepted only when it reproduces the
training loss of the step: ``gradient_scale(batch) * sum_b loss_b == training loss`` (the task's
convention, the one EK-FAC already relies on) within float tolerance. A training step whose loss
is not that (extra terms, several forward passes, a module the task does not describe) is
detected, and the caller falls back to its probe pass.

Use: :meth:`TrainingLossCapture.attach` once; per training batch :meth:`~TrainingLossCapture.begin`
before the forward and :meth:`~TrainingLossCapture.end` with the step's loss after it;
:meth:`~TrainingLossCapture.detach` at the end. The first verified batch chooses which hooked module
is read; the other hooks are removed then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..task import TaskLike, _output_tensor

__all__ = ["TrainingLossCapture", "CapturedLosses", "LOSS_RTOL", "LOSS_ATOL"]

LOSS_RTOL = 1e-3
"""Relative tolerance of ``scale * sum(losses)`` against the training loss (float32 sums of bf16
logits included)."""
LOSS_ATOL = 1e-6


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now (activation-checkpoint recomputation)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


@dataclass
class CapturedLosses:
    """The outcome of one training batch.

    Attributes:
        losses: ``float32 Tensor[B]`` (detached, on the model's device), or ``None`` when the batch
            gave no verified losses.
        problem: why not, in words (``None`` when ``losses`` is given).
        source: the name of the module the losses were read from (``""`` for the root module).
    """

    losses: Optional[Tensor]
    problem: Optional[str] = None
    source: Optional[str] = None


class TrainingLossCapture:
    """Reads per-example losses of the training batches from the model's own forward pass.

    Args:
        model: the module that training calls (a LightningModule); hooks go on it and on its
            direct children (``self(x)``, ``self.model(**batch)`` and ``self.net(x)`` are read).
        task: how to turn outputs into per-example losses (``loss_from_outputs(outputs, batch)``)
            and the training loss's scale (``gradient_scale(batch)``).

    Attributes:
        chosen: the name of the hooked module the losses come from, once a batch verified one
            (``""``: the root module), else ``None``.

    Batches after the first are checked lazily, all at once in :meth:`consistent` (so that no
    training step waits for the device or pays for more than keeping three references).
    """

    def __init__(self, model: nn.Module, task: TaskLike) -> None:
        self.model = model
        self.task = task
        self.chosen: Optional[str] = None
        self._handles: dict[str, Any] = {}
        self._batch: Any = None
        self._active = False
        self._results: dict[str, list] = {}
        self._errors: dict[str, str] = {}
        self._checks: list[tuple[Tensor, float, Tensor]] = []  # (losses, scale, step loss) not yet checked
        self._last_problem: Optional[str] = None

    # -- hooks --------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the forward hooks (the root module first, then its direct children)."""
        self.detach()
        candidates = [("", self.model)] + [(n, m) for n, m in self.model.named_children()]
        for name, module in candidates:
            self._handles[name] = module.register_forward_hook(self._hook(name))

    def detach(self) -> None:
        """Remove every hook this object registered."""
        for h in self._handles.values():
            h.remove()
        self._handles = {}
        self._active = False
        self._batch = None

    @property
    def attached(self) -> bool:
        """Whether hooks are registered."""
        return bool(self._handles)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active or not module.training or _in_backward():
                return
            calls = self._results.setdefault(name, [])
            calls.append(None)
            if len(calls) > 1:
                return  # called again in this step: rejected in end()
            try:
                with torch.no_grad():
                    out = _output_tensor(output).detach()
                    calls[0] = self.task.loss_from_outputs(out.float(), self._batch).detach().float().reshape(-1)
            except Exception as e:  # a module whose outputs are not what the task reads
                self._errors[name] = f"{type(e).__name__}: {e}"

        return hook

    # -- per batch ----------------------------------------------------------------------------
    def begin(self, batch: Any) -> None:
        """Before the training forward of ``batch`` (the batch as the model sees it, on its device)."""
        self._batch = batch
        self._results, self._errors = {}, {}
        self._active = True

    def end(self, step_loss: Optional[Tensor], batch_size: int) -> CapturedLosses:
        """After the training step: the per-example losses the forward computed, checked against
        ``step_loss`` (the step's training loss, undivided by gradient accumulation).

        Args:
            step_loss: the scalar training loss of the step, or ``None`` when the step returned none.
            batch_size: the number of examples in the batch.
        """
        self._active = False
        batch, self._batch = self._batch, None
        if step_loss is None or not isinstance(step_loss, Tensor) or step_loss.numel() != 1:
            return CapturedLosses(None, "the training step returned no scalar loss")
        names = [self.chosen] if self.chosen is not None else list(self._handles)
        problems = []
        for name in names:
            calls = self._results.get(name, [])
            label = repr(name) if name else "the LightningModule"
            if name in self._errors:
                problems.append(f"{label}: loss_from_outputs failed ({self._errors[name]})")
                continue
            if not calls:
                problems.append(f"{label} was not called in the training step")
                continue
            if len(calls) > 1:
                problems.append(f"{label} was called {len(calls)} times in one training step")
                continue
            losses = calls[0]
            if losses is None or losses.numel() != batch_size:
                shape = None if losses is None else tuple(losses.shape)
                problems.append(f"{label} gave per-example losses of shape {shape} for {batch_size} examples")
                continue
            scale = float(self.task.gradient_scale(batch))
            if self.chosen is None:  # the first batch: decide now which module is read
                total, expected = float(losses.double().sum()) * scale, float(step_loss)
                if not abs(total - expected) <= LOSS_RTOL * abs(expected) + LOSS_ATOL:
                    problems.append(f"{label}: gradient_scale * sum of per-example losses = {total:.6g}, but the "
                                    f"training loss is {expected:.6g}")
                    continue
                self.chosen = name
                for other in [n for n in self._handles if n != name]:
                    self._handles.pop(other).remove()
            else:
                self._checks.append((losses, scale, step_loss.detach()))
            return CapturedLosses(losses, source=name)
        self._last_problem = "; ".join(problems)
        return CapturedLosses(None, self._last_problem)

    def consistent(self) -> bool:
        """Whether every batch since :meth:`reset_check` reproduced its training loss
        (``gradient_scale * sum == loss`` within ``LOSS_RTOL`` / ``LOSS_ATOL``), checked now for
        all of them at once; forgets them."""
        checks, self._checks = self._checks, []
        if not checks:
            return True
        losses = [c[0] for c in checks]
        flat = torch.cat(losses).double()
        which = torch.repeat_interleave(torch.arange(len(losses), device=flat.device),
                                        torch.tensor([x.numel() for x in losses], device=flat.device))
        sums = torch.zeros(len(losses), dtype=torch.float64, device=flat.device).index_add_(0, which, flat)
        totals = sums * torch.tensor([c[1] for c in checks], dtype=torch.float64, device=flat.device)
        expected = torch.stack([c[2].reshape(()).to(flat.device, torch.float64) for c in checks])
        return bool(((totals - expected).abs() <= LOSS_RTOL * expected.abs() + LOSS_ATOL).all())

    def reset_check(self) -> None:
        """Forget the batches not yet checked (at the start of an epoch)."""
        self._checks = []
