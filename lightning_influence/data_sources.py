"""Data given as a ``Dataset`` or a ``DataLoader`` (no Lightning import): the map-style dataset
to sample from, and a seeded subset of it."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from .validation import InvalidArgumentError

__all__ = ["map_style", "subsample"]


def map_style(data: Any, owner: str) -> tuple[Any, Any]:
    """``(dataset, collate_fn)`` of a sampling pool given as a ``Dataset`` or ``DataLoader``.

    Raises:
        InvalidArgumentError: the dataset is iterable (``owner`` names the caller).
    """
    dataset, collate = (data.dataset, data.collate_fn) if isinstance(data, DataLoader) else (data, None)
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise InvalidArgumentError(
            f"{owner}(pool=...) must be a map-style Dataset (or a DataLoader over one) to sample from, got "
            f"{type(dataset).__name__}; pass pool=<map-style Dataset>"
        )
    return dataset, collate


def subsample(data: Any, limit: Optional[int], seed: int) -> Any:
    """``data`` (a ``Dataset`` or a ``DataLoader``) restricted to a seeded random subset of at
    most ``limit`` examples, in their original order (a ``DataLoader`` keeps its batch size and
    collate function); ``data`` itself when it is small enough, iterable, or ``limit`` is ``None``."""
    loader = data if isinstance(data, DataLoader) else None
    dataset = loader.dataset if loader is not None else data
    if limit is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or len(dataset) <= limit:
        return data
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].sort().values.tolist()
    subset = Subset(dataset, keep)
    if loader is None:
        return subset
    return DataLoader(subset, batch_size=loader.batch_size, collate_fn=loader.collate_fn, num_workers=loader.num_workers)
