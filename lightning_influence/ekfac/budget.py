"""How much memory EK-FAC needs, estimated before anything is allocated (no Lightning import).

The factor-sized tensors of a run, per tracked layer with input side ``a`` (``d_in`` + bias) and
output side ``o`` (``d_out``), in bytes of the accumulation dtype (4 for float32):

* **sums** ``Σ (a² + o²)``: the running covariances; during training one copy in the first
  contributing epoch, two from the second on (the epoch's sums beside the running ones), one
  more with trajectory ``segments``;
* **end of fit**: the sums turn into eigenvectors layer by layer (each layer's sums are released
  as its eigenvectors appear), so the peak is one copy plus the largest layer's workspace
  (its averaged covariances, ``eigh``'s work space and the new eigenvectors: ``3 (a² + o²)``);
* **correction pass**: the eigenvectors plus the corrected-eigenvalue sums ``Σ a·o`` (weight-sized)
  and, for the adaptive sample's error estimate, the sums of fourth powers of at most 65536 entries
  per layer (:attr:`~.covariance.LambdaAccumulator.SPREAD_ENTRIES`);
* **writing**: the factors ``Σ (a² + o² + a·o)`` (written from memory without a copy; the
  largest layer's workspace as a margin).

The peak is the largest of these phases, plus what training itself will still allocate after
``fit`` starts (:class:`~lightning_influence.memory.TrainingState`: gradients and the
optimizer's lazily created state, e.g. AdamW's two parameter-sized buffers), which the memory
available at ``fit`` start does not show yet: a documented function of the tracked layers' and
the model's sizes, never of the number of examples. Embedding and unembedding layers (an output side of the
vocabulary's size: 50257² floats = 10 GB for GPT-2's head) are left out by default by the layer
selection; including one on purpose is refused here when it cannot fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..layers import TrackedLayer
from .covariance import LambdaAccumulator
from ..memory import InsufficientMemoryError, TrainingState, available_memory, format_bytes

__all__ = ["FactorMemory", "check_factor_memory", "BUDGET_FRACTION"]

BUDGET_FRACTION = 0.9
"""Without ``memory_budget``, the estimate must fit in this fraction of the memory available at
``fit`` start (the rest is the margin for the optimizer's lazily created state and activations)."""


@dataclass(frozen=True)
class FactorMemory:
    """The memory estimate of one EK-FAC run (all in bytes).

    Attributes:
        layers: ``(name, a, o)`` per tracked layer: input side with the bias column, output side.
        itemsize: bytes per value of the sums (4 for float32, 8 for float64).
        copies: copies of the sums held during training (see the module docstring).
        online: whether ``correction="online"`` also holds eigenvectors and corrected-eigenvalue
            sums during the last epoch.
        intermediate: whether factors are also written during training (``every_n_epochs``),
            which holds the sums and the eigenvectors at once.
        training: the gradients and optimizer state training will still allocate, held beside
            every phase (``None``: not counted).
        storage: how the factors are written (:data:`~lightning_influence.ekfac.factors.STORAGE_CHOICES`):
            sets :attr:`stored`, the bytes on disk; the write converts in place, one layer at a time.
    """

    layers: tuple[tuple[str, int, int], ...]
    itemsize: int
    copies: int = 1
    online: bool = False
    intermediate: bool = False
    training: Optional[TrainingState] = None
    storage: str = "exact"

    @classmethod
    def of(cls, layers: Sequence[TrackedLayer], itemsize: int, max_epochs: Optional[int] = None, segments: int = 1,
           online: bool = False, intermediate: bool = False, training: Optional[TrainingState] = None,
           storage: str = "exact") -> "FactorMemory":
        copies = (1 if max_epochs == 1 else 2) + (1 if segments > 1 else 0)
        return cls(tuple((l.name, l.a_dim, l.d_out) for l in layers), itemsize, copies, online, intermediate, training, storage)

    def layer_bytes(self, a: int, o: int) -> int:
        return (a * a + o * o) * self.itemsize

    @property
    def sums(self) -> int:
        """One copy of every layer's sums."""
        return sum(self.layer_bytes(a, o) for _, a, o in self.layers)

    @property
    def lambdas(self) -> int:
        """The correction's sums: ``o × a`` per layer, plus the fourth powers of at most
        ``SPREAD_ENTRIES`` of its entries (the adaptive sample's error estimate)."""
        return sum((a * o + min(a * o, LambdaAccumulator.SPREAD_ENTRIES)) * self.itemsize for _, a, o in self.layers)

    @property
    def largest_layer(self) -> int:
        return max((self.layer_bytes(a, o) for _, a, o in self.layers), default=0)

    @property
    def phases(self) -> dict[str, int]:
        """Bytes held at the peak of each phase."""
        training = self.copies * self.sums
        if self.online:
            training += self.sums + self.lambdas
        if self.intermediate:
            training = max(training, self.copies * self.sums + self.sums + 2 * self.largest_layer)
        return {"training": training, "eigendecomposition": self.sums + 2 * self.largest_layer,
                "correction": self.sums + self.lambdas, "writing": self.factors + 2 * self.largest_layer}

    @property
    def factors(self) -> int:
        """The factors in memory: both eigenbases and ``Λ`` per layer (``Σ (a² + o² + a·o)``)."""
        return sum((a * a + o * o + a * o) * self.itemsize for _, a, o in self.layers)

    @property
    def stored(self) -> int:
        """The factors as written under :attr:`storage`: ``Σ (a² + o²)·bytes(Q) + a·o·bytes(Λ)``
        (:func:`~lightning_influence.ekfac.factors.stored_itemsizes`)."""
        from .factors import stored_itemsizes

        q, lam = stored_itemsizes(self.storage, self.itemsize)
        return sum((a * a + o * o) * q + a * o * lam for _, a, o in self.layers)

    @property
    def peak(self) -> int:
        """The largest phase plus :attr:`training`'s bytes."""
        return max(self.phases.values()) + (self.training.total if self.training is not None else 0)

    def biggest(self, k: int = 3) -> list[str]:
        """The ``k`` layers with the largest sums, as ``"name (a² + o²: size)"``."""
        ranked = sorted(self.layers, key=lambda t: -self.layer_bytes(t[1], t[2]))[:k]
        return [f"{n} ({a}×{a} + {o}×{o}: {format_bytes(self.layer_bytes(a, o))})" for n, a, o in ranked]

    def describe(self) -> str:
        phases = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.phases.items())
        return (f"{len(self.layers)} layers, {format_bytes(self.sums)} per copy of the covariance sums "
                f"({self.itemsize}-byte values, {self.copies} cop{'y' if self.copies == 1 else 'ies'} during training); "
                f"peak by phase: {phases}"
                + (f", beside training's {self.training.describe()}" if self.training is not None and self.training.total else "")
                + f"; largest layers: {', '.join(self.biggest())}")


def check_factor_memory(estimate: FactorMemory, device: torch.device | str, memory_budget: Optional[int] = None,
                        processes_per_device: int = 1, owner: str = "EKFACInfluence") -> Optional[int]:
    """Raise :class:`~lightning_influence.memory.InsufficientMemoryError` when ``estimate.peak``
    exceeds ``memory_budget`` (bytes) or, without one, :data:`BUDGET_FRACTION` of the memory
    available on ``device`` shared by ``processes_per_device`` processes (e.g. DDP ranks on one
    machine's CPU). Returns the budget that was applied (``None``: unknown, nothing checked)."""
    available = available_memory(device)
    if memory_budget is not None:
        budget: Optional[int] = int(memory_budget)
        source = f"memory_budget={int(memory_budget)}"
    elif available is not None:
        budget = int(BUDGET_FRACTION * available / max(1, processes_per_device))
        source = (f"{BUDGET_FRACTION:.0%} of the {format_bytes(available)} available on {torch.device(device).type}"
                  + (f", shared by {processes_per_device} processes" if processes_per_device > 1 else ""))
    else:
        return None
    if estimate.peak <= budget:
        return budget
    raise InsufficientMemoryError(
        f"{owner}: the factors (with training's gradients and optimizer state still to come) need about "
        f"{format_bytes(estimate.peak)} but the budget is {format_bytes(budget)} ({source}). "
        f"{estimate.describe()}. Turn a knob: leave the largest layers out with exclude=[...] or name fewer in layers=... "
        "(vocabulary-sized embedding/unembedding layers are left out unless named), train in float32 rather than float64, "
        "use segments=1 / fewer copies, "
        + ("run fewer processes per machine (they share its memory), " if processes_per_device > 1 else "")
        + "or pass memory_budget=<bytes> if the memory is really there."
    )
