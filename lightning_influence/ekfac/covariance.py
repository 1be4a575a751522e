"""Running sums for the Kronecker factors and the eigenvalue correction.

All sums are kept un-normalised with their counts, so two accumulators over disjoint data add
up to one over the union (ranks, epochs, resumed runs). Sums are in float32 for float32/bf16/
fp16 inputs and in float64 for float64 inputs (``torch.promote_types(dtype, float32)``).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from ..layers import TrackedLayer

__all__ = [
    "CovarianceAccumulator",
    "LambdaAccumulator",
    "accumulation_dtype",
    "n_real_examples",
    "Reduce",
    "symmetric_rank_k_update_",
    "fill_lower_blocks_",
]

Reduce = Callable[[Tensor], Tensor]
"""A sum over ranks (``lambda t: t`` on one process); every rank calls it in the same order."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def n_real_examples(x: Tensor, mask: Optional[Tensor]) -> int:
    """Examples of ``x: Tensor[B, T, d]`` with at least one real token under ``mask`` (``B`` without one)."""
    return x.shape[0] if mask is None else int(mask.any(dim=1).sum())


SYMMETRIC_MIN_DIM = 384
"""Factors at least this wide are updated block-triangle-wise (see :func:`symmetric_rank_k_update_`)."""
SYMMETRIC_BLOCKS = 8


def symmetric_blocks(dim: int) -> int:
    """Block size of :func:`symmetric_rank_k_update_` for a ``dim × dim`` factor (``dim``: one
    block, i.e. a plain product, below :data:`SYMMETRIC_MIN_DIM`)."""
    if dim < SYMMETRIC_MIN_DIM:
        return dim
    return max(128, -(-dim // SYMMETRIC_BLOCKS))


def symmetric_rank_k_update_(c: Tensor, x: Tensor, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """``c ← beta·c + alpha·xᵀx`` on the **block upper triangle** of ``c`` only (a blocked
    ``syrk``): for ``x: Tensor[N, d]`` the product is split into column blocks of
    :func:`symmetric_blocks` ``(d)`` and only the blocks on and above the diagonal are computed,
    about ``(k + 1) / 2k`` of the multiply-adds of the full product for ``k`` blocks (56 % for
    8). Blocks below the diagonal are left untouched: fill them with
    :func:`fill_lower_blocks_`. Returns ``c``."""
    d = c.shape[0]
    b = symmetric_blocks(d)
    if b >= d:
        return c.addmm_(x.T, x, beta=beta, alpha=alpha)
    for i in range(0, d, b):
        c[i : i + b, i:].addmm_(x[:, i : i + b].T, x[:, i:], beta=beta, alpha=alpha)
    return c


def fill_lower_blocks_(c: Tensor) -> Tensor:
    """Copy the block upper triangle written by :func:`symmetric_rank_k_update_` to the blocks
    below the diagonal (``O(d²)``), making ``c`` the full symmetric matrix. Returns ``c``."""
    d = c.shape[0]
    b = symmetric_blocks(d)
    for i in range(0, d - b, b):
        c[i + b :, i : i + b] = c[i : i + b, i + b :].T
    return c


class CovarianceAccumulator:
    """Sums ``A = sum_t a_t a_t^T`` (``a_dim × a_dim``) and ``S = sum_t ds_t ds_t^T`` (``d_out × d_out``)
    over real (unmasked) tokens of one layer, with token and example counts.

    ``ds`` passed to :meth:`update_gradients` must already be the gradient of the **summed**
    per-example loss (the callback divides out batch-mean, accumulation and AMP scales first).

    Updates compute only the block upper triangle of each sum (a blocked symmetric rank-k
    update, about half the multiply-adds of a full product for wide factors); the attributes
    ``a_sum`` and ``s_sum`` always return the full symmetric matrices (the lower blocks are
    filled, once, when a sum is read).
    """

    def __init__(self, a_dim: int, d_out: int) -> None:
        self.a_dim, self.d_out = a_dim, d_out
        self._sums: dict[str, Optional[Tensor]] = {"a_sum": None, "s_sum": None}
        self.a_tokens = 0
        self.s_tokens = 0
        self.examples = 0
        self._lower_stale = {"a_sum": False, "s_sum": False}  # only the block upper triangle is current
        self._eigen: dict[str, tuple[Tensor, Tensor]] = {}  # sums held as eigendecompositions (see release_)
        self._dtype_released = torch.float32

    @classmethod
    def for_layer(cls, layer: TrackedLayer) -> "CovarianceAccumulator":
        return cls(layer.a_dim, layer.d_out)

    def _full(self, name: str) -> Optional[Tensor]:
        """The stored tensor ``name`` with its lower blocks filled (``None`` before any update)."""
        if name in self._eigen:
            return self._rebuilt(name)
        t = self._sums[name]
        if t is not None and self._lower_stale[name]:
            fill_lower_blocks_(t)
            self._lower_stale[name] = False
        return t

    def _set(self, name: str, value: Optional[Tensor]) -> None:
        self._eigen.pop(name, None)
        self._sums[name] = value
        self._lower_stale[name] = False

    @property
    def a_sum(self) -> Optional[Tensor]:
        """``Tensor[a_dim, a_dim]``: the sum of input outer products (full, symmetric)."""
        return self._full("a_sum")

    @a_sum.setter
    def a_sum(self, value: Optional[Tensor]) -> None:
        self._set("a_sum", value)

    @property
    def s_sum(self) -> Optional[Tensor]:
        """``Tensor[d_out, d_out]``: the sum of output-gradient outer products (full, symmetric)."""
        return self._full("s_sum")

    @s_sum.setter
    def s_sum(self, value: Optional[Tensor]) -> None:
        self._set("s_sum", value)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the sums (float32 before any update)."""
        if self._eigen:
            return self._dtype_released
        t = self._sums["a_sum"] if self._sums["a_sum"] is not None else self._sums["s_sum"]
        return torch.float32 if t is None else t.dtype

    @staticmethod
    def _count(x: Tensor, mask: Optional[Tensor]) -> int:
        return int(mask.sum()) if mask is not None else x.shape[0] * x.shape[1]

    def _add(self, name: str, x: Tensor, alpha: float = 1.0, mask: Optional[Tensor] = None) -> None:
        """``self.<name> += alpha · xᵀx`` over the real tokens, in place (one blocked symmetric
        update).

        With a padding mask (``BoolTensor[B, T]``) only the real rows enter the product (padding
        rows are zero, so this only saves work).
        """
        if name in self._eigen:  # training goes on after a release: the sum is rebuilt first
            self._sums[name] = self._rebuilt(name)
            del self._eigen[name]
        current = self._sums[name]
        dt = accumulation_dtype(x.dtype)
        flat = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
        if flat.dtype != dt:
            flat = flat.to(dt)
        if current is None:
            current = torch.zeros(flat.shape[1], flat.shape[1], dtype=dt, device=flat.device)
        self._sums[name] = symmetric_rank_k_update_(current, flat.to(current.dtype), alpha=alpha)
        self._lower_stale[name] = True

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

    def add_batch_if_finite(self, a: Tensor, ds: Tensor, mask: Optional[Tensor] = None, n_examples: Optional[int] = None,
                            scale: float = 1.0) -> bool:
        """Add one batch's inputs and output gradients in place, **only if** both sums stay
        finite; returns whether they were added (nothing is added otherwise).

        The check needs no scratch copy of a factor: with ``x`` the rows entering a sum, every
        entry of ``c + α·xᵀx`` is bounded by ``max_j c_jj + α·max_j ‖x_:j‖²`` (Cauchy–Schwarz on
        a positive semi-definite sum), so the update is finite when the inputs are finite and
        that bound is below the dtype's largest value. Cost ``O(B·T·d)`` next to the update's
        ``O(B·T·d²)``.
        """
        alpha_s = scale * scale
        if not (self._fits("a_sum", a, 1.0, mask) and self._fits("s_sum", ds, alpha_s, mask)):
            return False
        self.update_activations(a, mask)
        self.update_gradients(ds, mask, n_examples=n_examples, scale=scale)
        return True

    def _fits(self, name: str, x: Tensor, alpha: float, mask: Optional[Tensor]) -> bool:
        """Whether ``self.<name> += alpha · xᵀx`` is certain to stay finite (see :meth:`add_batch_if_finite`)."""
        dt = accumulation_dtype(x.dtype)
        flat = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
        if flat.numel() == 0:
            return True
        # column norms² computed with a per-column rescale, so that they do not overflow before the comparison
        peak = flat.abs().amax(dim=0).to(torch.float64)
        if not bool(torch.isfinite(peak).all()):
            return False
        safe = torch.where(peak > 0, peak, torch.ones_like(peak))
        norms = ((flat.to(torch.float64) / safe).pow(2).sum(dim=0) * safe * safe).max()
        bound = float(norms) * abs(alpha)
        current = self._full(name)
        if current is not None:
            bound += float(current.diagonal().abs().max())
        return math.isfinite(bound) and bound < 0.5 * torch.finfo(dt).max

    def release_(self, eigen_a: tuple[Tensor, Tensor], eigen_s: tuple[Tensor, Tensor]) -> "CovarianceAccumulator":
        """Drop the sums' memory once their eigendecompositions exist: ``eigen_a = (eigenvalues,
        eigenvectors)`` of the token-averaged ``A``, ``eigen_s`` of ``S`` (as returned by
        :func:`~.factors.eigendecompose`, which the factors keep anyway). Reading a sum
        afterwards rebuilds it, ``Q diag(eig) Qᵀ · tokens`` (exact to the decomposition's
        precision), without keeping it; a later update rebuilds it first. So the end of a run
        never holds the covariances and their eigenvectors of every layer at once."""
        self._dtype_released = self.dtype
        self._eigen = {"a_sum": eigen_a, "s_sum": eigen_s}
        self._sums = {"a_sum": None, "s_sum": None}
        self._lower_stale = {"a_sum": False, "s_sum": False}
        return self

    @property
    def released(self) -> bool:
        """Whether the sums are held as eigendecompositions (see :meth:`release_`)."""
        return bool(self._eigen)

    def _rebuilt(self, name: str) -> Tensor:
        vals, vecs = self._eigen[name]
        tokens = self.a_tokens if name == "a_sum" else self.s_tokens
        q = vecs.to(self._dtype_released)
        return (q * vals.to(q.dtype)) @ q.T * tokens

    def merge_(self, other: "CovarianceAccumulator", take: bool = False) -> "CovarianceAccumulator":
        """In-place sum with ``other`` (same layer). ``take=True``: where this accumulator holds
        nothing yet, adopt ``other``'s tensors instead of copying them (``other`` must not be
        updated afterwards)."""
        for name in ("a_sum", "s_sum"):
            mine, theirs = self._full(name), other._full(name)
            if theirs is not None:
                if mine is None:
                    self._set(name, theirs if take else theirs.clone())
                else:
                    self._set(name, mine.add_(theirs.to(mine.dtype)))
        self.a_tokens += other.a_tokens
        self.s_tokens += other.s_tokens
        self.examples += other.examples
        return self

    def all_reduce_(self, reduce: Reduce, dtype: torch.dtype, device: torch.device | str) -> "CovarianceAccumulator":
        """Sum sums and counts over ranks in place (ranks that saw nothing send zeros)."""
        a, s = self._full("a_sum"), self._full("s_sum")
        a = a if a is not None else torch.zeros(self.a_dim, self.a_dim, dtype=dtype, device=device)
        s = s if s is not None else torch.zeros(self.d_out, self.d_out, dtype=dtype, device=device)
        counts = torch.tensor([self.a_tokens, self.s_tokens, self.examples], dtype=torch.float64, device=device)
        a, s, counts = reduce(a), reduce(s), reduce(counts)
        if float(counts[0]) > 0:
            self.a_sum, self.s_sum = a, s
            self.a_tokens, self.s_tokens, self.examples = (_as_number(v) for v in counts.tolist())
        return self

    def scale_(self, factor: float) -> "CovarianceAccumulator":
        """Multiply sums and counts by ``factor`` (exponential moving averages)."""
        for name in ("a_sum", "s_sum"):
            t = self._full(name)
            if t is not None:
                t.mul_(factor)
        self.a_tokens *= factor
        self.s_tokens *= factor
        self.examples *= factor
        return self

    def covariances(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """Token-averaged ``(A, S)`` in ``dtype`` (float64 by default), symmetrised."""
        a_sum, s_sum = self._full("a_sum"), self._full("s_sum")
        if a_sum is None or s_sum is None or self.a_tokens <= 0 or self.s_tokens <= 0:
            raise RuntimeError("no data was accumulated for this layer")
        return _averaged(a_sum, self.a_tokens, dtype), _averaged(s_sum, self.s_tokens, dtype)

    def state_dict(self) -> dict:
        return {
            "a_sum": self._full("a_sum"),
            "s_sum": self._full("s_sum"),
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


class LambdaAccumulator:
    """Sums ``(Q_S^T DW_b Q_A)^2`` over examples ``b`` for the eigenvalue correction.

    ``DW_b = sum_t ds_bt a_bt^T`` comes from cached inputs and output gradients (never autograd
    over parameters), in the cheaper of the two contraction orders, without keeping every
    example's matrix at once (see :func:`~lightning_influence.ekfac.capture.rotated_square_sums`).

    Args:
        q_a: ``Tensor[a_dim, a_dim]`` eigenvectors of ``A`` (columns).
        q_s: ``Tensor[d_out, d_out]`` eigenvectors of ``S``.
        spread: also sum the fourth powers, so that :meth:`relative_error` can estimate how
            precisely the mean is known (an adaptive correction sample stops on it). For a
            layer of more than :attr:`SPREAD_ENTRIES` entries, only those of a fixed random
            subset of that many (seed 0) are kept: the estimate is a weighted average over
            entries, which the subset estimates within a fraction of a percent, and the sums of
            fourth powers of every entry would cost as much memory again as ``Λ``.
    """

    SPREAD_ENTRIES = 1 << 16
    """The most entries whose fourth powers :meth:`relative_error` reads (see ``spread``)."""

    def __init__(self, q_a: Tensor, q_s: Tensor, spread: bool = False) -> None:
        self.q_a, self.q_s = q_a, q_s
        self.total: Optional[Tensor] = None
        self.total4: Optional[Tensor] = None
        self.spread = spread
        entries = q_s.shape[0] * q_a.shape[0]
        self.spread_index: Optional[Tensor] = None  # LongTensor[SPREAD_ENTRIES] into the flattened Λ, or all
        if spread and entries > self.SPREAD_ENTRIES:
            g = torch.Generator().manual_seed(0)
            self.spread_index = torch.randperm(entries, generator=g)[: self.SPREAD_ENTRIES].sort().values.to(q_a.device)
        self.examples = 0
        self.nonfinite = 0

    def update(self, a: Tensor, ds: Tensor, scale: float = 1.0, n_examples: Optional[int] = None) -> None:
        """Add examples from ``a: Tensor[B, T, a_dim]`` and ``ds: Tensor[B, T, d_out]``; ``scale``
        multiplies ``ds`` (the squares by ``scale²``, so ``ds`` is never copied); ``n_examples``
        counts the real examples when masked rows are all zero (default ``B``).

        An example whose squared rotated gradient is not finite (NaN or inf inputs, gradients, or
        an overflow) is left out and counted in :attr:`nonfinite`, never added."""
        from .capture import rotated_square_sums

        dtype = accumulation_dtype(a.dtype)
        n = a.shape[0] if n_examples is None else n_examples
        sum2, sum4 = rotated_square_sums(a, ds, self.q_a, self.q_s, dtype, fourth=self.spread)
        if not bool(torch.isfinite(sum2.sum())):
            sum2, sum4, n = self._finite_examples(a, ds, dtype, n)
        if sum4 is not None and self.spread_index is not None:
            sum4 = sum4.reshape(-1)[self.spread_index]
        if scale != 1.0:
            sum2.mul_(scale * scale)
            if sum4 is not None:
                sum4.mul_(scale**4)
        self.total = sum2 if self.total is None else self.total.add_(sum2.to(self.total.dtype))
        if sum4 is not None:
            self.total4 = sum4 if self.total4 is None else self.total4.add_(sum4.to(self.total4.dtype))
        self.examples += n

    def _finite_examples(self, a: Tensor, ds: Tensor, dtype: torch.dtype, n: int) -> tuple[Tensor, Optional[Tensor], int]:
        """The slow path for a batch whose sum is not finite: every example's squares, the
        non-finite ones left out and counted."""
        from .capture import rotated_per_example_gradients

        squares = rotated_per_example_gradients(a, ds, self.q_a, self.q_s, dtype).pow_(2)
        finite = torch.isfinite(squares.flatten(1).sum(1))
        bad = int((~finite).sum())
        self.nonfinite += bad
        squares = squares[finite]
        return squares.sum(0), ((squares * squares).sum(0) if self.spread else None), n - bad

    def relative_error(self, damping_factor: Optional[float] = None) -> float:
        """Estimated relative standard error of the damped corrected eigenvalues ``Λ + λ``.

        For each entry, the standard error of the mean ``Λ_ij`` (from the sums of squares and of
        fourth powers) divided by ``Λ_ij + λ``, with ``λ = damping_factor · mean(Λ)`` (default:
        the factors' default damping); averaged over entries with weights ``Λ_ij / (Λ_ij + λ)``,
        the share of a typical gradient's preconditioned norm an entry carries. ``inf`` before
        two examples, without ``spread``, or when a sum overflowed.
        """
        from .factors import DEFAULT_DAMPING_FACTOR

        if self.total is None or self.total4 is None or self.examples < 2:
            return math.inf
        n = float(self.examples)
        mean = self.total.double() / n
        lam = (DEFAULT_DAMPING_FACTOR if damping_factor is None else damping_factor) * float(mean.mean())
        if self.spread_index is not None:
            mean = mean.reshape(-1)[self.spread_index]
        var = (self.total4.double() / n - mean * mean).clamp_min_(0) * (n / (n - 1))
        damped = mean + lam
        if lam <= 0 or not bool(torch.isfinite(var.sum())):
            return math.inf
        weight = mean / damped
        error = (var / n).sqrt_() / damped
        return float((weight * error).sum() / weight.sum().clamp_min(1e-300))

    def is_finite(self) -> bool:
        """Whether the total holds only finite values."""
        return self.total is None or bool(torch.isfinite(self.total.sum()))

    def all_reduce_(self, reduce: Reduce, dtype: torch.dtype, device: torch.device | str) -> "LambdaAccumulator":
        """Sum the total and the counts over ranks in place (the fourth powers stay local)."""
        total = self.total if self.total is not None else torch.zeros(self.q_s.shape[0], self.q_a.shape[0], dtype=dtype, device=device)
        self.total = reduce(total)
        counts = reduce(torch.tensor([float(self.examples), float(self.nonfinite)], dtype=torch.float64, device=device))
        self.examples, self.nonfinite = (_as_number(v) for v in counts.tolist())
        self.total4 = None
        return self

    def merge_(self, other: "LambdaAccumulator") -> "LambdaAccumulator":
        if other.total is not None:
            self.total = other.total.clone() if self.total is None else self.total.add_(other.total.to(self.total.dtype))
        if other.total4 is not None:
            self.total4 = other.total4.clone() if self.total4 is None else self.total4.add_(other.total4.to(self.total4.dtype))
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


def _averaged(total: Tensor, count: float, dtype: torch.dtype) -> Tensor:
    """``(total + totalᵀ) / (2·count)`` in ``dtype``, with one temporary of the factor's size."""
    out = total.to(dtype, copy=True)
    out.add_(total.T.to(dtype)).mul_(0.5 / count)
    return out


def _as_number(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)
