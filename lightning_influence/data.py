"""Data helpers: datasets whose items carry their own index (so influence scores can name
examples), finding items by that id (:func:`find_examples`) and collate functions for causal-LM
and question-answer batches.

Every collate function here accepts items with or without ids (``(id, dict)`` pairs from
:class:`IndexedDataset`) and returns ``(ids, batch)`` or ``batch`` accordingly.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .errors import InfluenceError

__all__ = ["IndexedDataset", "DuplicateIdsError", "lm_collate", "classification_collate", "qa_collate", "answer_only_labels", "find_examples"]


class DuplicateIdsError(InfluenceError, ValueError):
    """Two examples of one set carry the same id, so their scores could not be told apart
    (raised by the callbacks when gathering results and by :func:`~lightning_influence.index.build_index`)."""


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that item ``i`` is ``(i, dataset[i])``.

    With the default collate function a batch becomes ``[ids, example_batch]`` where
    ``ids`` is ``LongTensor[B]``; for dict examples (Hugging Face style) the batch is
    ``[ids, {"input_ids": ..., ...}]``. Every task in this library understands both.

    Args:
        dataset: any map-style dataset (has ``__len__`` and ``__getitem__``).
        offset: added to every index, e.g. to give a second split distinct ids.
    """

    def __init__(self, dataset: Sequence[Any] | Dataset, offset: int = 0) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"IndexedDataset(dataset=...) needs a map-style dataset with __len__ and "
                f"__getitem__, got {type(dataset).__name__}"
            )
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"IndexedDataset(offset=...) must be a non-negative int, got {offset!r}")
        self.dataset = dataset
        self.offset = offset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index + self.offset, self.dataset[index]


def _split_item_ids(items: list) -> tuple[Optional[Tensor], list]:
    """``(ids, dicts)`` for ``(id, dict)`` items, ``(None, items)`` otherwise."""
    if items and isinstance(items[0], (tuple, list)):
        return torch.tensor([int(i) for i, _ in items]), [d for _, d in items]
    return None, items


def _pad_right(seqs: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, both ``LongTensor[B, max_len]``, right padded."""
    longest = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = torch.as_tensor(s).long()
        mask[r, : len(s)] = 1
    return input_ids, mask


def lm_collate(items: list, pad_id: int = 0) -> Any:
    """Pad a list of ``{"input_ids"}`` dicts (or ``(id, dict)`` pairs) on the right.

    Returns ``{"input_ids", "attention_mask", "labels"}`` (``LongTensor[B, T]``; labels ``-100``
    on padding), under ``(ids, dict)`` when the items carry ids.
    """
    ids, items = _split_item_ids(items)
    input_ids, mask = _pad_right([d["input_ids"] for d in items], pad_id)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}
    return batch if ids is None else (ids, batch)


def classification_collate(items: list, pad_id: int = 0) -> Any:
    """Right-pad ``{"input_ids", "labels"}`` items (one class label per sequence), or
    ``(id, item)`` pairs, into ``{"input_ids": LongTensor[B, T], "attention_mask": LongTensor[B, T],
    "labels": LongTensor[B]}`` (a :class:`~lightning_influence.task.SequenceClassificationTask`
    batch), under ``(ids, dict)`` when the items carry ids."""
    ids, items = _split_item_ids(items)
    input_ids, mask = _pad_right([d["input_ids"] for d in items], pad_id)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": torch.stack([torch.as_tensor(d["labels"]).long() for d in items])}
    return batch if ids is None else (ids, batch)


def answer_only_labels(input_ids: Tensor, prompt_lengths: Tensor | Sequence[int], attention_mask: Optional[Tensor] = None) -> Tensor:
    """Labels that score only the answer tokens: ``input_ids`` with ``-100`` on the prompt and padding.

    Args:
        input_ids: ``LongTensor[B, T]`` prompt tokens followed by answer tokens (right padded).
        prompt_lengths: ``[B]`` number of prompt tokens of each row (``≥ 1``).
        attention_mask: ``[B, T]`` (1 = real token); padding is ignored when given.

    Returns:
        ``LongTensor[B, T]``. With :class:`~lightning_influence.task.CausalLMTask` (labels are
        shifted inside the task) the per-example loss becomes ``-Σ_answer log p(a_t | prompt, a_<t)``.
    """
    lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).reshape(-1, 1)
    if lengths.shape[0] != input_ids.shape[0]:
        raise ValueError(f"answer_only_labels(prompt_lengths=...) has {lengths.shape[0]} rows, input_ids has {input_ids.shape[0]}")
    if (lengths < 1).any():
        raise ValueError(f"answer_only_labels(prompt_lengths=...) must be >= 1 (the first token is never a target), got {lengths.view(-1).tolist()}")
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    labels = input_ids.masked_fill(pos < lengths, -100)
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, -100)
    return labels


def qa_collate(items: list, pad_id: int = 0) -> Any:
    """Collate question-answer items into a causal-LM batch whose labels score only the answer.

    Args:
        items: dicts ``{"prompt_ids": LongTensor[P], "answer_ids": LongTensor[A]}`` (or
            ``(id, dict)`` pairs, e.g. from :class:`IndexedDataset`).
        pad_id: token used for right padding.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}`` (``LongTensor[B, T]``; labels ``-100`` on
        prompt and padding), under ``(ids, dict)`` when the items carry ids. With
        :class:`~lightning_influence.task.CausalLMTask` the per-example loss (and the default
        measurement) is ``-log p(answer | prompt)`` summed over answer tokens.
    """
    ids, items = _split_item_ids(items)
    for d in items:
        if "prompt_ids" not in d or "answer_ids" not in d:
            raise ValueError(f"qa_collate items need 'prompt_ids' and 'answer_ids', got keys {sorted(d)}")
    seqs = [torch.cat([torch.as_tensor(d["prompt_ids"]).long(), torch.as_tensor(d["answer_ids"]).long()]) for d in items]
    input_ids, mask = _pad_right(seqs, pad_id)
    plens = [len(d["prompt_ids"]) for d in items]
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": answer_only_labels(input_ids, plens, mask)}
    return batch if ids is None else (ids, batch)


def _item_id(item: Any) -> Optional[int]:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        i = item[0]
        if isinstance(i, (int, np.integer)) and not isinstance(i, bool):
            return int(i)
        if isinstance(i, Tensor) and i.numel() == 1 and not i.is_floating_point() and i.dtype != torch.bool:
            return int(i)
    return None


def find_examples(source: Any, ids: Sequence[int], max_scan: Optional[int] = 200_000) -> dict[int, Any]:
    """Items of ``source`` by example id, without their id wrapper.

    An item's id is the first element of an ``(id, example)`` pair (what
    :class:`~lightning_influence.IndexedDataset` yields), else its position (how the scorers
    name examples without ids). An ``IndexedDataset`` (or a ``Subset`` of one) is read directly,
    only the wanted items; other datasets are scanned in order until every id is found or
    ``max_scan`` items were read.

    Args:
        source: a map-style or iterable ``Dataset``, a ``DataLoader`` over one (its dataset is
            read, not its batches), or a sequence.
        ids: the wanted ids.
        max_scan: read at most this many items (``None``: no cap).

    Returns:
        ``{id: example}`` for the ids found.
    """
    dataset = source.dataset if isinstance(source, DataLoader) else source
    wanted = {int(i) for i in ids}
    found: dict[int, Any] = {}
    if isinstance(dataset, IndexedDataset):
        for i in wanted:
            pos = i - dataset.offset
            if 0 <= pos < len(dataset):
                found[i] = dataset.dataset[pos]
        return found
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, IndexedDataset):  # ids without reading items
        inner = dataset.dataset
        for index in dataset.indices:
            if int(index) + inner.offset in wanted:
                found[int(index) + inner.offset] = inner.dataset[int(index)]
        return found
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        items = enumerate(dataset)
    else:
        items = ((p, dataset[p]) for p in range(len(dataset)))
    for pos, item in items:
        if (max_scan is not None and pos >= max_scan) or len(found) == len(wanted):
            break
        iid = _item_id(item)
        key = pos if iid is None else iid
        if key in wanted and key not in found:
            found[key] = item if iid is None else item[1]
    return found
