"""Batch plumbing shared by every method (no Lightning import): moving nested batches between
devices, counting their examples and describing their layout in error messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["move_to_device", "first_tensor", "leading_size", "describe"]


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor of a nested batch to ``device``.

    Tensors, mappings (their type kept where it can be rebuilt from a dict), lists, tuples and
    named tuples are walked; objects with a ``.to(device)`` method (e.g. transformers'
    ``BatchEncoding``) are moved with it; anything else is returned as is.
    """
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # type: ignore[call-arg]
        except Exception:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    to = getattr(batch, "to", None)
    if callable(to):
        return to(device)
    return batch


def first_tensor(batch: Any) -> Tensor:
    """The first tensor of a nested batch, depth first.

    Raises:
        ValueError: the batch holds no tensor.
    """
    if isinstance(batch, Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        try:
            return first_tensor(item)
        except ValueError:
            continue
    raise ValueError(f"the batch holds no tensor: {describe(batch)}")


def leading_size(batch: Any) -> int:
    """Size of the leading (example) dimension of the batch's first tensor."""
    t = first_tensor(batch)
    return int(t.shape[0]) if t.dim() else 1


def describe(batch: Any) -> str:
    """A short structural description such as ``list(Tensor(32,), tuple(Tensor(32, 64), Tensor(32,)))``."""
    if isinstance(batch, Tensor):
        return f"Tensor{tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return type(batch).__name__ + "(" + ", ".join(describe(b) for b in batch) + ")"
    return type(batch).__name__
