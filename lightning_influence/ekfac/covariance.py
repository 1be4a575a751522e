"""Running sums for the Kronecker factors and the eigenvalue correction.

All sums are kept un-normalised with their counts, so two accumulators over disjoint data add
up to one over the union (ranks, epochs, resumed runs). Sums are in float32 for float32/bf16/
fp16 inputs and in float64 for float64 inputs (``torch.promote_types(dtype, float32)``).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from ..layers import TrackedLayer

__all__ = ["CovarianceAccumulator", "LambdaAccumulator", "accumulation_dtype", "n_real_examples", "Reduce"]

Reduce = Callable[[Tensor], Tensor]
"""A sum over ranks (``lambda t: t`` on one process); every rank calls it in the same order."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def n_real_examples(x: Tensor, mask: Optional[Tensor]) -> int:
    """Examples of ``x: Tensor[B, T, d]`` with at least one real token under ``mask`` (``B`` without one)."""
    return x.shape[0] if mask is None else int(mask.any(dim=1).sum())


class CovarianceAccumulator:
    """Sums ``A = sum_t a_t a_t^T`` (``a_dim × a_dim``) and ``S = sum_t ds_t ds_t^T`` (``d_out × d_out``)
    over real (unmasked) tokens of one layer, with token and example counts.

    ``ds`` passed to :meth:`update_gradients` must already be the gradient of the **summed**
    per-example loss (the callback divides out batch-mean, accumulation and AMP scales first).
    """

    def __init__(self, a_dim: int, d_out: int) -> None:
        self.a_dim, self.d_out = a_dim, d_out
        self.a_sum: Optional[Tensor] = None
        self.s_sum: Optional[Tensor] = None
        self.a_tokens = 0
        self.s_tokens = 0
        self.examples = 0
        self._stale = {"a_sum": False, "s_sum": False}  # cleared: the next update overwrites (keeps the memory)

    @classmethod
    def for_layer(cls, layer: TrackedLayer) -> "CovarianceAccumulator":
        return cls(layer.a_dim, layer.d_out)

    @staticmethod
    def _count(x: Tensor, mask: Optional[Tensor]) -> int:
        return int(mask.sum()) if mask is not None else x.shape[0] * x.shape[1]

    def _add(self, name: str, x: Tensor, alpha: float = 1.0, mask: Optional[Tensor] = None) -> None:
        """``self.<name> += alpha · xᵀx`` over the real tokens, in place (one BLAS call; after
        :meth:`clear_` the first one overwrites instead, so clearing costs nothing).

        With a padding mask (``BoolTensor[B, T]``) only the real rows enter the product (padding
        rows are zero, so this only saves work).
        """
        current: Optional[Tensor] = getattr(self, name)
        dt = accumulation_dtype(x.dtype)
        flat = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
        if flat.dtype != dt:
            flat = flat.to(dt)
        if current is None:
            current = torch.zeros(flat.shape[1], flat.shape[1], dtype=dt, device=flat.device)
            self._stale[name] = False
        beta = 0.0 if self._stale[name] else 1.0
        self._stale[name] = False
        setattr(self, name, current.addmm_(flat.T, flat.to(current.dtype), beta=beta, alpha=alpha))

    def _sum(self, name: str) -> Optional[Tensor]:
        """The sum ``name`` (``None`` when nothing was added since creation or :meth:`clear_`)."""
        return None if self._stale[name] else getattr(self, name)

    def clear_(self) -> "CovarianceAccumulator":
        """Forget everything added, keeping the memory for the next updates (a per-batch scratch)."""
        for name in ("a_sum", "s_sum"):
            self._stale[name] = getattr(self, name) is not None
        self.a_tokens = self.s_tokens = self.examples = 0
        return self

    def is_finite(self) -> bool:
        """Whether the sums hold only finite values (one reduction per sum: NaN and inf propagate)."""
        return all(t is None or bool(torch.isfinite(t.sum())) for t in (self._sum("a_sum"), self._sum("s_sum")))

    def update_activations(self, a: Tensor, mask: Optional[Tensor] = None) -> None:
        """Add inputs ``Tensor[B, T, a_dim]`` (padding rows already zeroed)."""
        self._add("a_sum", a, mask=mask)
        self.a_tokens += self._count(a, mask)

    def update_gradients(
        self, ds: Tensor, mask: Optional[Tensor] = None, n_examples: Optional[int] = None, scale: float = 1.0
    ) -> None:
        """Add output gradients ``Tensor[B, T, d_out]`` (padding rows zeroed); ``scale`` multiplies
        ``ds`` (the outer product is scaled by ``scale²``, so ``ds`` is never copied)."""
        self._add("s_sum", ds, alpha=scale * scale, mask=mask)
        self.s_tokens += self._count(ds, mask)
        self.examples += ds.shape[0] if n_examples is None else n_examples

    def merge_(self, other: "CovarianceAccumulator") -> "CovarianceAccumulator":
        """In-place sum with ``other`` (same layer)."""
        for name in ("a_sum", "s_sum"):
            mine, theirs = self._sum(name), other._sum(name)
            if theirs is not None:
                setattr(self, name, theirs.clone() if mine is None else mine.add_(theirs.to(mine.dtype)))
                self._stale[name] = False
        self.a_tokens += other.a_tokens
        self.s_tokens += other.s_tokens
        self.examples += other.examples
        return self

    def all_reduce_(self, reduce: Reduce, dtype: torch.dtype, device: torch.device | str) -> "CovarianceAccumulator":
        """Sum sums and counts over ranks in place (ranks that saw nothing send zeros)."""
        a, s = self._sum("a_sum"), self._sum("s_sum")
        a = a if a is not None else torch.zeros(self.a_dim, self.a_dim, dtype=dtype, device=device)
        s = s if s is not None else torch.zeros(self.d_out, self.d_out, dtype=dtype, device=device)
        counts = torch.tensor([self.a_tokens, self.s_tokens, self.examples], dtype=torch.float64, device=device)
        a, s, counts = reduce(a), reduce(s), reduce(counts)
        if float(counts[0]) > 0:
            self.a_sum, self.s_sum = a, s
            self._stale = {"a_sum": False, "s_sum": False}
            self.a_tokens, self.s_tokens, self.examples = (_as_number(v) for v in counts.tolist())
        return self

    def scale_(self, factor: float) -> "CovarianceAccumulator":
        """Multiply sums and counts by ``factor`` (exponential moving averages)."""
        for name in ("a_sum", "s_sum"):
            t = self._sum(name)
            if t is not None:
                t.mul_(factor)
        self.a_tokens *= factor
        self.s_tokens *= factor
        self.examples *= factor
        return self

    def covariances(self) -> tuple[Tensor, Tensor]:
        """Token-averaged ``(A, S)`` in float64, symmetrised."""
        if self._sum("a_sum") is None or self._sum("s_sum") is None or self.a_tokens <= 0 or self.s_tokens <= 0:
            raise RuntimeError("no data was accumulated for this layer")
        a = self.a_sum.double() / self.a_tokens
        s = self.s_sum.double() / self.s_tokens
        return 0.5 * (a + a.T), 0.5 * (s + s.T)

    def state_dict(self) -> dict:
        return {
            "a_sum": self._sum("a_sum"),
            "s_sum": self._sum("s_sum"),
            "a_tokens": self.a_tokens,
            "s_tokens": self.s_tokens,
            "examples": self.examples,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.a_sum = state["a_sum"]
        self.s_sum = state["s_sum"]
        self.a_tokens = state["a_tokens"]
        self.s_tokens = state["s_tokens"]
        self.examples = state["examples"]
        self._stale = {"a_sum": False, "s_sum": False}


class LambdaAccumulator:
    """Sums ``(Q_S^T DW_b Q_A)^2`` over examples ``b`` for the eigenvalue correction.

    ``DW_b = sum_t ds_bt a_bt^T`` comes from cached inputs and output gradients (never autograd
    over parameters), in the cheaper of the two contraction orders
    (see :func:`~lightning_influence.ekfac.capture.rotated_per_example_gradients`).
    """

    def __init__(self, q_a: Tensor, q_s: Tensor) -> None:
        self.q_a, self.q_s = q_a, q_s
        self.total: Optional[Tensor] = None
        self.examples = 0
        self.nonfinite = 0

    def update(self, a: Tensor, ds: Tensor, scale: float = 1.0, n_examples: Optional[int] = None) -> None:
        """Add examples from ``a: Tensor[B, T, a_dim]`` and ``ds: Tensor[B, T, d_out]``; ``scale``
        multiplies ``ds`` (the squares by ``scale²``, so ``ds`` is never copied); ``n_examples``
        counts the real examples when masked rows are all zero (default ``B``).

        An example whose squared rotated gradient is not finite (NaN or inf inputs, gradients, or
        an overflow) is left out and counted in :attr:`nonfinite`, never added."""
        from .capture import rotated_per_example_gradients

        rot = rotated_per_example_gradients(a, ds, self.q_a, self.q_s, accumulation_dtype(a.dtype))
        squares = rot.pow_(2)
        n = a.shape[0] if n_examples is None else n_examples
        finite = torch.isfinite(squares.flatten(1).sum(1))
        if not bool(finite.all()):
            bad = int((~finite).sum())
            squares, n = squares[finite], n - bad
            self.nonfinite += bad
        contrib = squares.sum(0)
        if scale != 1.0:
            contrib.mul_(scale * scale)
        self.total = contrib if self.total is None else self.total.add_(contrib.to(self.total.dtype))
        self.examples += n

    def is_finite(self) -> bool:
        """Whether the total holds only finite values."""
        return self.total is None or bool(torch.isfinite(self.total.sum()))

    def all_reduce_(self, reduce: Reduce, dtype: torch.dtype, device: torch.device | str) -> "LambdaAccumulator":
        """Sum the total and the counts over ranks in place."""
        total = self.total if self.total is not None else torch.zeros(self.q_s.shape[0], self.q_a.shape[0], dtype=dtype, device=device)
        self.total = reduce(total)
        counts = reduce(torch.tensor([float(self.examples), float(self.nonfinite)], dtype=torch.float64, device=device))
        self.examples, self.nonfinite = (_as_number(v) for v in counts.tolist())
        return self

    def merge_(self, other: "LambdaAccumulator") -> "LambdaAccumulator":
        if other.total is not None:
            self.total = other.total.clone() if self.total is None else self.total.add_(other.total.to(self.total.dtype))
        self.examples += other.examples
        self.nonfinite += other.nonfinite
        return self

    def mean(self) -> Tensor:
        """``Tensor[d_out, a_dim]`` float64: the corrected eigenvalues (mean over examples)."""
        if self.total is None or self.examples <= 0:
            raise RuntimeError("no examples were accumulated for the eigenvalue correction")
        return self.total.double() / self.examples

    def state_dict(self) -> dict:
        return {"total": self.total, "examples": self.examples, "nonfinite": self.nonfinite, "q_a": self.q_a, "q_s": self.q_s}

    def load_state_dict(self, state: Mapping) -> None:
        self.total, self.examples = state["total"], state["examples"]
        self.nonfinite = state.get("nonfinite", 0)
        self.q_a, self.q_s = state["q_a"], state["q_s"]


def _as_number(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)
