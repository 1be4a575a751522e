"""Passes over data that yield tracked layers' inputs and output gradients, batch by batch.

Everything EK-FAC computes after (or beside) training goes through :func:`iter_layer_data`: the
offline covariance and correction passes (:mod:`.fit`), the training callback's correction pass,
the scorer and the multi-stage scorer. Gradients are those of the **summed** per-example loss
(or sampled-label loss, or measurement) with respect to the layer outputs; parameter ``.grad``
is never touched.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable, Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from ..batches import move_to_device
from ..layers import TrackedLayer, reshard_fsdp1
from ..model_mode import eval_mode
from ..progress import progress_bar
from ..task import TaskLike, example_count
from .capture import LayerCapture, LayerIO

__all__ = ["Which", "LayerData", "layer_batch_data", "iter_layer_data"]

Which = Literal["loss", "sampled", "measurement"]
LayerData = dict[str, LayerIO]
"""Layer name → :class:`~.capture.LayerIO` ``(a[B, T, a_dim], ds[B, T, d_out], mask)``."""


def layer_batch_data(
    model: nn.Module,
    batch: Any,
    capture: LayerCapture,
    task: TaskLike,
    which: Which = "loss",
    generator: Optional[torch.Generator] = None,
) -> tuple[LayerData, Tensor]:
    """One forward and one gradient of the summed ``which`` values w.r.t. the layer outputs.

    Args:
        which: ``"loss"`` (per-example losses), ``"sampled"`` (losses for labels sampled from the
            model: the true Fisher) or ``"measurement"`` (the query measurement).

    Returns:
        ``(layer data, values[B])``: see :data:`LayerData`; values are detached.
    """
    capture.clear()
    capture.mask = task.padding_mask(batch)
    with torch.enable_grad():
        if which == "loss":
            values = task.per_example_loss(model, batch)
        elif which == "sampled":
            values = task.sampled_loss(model, batch, generator=generator)
        else:
            values = task.measurement(model, batch)
        outputs = capture.outputs()
        if not outputs:
            raise RuntimeError("no tracked layer produced a differentiable output; are the parameters frozen?")
        grads = torch.autograd.grad(values.sum(), outputs, allow_unused=True)
    data = capture.collected(grads)
    capture.clear()
    reshard_fsdp1(model)  # FSDP1 units shard again the weights this backward gathered (layers/fsdp.py)
    return data, values.detach()


def iter_layer_data(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[TrackedLayer],
    task: TaskLike,
    which: Which = "loss",
    *,
    generator: Optional[torch.Generator] = None,
    max_batches: Optional[int] = None,
    max_examples: Optional[int] = None,
    forward_context: Optional[Callable[[], ContextManager]] = None,
    progress: Optional[bool] = False,
    desc: str = "EK-FAC pass",
    default_ids: Optional[Tensor] = None,
) -> Iterator[tuple[Tensor, LayerData]]:
    """Yield ``(ids, layer data)`` for each batch of ``loader``, model in eval mode.

    ``ids`` (``LongTensor[B]`` on the CPU) are the batch's own example ids; for batches that
    carry none, ``default_ids[position]`` where ``position`` counts examples from the start of
    the loader (default: the position itself).

    Args:
        max_batches: stop after this many batches.
        max_examples: stop before the first batch once this many examples were seen (a batch
            is never cut).
        forward_context: a context-manager factory around each forward (e.g. a Lightning
            precision plugin's ``forward_context`` for autocast).
        progress: show a progress bar (see :mod:`lightning_influence.progress`).
        desc: its label.
        default_ids: ids of examples whose batches carry none, by position.
    """
    device = next(model.parameters()).device
    ctx = forward_context or contextlib.nullcontext
    seen = 0
    with eval_mode(model), LayerCapture(layers, collect=True) as cap, torch.inference_mode(False):
        for i, batch in enumerate(progress_bar(loader, desc, progress)):
            if (max_batches is not None and i >= max_batches) or (max_examples is not None and seen >= max_examples):
                break
            batch = move_to_device(batch, device)
            n = example_count(task, batch)
            ids = task.example_ids(batch)
            if ids is None:
                ids = torch.arange(seen, seen + n) if default_ids is None else default_ids[seen : seen + n]
            seen += n
            with ctx():
                data, _ = layer_batch_data(model, batch, cap, task, which, generator)
            yield ids.reshape(-1).cpu().long(), data
