"""The one rule for a ``DistributedSampler``'s padding (no Lightning import).

With ``drop_last=False`` the sampler pads its index list to ``total_size`` (a multiple of the
number of ranks) by repeating its first indices, so that every rank gets as many examples. Rank
``r``'s ``p``-th example (0-based) has global position ``p · W + r``; those at positions
``len(dataset)`` and up are the duplicates (the last example of the last ranks). Work that must
count every example once (EK-FAC's sums, Z0's training losses, the correction pass) leaves them
out by position: :func:`padded_positions` in a training batch, :func:`without_padding` for a
pass over a loader.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["padding_sampler", "padded_positions", "without_padding", "even_batch_sizes"]


def padding_sampler(loader: Any) -> Optional[DistributedSampler]:
    """``loader``'s ``DistributedSampler`` when it pads (``drop_last=False`` and a dataset whose
    size is not a multiple of the ranks), else ``None``."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last or sampler.total_size <= len(sampler.dataset):
        return None
    return sampler


def _is_padding(sampler: DistributedSampler, position: int) -> bool:
    return position * sampler.num_replicas + sampler.rank >= len(sampler.dataset)


def padded_positions(loader: Any, start: int, batch_size: int) -> list[int]:
    """Positions in a batch of ``batch_size`` examples of this rank, starting at the loader's
    ``start``-th example of the epoch, that are the sampler's padding duplicates (empty without
    a padding sampler)."""
    sampler = padding_sampler(loader)
    if sampler is None:
        return []
    return [i for i in range(batch_size) if _is_padding(sampler, start + i)]


def without_padding(loader: Any, sharded: bool = False, max_batches: Optional[int] = None,
                    max_examples: Optional[int] = None, warn: Optional[Callable[[str], None]] = None) -> Any:
    """``loader`` over this rank's examples of the sampler's current epoch, without the padding
    duplicates (``loader`` itself without a padding sampler).

    ``sharded``: every forward pass is a collective, so every rank must run as many batches: a
    rank one example short (it held a duplicate) takes one example less in its last batch, or in
    the one before when the last would be empty, and the batches are cut where ``max_batches`` /
    ``max_examples`` stop a rank with the full share. When that cannot be done (a share of one
    example, batches of one) ``loader`` is kept, so the duplicates count, and ``warn`` is called.
    """
    sampler = padding_sampler(loader)
    if sampler is None:
        return loader
    indices = [i for p, i in enumerate(iter(sampler)) if not _is_padding(sampler, p)]
    size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 1  # sums: the size only sets speed
    if not sharded:
        return DataLoader(Subset(loader.dataset, indices), batch_size=size, shuffle=False,
                          collate_fn=loader.collate_fn, num_workers=loader.num_workers)
    sizes = even_batch_sizes(len(indices), sampler.num_samples, size, max_batches, max_examples)
    if sizes is None:
        if warn is not None:
            warn(f"the correction pass keeps the {sampler.total_size - len(sampler.dataset)} examples the "
                 "DistributedSampler repeats to even out the ranks (shares of one example or batches of one "
                 "cannot be evened out otherwise under a sharded strategy)")
        return loader
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    batches = [indices[a:a + n] for a, n in zip(starts, sizes)]
    return DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn, num_workers=loader.num_workers)


def even_batch_sizes(n: int, share: int, batch_size: int, max_batches: Optional[int] = None,
                     max_examples: Optional[int] = None) -> Optional[list[int]]:
    """Batch sizes for ``n`` examples (``share`` or ``share - 1``) such that every rank runs the
    same number of batches: those of ``share`` examples in batches of ``batch_size``, cut where
    ``max_batches`` / ``max_examples`` (stop before the first batch once this many were seen) stop
    them; with ``n = share - 1`` one example less in the last batch, or in the one before when the
    last would be empty. ``None`` when that is impossible (``n = 0``, or batches of one)."""
    full = [batch_size] * (share // batch_size) + ([share % batch_size] if share % batch_size else [])
    keep, seen = 0, 0
    for size in full:
        if (max_batches is not None and keep >= max_batches) or (max_examples is not None and seen >= max_examples):
            break
        keep, seen = keep + 1, seen + size
    if n == share:
        return full[:keep]
    if n != share - 1 or n == 0:
        return None
    sizes = list(full)
    if sizes[-1] > 1:
        sizes[-1] -= 1
    elif len(sizes) >= 2 and sizes[-2] > 1:
        sizes[-2] -= 1
    else:
        return None
    return sizes[:keep]
