"""How many vectors and examples a LiSSA run carries at once, chosen from a memory budget.

LiSSA's memory is that of the vectors it carries, times the parameter count ``P``, plus what one
curvature product holds: the forward/backward graph of the examples it differentiates, and per
vector it maps over, tangents of their saved activations. :func:`plan_memory` turns these into
three numbers:

* ``chunk_size``: probe vectors in one batched recursion; each holds :data:`RESIDENT_COPIES`
  ``P``-vectors (the gradient, the iterate, the product and one scratch copy);
* ``examples_per_product``: mini-batch examples differentiated in one pass. A product over a
  larger mini-batch is the weighted sum of products over its parts (the curvature of a mean is
  the mean of the curvatures), so this changes memory, not the result. The graph of ``m``
  examples costs :data:`GRAPH_ACTIVATION_FACTOR` times their saved activations;
* ``vectors_per_product``: vectors mapped over (``torch.func.vmap``) at once inside one
  product; each costs :data:`PRODUCT_ACTIVATION_FACTOR` times the saved activations of the
  examples in the pass plus :data:`PRODUCT_PARAM_COPIES` ``P``-vectors.

The budget is ``LiSSAOptions(memory_budget=...)`` bytes, default :data:`DEFAULT_BUDGET_FRACTION`
of the memory available when the run starts
(:func:`lightning_influence.memory.available_memory`: RAM as the kernel reports it,
``MemAvailable``, bounded by the cgroup limit, on CPU; ``torch.cuda.mem_get_info`` plus the
allocator's cached free blocks on CUDA). The whole chunk is kept when it fits with full mini-batches; otherwise the
chunk gets at most half of the budget and the mini-batch is split into the largest parts that
fit the rest. When not even one vector and one example fit, :class:`LiSSAMemoryError` is raised
with the numbers and the knobs, before any product runs; an out-of-memory error inside a
product is re-raised as :class:`LiSSAMemoryError` too, never retried in a slower loop. No
Lightning import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from ..memory import InsufficientMemoryError, available_memory, format_bytes

__all__ = [
    "LiSSAMemoryError",
    "MemoryPlan",
    "available_memory",
    "plan_memory",
    "is_out_of_memory",
    "RESIDENT_COPIES",
    "PRODUCT_ACTIVATION_FACTOR",
    "PRODUCT_PARAM_COPIES",
    "DEFAULT_BUDGET_FRACTION",
]

RESIDENT_COPIES = 4
"""``P``-vectors held per probe vector during a self-influence recursion (gradient, iterate,
product, scratch); 3 with one repeat (the iterate starts in the gradient's storage)."""
INVERSE_HVP_COPIES = 8
"""``P``-vectors held per vector by :func:`~lightning_influence.lissa.lissa_inverse_hvp`'s recursion
(right-hand side, running sum, iterate, their running rows, product, update)."""
PRODUCT_ACTIVATION_FACTOR = 4.0
"""Bytes one vector adds to a curvature product, in units of the mini-batch's saved
activations (resident-memory peaks measured on CPU, beyond ``3P``: 1.3–1.8 for a 2-layer
GPT-2 and 1.5–3.8 for a tanh MLP, Hessian and GGN; rounded up)."""
PRODUCT_PARAM_COPIES = 3
"""``P``-vectors one vector adds to a curvature product (its tangent, the result, the gradient's)."""
GRAPH_ACTIVATION_FACTOR = 8.0
"""The forward/backward graph of one mini-batch, held once per product, in saved activations
(measured as above: 2.7–7.2; rounded up)."""
DEFAULT_BUDGET_FRACTION = 0.6
"""``memory_budget=None``: this fraction of the memory available when the run starts."""


class LiSSAMemoryError(InsufficientMemoryError):
    """LiSSA cannot fit in its memory budget, or a curvature product ran out of memory (an
    :class:`~lightning_influence.memory.InsufficientMemoryError`, so a ``MemoryError``).

    The message gives the numbers (parameters selected, bytes per vector, the budget and what
    was available) and the knobs: ``LiSSAOptions(params=...)`` (fewer parameters),
    ``sample_size`` (smaller mini-batches, fewer activations), ``chunk_size`` and
    ``memory_budget``.

    Attributes:
        plan: the :class:`MemoryPlan` in force (``None`` when the error came before planning).
    """

    def __init__(self, message: str, plan: Optional["MemoryPlan"] = None) -> None:
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`plan_memory` chose, and from which numbers (all sizes in bytes).

    Attributes:
        device: where the run computes.
        available: memory available when the plan was made (``None``: unknown).
        budget: what LiSSA may use.
        num_params: ``P``.
        param_bytes: ``P ×`` the parameters' item size.
        activation_bytes: tensors one forward pass over a whole mini-batch saves for backward.
        sample_size: examples in that mini-batch.
        graph_bytes: held once per pass (the graph of ``examples_per_product`` examples).
        bytes_per_vector: held per probe vector in a recursion.
        bytes_per_product_vector: added per vector mapped over in one pass.
        chunk_size: probe vectors per recursion.
        examples_per_product: mini-batch examples per pass.
        vectors_per_product: vectors mapped over at once in one pass.
    """

    device: str
    available: Optional[int]
    budget: int
    num_params: int
    param_bytes: int
    activation_bytes: int
    sample_size: int
    graph_bytes: int
    bytes_per_vector: int
    bytes_per_product_vector: int
    chunk_size: int
    examples_per_product: int
    vectors_per_product: int

    @property
    def estimated_peak(self) -> int:
        """Bytes the plan expects at its peak: graph, carried vectors and mapped products."""
        return (self.graph_bytes + self.chunk_size * self.bytes_per_vector
                + self.vectors_per_product * self.bytes_per_product_vector)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable, for results' meta."""
        return {**asdict(self), "estimated_peak": self.estimated_peak}

    def describe(self) -> str:
        """One line with the numbers, for messages."""
        avail = "unknown" if self.available is None else format_bytes(self.available)
        return (f"P={self.num_params:,} selected parameters ({format_bytes(self.param_bytes)} per vector), activations "
                f"{format_bytes(self.activation_bytes)} for a mini-batch of {self.sample_size}; {format_bytes(self.bytes_per_vector)} per "
                f"carried vector; budget {format_bytes(self.budget)} of {avail} available on {self.device}")


KNOBS = ("pass LiSSAOptions(params=...) to select fewer parameters (e.g. 'last_layer' or the last blocks), a smaller "
         "sample_size (fewer activations per product), a smaller chunk_size, or a larger memory_budget (bytes) if the "
         "memory is there")


def plan_memory(
    *,
    num_params: int,
    itemsize: int,
    activation_bytes: int,
    chunk_size: int,
    device: torch.device | str,
    sample_size: int = 1,
    memory_budget: Optional[int] = None,
    available: Optional[int] = None,
    owner: str = "LiSSAOptions",
    resident_copies: int = RESIDENT_COPIES,
) -> MemoryPlan:
    """Choose ``chunk_size``, ``examples_per_product`` and ``vectors_per_product`` so that the
    run fits the budget (see the module docstring for the rule).

    Args:
        num_params: ``P``.
        itemsize: bytes per parameter value.
        activation_bytes: what one forward pass over a LiSSA mini-batch of ``sample_size``
            examples saves for backward (see
            :meth:`~lightning_influence.lissa.CurvatureOperator.activation_bytes`).
        chunk_size: the most probe vectors per recursion (``LiSSAOptions.chunk_size``).
        device: where the run computes.
        sample_size: examples in that mini-batch.
        memory_budget: bytes LiSSA may use; ``None``: :data:`DEFAULT_BUDGET_FRACTION` of
            ``available``, and no limit when that is unknown.
        available: bytes available (default: :func:`available_memory` of ``device``).
        owner: who asks, for messages.
        resident_copies: ``P``-vectors held per carried vector (:data:`RESIDENT_COPIES`).

    Returns:
        :class:`MemoryPlan` with ``1 ≤ chunk_size ≤`` the one asked for,
        ``1 ≤ examples_per_product ≤ sample_size`` and ``1 ≤ vectors_per_product ≤ chunk_size``.

    Raises:
        LiSSAMemoryError: not even one vector and one example fit (the message has the numbers
            and the knobs).
    """
    device = torch.device(device)
    if available is None:
        available = available_memory(device)
    sample_size = max(1, int(sample_size))
    param_bytes = int(num_params) * int(itemsize)
    per_vector = int(resident_copies) * param_bytes
    per_example = activation_bytes / sample_size

    def graph(m: int) -> int:
        return int(GRAPH_ACTIVATION_FACTOR * per_example * m) + param_bytes

    def per_product(m: int) -> int:
        return int(PRODUCT_ACTIVATION_FACTOR * per_example * m) + PRODUCT_PARAM_COPIES * param_bytes

    if memory_budget is not None:
        budget = int(memory_budget)
    elif available is not None:
        budget = int(DEFAULT_BUDGET_FRACTION * available)
    else:  # nothing known: no limit
        budget = graph(sample_size) + chunk_size * (per_vector + per_product(sample_size))

    def make(chunk: int, m: int, vpp: int) -> MemoryPlan:
        return MemoryPlan(str(device), available, budget, int(num_params), param_bytes, int(activation_bytes), sample_size,
                          graph(m), per_vector, per_product(m), int(chunk), int(m), int(vpp))

    smallest = graph(1) + per_product(1)
    if budget - smallest < per_vector:
        plan = make(0, 1, 0)
        raise LiSSAMemoryError(
            f"{owner}: LiSSA needs about {format_bytes(smallest + per_vector)} for a single vector and a single example but its "
            f"memory budget is {format_bytes(budget)} ({plan.describe()}); {KNOBS}", plan)
    whole = graph(sample_size) + per_product(sample_size)
    if budget - whole >= chunk_size * per_vector:
        chunk = chunk_size  # everything fits with whole mini-batches
    else:
        chunk = int(max(1, min(chunk_size, (budget // 2) // per_vector, (budget - smallest) // per_vector)))
    room = budget - chunk * per_vector
    m = sample_size  # the largest part of the mini-batch whose graph and one product fit the room
    if graph(m) + per_product(m) > room:
        per_m = (GRAPH_ACTIVATION_FACTOR + PRODUCT_ACTIVATION_FACTOR) * per_example
        m = int(max(1, min(sample_size, (room - graph(0) - per_product(0)) // max(per_m, 1e-9))))
    vpp = int(max(1, min(chunk, (room - graph(m)) // max(1, per_product(m)))))
    return make(chunk, m, vpp)


_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA ``OutOfMemoryError``, the CPU
    allocator's ``RuntimeError``, ``MemoryError``), also when wrapped by ``vmap``."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
            return True
        text = str(error).lower()
        if isinstance(error, RuntimeError) and any(m in text for m in _OOM_MARKERS):
            return True
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
        seen += 1
    return False
