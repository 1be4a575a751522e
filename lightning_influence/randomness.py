"""Influence work during training never changes training's random draws (no Lightning import).

Creating a ``DataLoader`` iterator draws its base seed from torch's global generator, a
dataset's augmentations draw from it (and from Python's and NumPy's), and a model in train mode
draws for dropout. A probe pass inside training (an id check at ``setup``, Z0's recordings, a
correction pass at a segment's end) would therefore shift every later draw: the next epoch's
shuffle, dropout masks, augmentations. The run with the callback would train another model than
the run without it. :func:`randomness_kept` restores every global random state after the block,
and :class:`RandomnessKeepingLoader` does so around each pass over a loader.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterable, Iterator

import torch

__all__ = ["randomness_kept", "RandomnessKeepingLoader"]


@contextlib.contextmanager
def randomness_kept(loader: Any = None) -> Iterator[None]:
    """Restore torch's global random state (CPU and, when initialised, CUDA), Python's and
    NumPy's after the block, and the sampler generators of ``loader`` (e.g. the training loader,
    when the block iterates it) too."""
    samplers = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    generators = {id(g): g for g in (getattr(s, "generator", None) for s in samplers) if isinstance(g, torch.Generator)}
    states = {k: g.get_state() for k, g in generators.items()}
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        np, np_state = None, None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        if np is not None:
            np.random.set_state(np_state)
        for k, g in generators.items():
            g.set_state(states[k])


class RandomnessKeepingLoader:
    """``loader`` whose every pass leaves the global random states as they were before it (see
    :func:`randomness_kept`); other attributes are the loader's."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        with randomness_kept():
            yield from self.loader

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)
