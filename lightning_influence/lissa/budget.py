"""How many vectors a LiSSA run carries at once, chosen from a memory budget.

LiSSA's memory is that of the vectors it carries, times the parameter count ``P``, plus what one
curvature product holds per vector it maps over (tangents of the saved activations of the
mini-batch's forward pass). :func:`plan_memory` turns both into two numbers:

* ``chunk_size``: probe vectors in one batched recursion; each holds :data:`RESIDENT_COPIES`
  ``P``-vectors (the gradient, the iterate, the product and one scratch copy);
* ``vectors_per_product``: vectors mapped over (``torch.func.vmap``) at once inside one
  curvature product; each costs :data:`PRODUCT_ACTIVATION_FACTOR` times the mini-batch's saved
  activations plus :data:`PRODUCT_PARAM_COPIES` ``P``-vectors. The mini-batch's forward and
  backward graph (twice its saved activations) is held once, whatever the number of vectors.

against a budget (``LiSSAOptions(memory_budget=...)`` bytes, default
:data:`DEFAULT_BUDGET_FRACTION` of the memory available when the run starts: RAM as the
kernel reports it, bounded by the cgroup limit, on CPU; ``torch.cuda.mem_get_info`` plus the
allocator's cached free blocks on CUDA). When not even one vector fits it raises
:class:`LiSSAMemoryError` with the numbers and the knobs, before any product runs; an
out-of-memory error inside a product is re-raised as :class:`LiSSAMemoryError` too, never
retried in a slower loop. No Lightning import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

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
"""``P``-vectors held per probe vector during a recursion (gradient, iterate, product, scratch)."""
PRODUCT_ACTIVATION_FACTOR = 3.0
"""Bytes one vector adds to a curvature product, in units of the mini-batch's saved
activations (measured on GPT-2 and MLP configurations: 1.6–2.6; rounded up)."""
PRODUCT_PARAM_COPIES = 3
"""``P``-vectors one vector adds to a curvature product (its tangent, the result, the gradient's)."""
GRAPH_ACTIVATION_FACTOR = 2.0
"""The forward/backward graph of one mini-batch, held once per product, in saved activations."""
DEFAULT_BUDGET_FRACTION = 0.6
"""``memory_budget=None``: this fraction of the memory available when the run starts."""


class LiSSAMemoryError(MemoryError):
    """LiSSA cannot fit in its memory budget, or a curvature product ran out of memory.

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
        activation_bytes: tensors one forward pass over a mini-batch saves for backward.
        graph_bytes: held once per product (the mini-batch's graph).
        bytes_per_vector: held per probe vector in a recursion.
        bytes_per_product_vector: added per vector mapped over in one product.
        chunk_size: probe vectors per recursion.
        vectors_per_product: vectors mapped over at once in one product.
    """

    device: str
    available: Optional[int]
    budget: int
    num_params: int
    param_bytes: int
    activation_bytes: int
    graph_bytes: int
    bytes_per_vector: int
    bytes_per_product_vector: int
    chunk_size: int
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
        avail = "unknown" if self.available is None else _gib(self.available)
        return (f"P={self.num_params:,} selected parameters ({_gib(self.param_bytes)} per vector), mini-batch activations "
                f"{_gib(self.activation_bytes)}; {_gib(self.bytes_per_vector)} per carried vector, "
                f"{_gib(self.bytes_per_product_vector)} per vector in a curvature product, {_gib(self.graph_bytes)} for the "
                f"mini-batch's graph; budget {_gib(self.budget)} of {avail} available on {self.device}")


KNOBS = ("pass LiSSAOptions(params=...) to select fewer parameters (e.g. 'last_layer' or the last blocks), a smaller "
         "sample_size (fewer activations per product), a smaller chunk_size, or a larger memory_budget (bytes) if the "
         "memory is there")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _cgroup_free() -> Optional[int]:
    """Bytes left under this process's cgroup (v2 or v1) memory limit, ``None`` when unlimited or unknown."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f:
                raw = f.read().strip()
            if raw == "max":
                return None
            limit = int(raw)
            if limit >= 2**60:  # v1's "unlimited"
                return None
            with open(usage_path) as f:
                usage = int(f.read().strip())
            return max(0, limit - usage)
        except (OSError, ValueError):
            continue
    return None


def _meminfo_available() -> Optional[int]:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (``None`` where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: torch.device | str) -> Optional[int]:
    """Bytes available for new tensors on ``device`` now: on CUDA the driver's free memory plus
    the blocks PyTorch's allocator holds unused; on CPU the kernel's ``MemAvailable`` bounded by
    the cgroup limit. ``None`` where neither can be read (then no budget is enforced unless
    ``memory_budget`` is given)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    if device.type != "cpu":
        return None
    found = [v for v in (_meminfo_available(), _cgroup_free()) if v is not None]
    return min(found) if found else None


def plan_memory(
    *,
    num_params: int,
    itemsize: int,
    activation_bytes: int,
    chunk_size: int,
    device: torch.device | str,
    memory_budget: Optional[int] = None,
    available: Optional[int] = None,
    owner: str = "LiSSAOptions",
) -> MemoryPlan:
    """Choose ``chunk_size`` and ``vectors_per_product`` so that the run fits the budget.

    Args:
        num_params: ``P``.
        itemsize: bytes per parameter value.
        activation_bytes: what one forward pass over a LiSSA mini-batch saves for backward
            (see :meth:`~lightning_influence.lissa.CurvatureOperator.activation_bytes`).
        chunk_size: the most probe vectors per recursion (``LiSSAOptions.chunk_size``).
        device: where the run computes.
        memory_budget: bytes LiSSA may use; ``None``: :data:`DEFAULT_BUDGET_FRACTION` of
            ``available``, and no limit when that is unknown.
        available: bytes available (default: :func:`available_memory` of ``device``).
        owner: who asks, for messages.

    Returns:
        :class:`MemoryPlan` with ``chunk_size ≤`` the one asked for and
        ``1 ≤ vectors_per_product ≤ chunk_size``.

    Raises:
        LiSSAMemoryError: not even one vector fits (the message has the numbers and the knobs).
    """
    device = torch.device(device)
    if available is None:
        available = available_memory(device)
    param_bytes = int(num_params) * int(itemsize)
    per_vector = RESIDENT_COPIES * param_bytes
    per_product = int(PRODUCT_ACTIVATION_FACTOR * activation_bytes) + PRODUCT_PARAM_COPIES * param_bytes
    graph = int(GRAPH_ACTIVATION_FACTOR * activation_bytes) + param_bytes
    if memory_budget is not None:
        budget = int(memory_budget)
    elif available is not None:
        budget = int(DEFAULT_BUDGET_FRACTION * available)
    else:
        budget = graph + chunk_size * (per_vector + per_product)
    room = budget - graph - per_product
    chunk = min(chunk_size, room // per_vector) if per_vector > 0 else chunk_size
    plan = MemoryPlan(str(device), available, budget, int(num_params), param_bytes, int(activation_bytes), graph, per_vector,
                      per_product, max(0, int(chunk)), 0)
    if chunk < 1:
        need = graph + per_vector + per_product
        raise LiSSAMemoryError(
            f"{owner}: LiSSA needs about {_gib(need)} for a single vector but its memory budget is {_gib(budget)} "
            f"({plan.describe()}); {KNOBS}", plan)
    vpp = (budget - graph - chunk * per_vector) // per_product if per_product > 0 else chunk
    vpp = int(max(1, min(chunk, vpp)))
    return MemoryPlan(str(device), available, budget, int(num_params), param_bytes, int(activation_bytes), graph, per_vector,
                      per_product, int(chunk), vpp)


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
