"""Default damping from the spectrum: the one rule that picks ``λ`` when the user gives none.

A layer's damped inverse curvature is ``Q [ · / (Λ + λ) ] Qᵀ`` (:mod:`.factors`), with ``Λ``
(``[d_out, a_dim]``) the corrected EK-FAC eigenvalues. ``λ`` decides which directions are
trusted: where ``Λ ≫ λ`` the curvature is inverted, where ``Λ ≪ λ`` the direction is only scaled
by ``1/λ`` (a gradient dot product). The spectrum of ``Λ`` is heavy-tailed: on the tiny GPT-NeoX of
the fact-tracing benchmark a layer's mean is 20–3000× its median, because a few directions carry
almost all of the mass. The mean is therefore a poor measure of the curvature's scale.

Rules (:data:`DAMPING_RULES`; pass the name as ``damping=`` anywhere a damping is accepted):

* ``"spectrum"`` (the default, :data:`DEFAULT_DAMPING_RULE`): one ``λ`` for every layer of the
  factor set, the ``QUANTILE`` (75%) quantile of the eigenvalues of all its layers pooled,
  floored at ``FLOOR × mean`` (pooled) so that a spectrum made mostly of exact zeros is still
  damped. A quarter of all directions are inverted, the rest damped. The rule is invariant to
  the scale of the loss (``Λ → cΛ`` gives ``λ → cλ``) and, being a quantile, it is not moved by
  the few largest eigenvalues.
* ``"mean"``: ``0.1 × mean(Λ)`` of each layer separately: the default up to version 0.2
  (kronfluence's heuristic).

Candidates that react to how the model was trained (pooled, one ``λ``, scale-invariant like
``"spectrum"``). A converged model (training losses ≈ 0, or weight decay pulling the weights to
a few directions) has a spectrum whose bulk is many orders below its top: the 75% quantile then
sits in that numerical noise (λ = 2.2e-9 on a converged digits model), and directions that carry
no curvature are inverted as if they did. These rules set the floor from the *top* of the
spectrum instead of its bulk:

* ``"spectrum_floor"``: ``max(quantile(Λ, 0.75), STRONG_FLOOR × mean(Λ))`` (``STRONG_FLOOR`` =
  1%): the default rule with a floor relative to the mean eigenvalue that binds exactly when the
  bulk has collapsed below 1% of the mean;
* ``"mass"``: the noise floor of the spectrum: sorting ``Λ`` from the top, the smallest
  eigenvalue of the fewest directions that together carry ``MASS`` (99%) of ``Σ Λ``. The
  directions below it, together 1% of the curvature, are damped rather than inverted. It
  reacts to the *fraction of the spectrum above the noise floor*: few directions above it
  (converged, decayed) → a high floor; a flat spectrum → a low one;
* ``"top"``: ``max(quantile(Λ, 0.75), TOP_FLOOR × max(Λ))`` (``TOP_FLOOR`` = 1e-3): a floor
  relative to the top of the spectrum, i.e. a cap of 1000 on the condition number of
  ``Λ + λ``;
* ``"pooled_mean"``: ``0.1 × mean(Λ)`` pooled (the old rule, one ``λ`` for all layers).

Which rule is the default is decided by ``benchmarks/bench_matrix.py`` (worst margin over the
baseline on the choose half of its tasks, :mod:`lightning_influence.evaluate.selection`), see
``docs/benchmarks_matrix.md``. On its six tasks × five seeds (MLP, CNN, GPT-NeoX, BERT; SGD and
AdamW with weight decay; under-fitted and trained to ≈ 0 loss) no rule beat ``"spectrum"``'s
worst margin by more than 0.01 (all within +0.050 … +0.051 on the choose half), so it stays the
default. The collapsed spectrum is real (the BERT task trained to ≈ 0 loss gets ``λ`` = 1.7e-6 ×
the largest eigenvalue) but lifting ``λ`` there did not help (LDS 0.182 for ``"spectrum"``,
0.132 for ``"top"``, 0.146 for ``"mass"``: noise-level differences, none better). Where the
damping matters, the task decides: use :func:`lightning_influence.calibrate.calibrate` on a check
of your own.

Why pooled and not per layer: a per-layer quantile gives a layer whose gradients are small
(small ``Λ``) a small ``λ``, so its preconditioned gradient grows like ``1/λ`` and that layer
dominates the sum over layers. One ``λ`` keeps the layers' relative weights as the curvature
has them. On multi-stage fact tracing (tuning seeds 3–5, ``docs/benchmarks_fact_tracing.md``)
per-layer quantiles (25%, 50%, 75%) had mean MRR 0.65–0.69 against 0.71 for the old default and
0.79 for the pooled 75% quantile, which beat the old default on every tuning seed; single-stage
rules were within noise of each other. The benchmark reports the rule on seeds not used to
choose it.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["DAMPING_RULES", "DEFAULT_DAMPING_RULE", "QUANTILE", "FLOOR", "STRONG_FLOOR", "TOP_FLOOR", "MASS", "MEAN_FACTOR", "rule_dampings",
           "describe_rule", "quantile", "mass_floor", "PooledValues"]

QUANTILE = 0.75
"""Quantile of the pooled eigenvalues taken by the ``"spectrum"`` rule."""
FLOOR = 1e-3
"""The ``"spectrum"`` rule never goes below ``FLOOR ×`` the pooled mean of ``Λ``."""
MEAN_FACTOR = 0.1
"""The ``"mean"`` and ``"pooled_mean"`` rules' factor."""
STRONG_FLOOR = 1e-2
"""The ``"spectrum_floor"`` rule never goes below ``STRONG_FLOOR ×`` the pooled mean of ``Λ``."""
TOP_FLOOR = 1e-3
"""The ``"top"`` rule never goes below ``TOP_FLOOR ×`` the largest pooled eigenvalue."""
MASS = 0.99
"""Share of ``Σ Λ`` carried by the directions the ``"mass"`` rule inverts."""

DEFAULT_DAMPING_RULE = "spectrum"


def quantile(values: Tensor, q: float) -> float:
    """``torch.quantile(values, q)`` (linear interpolation) from two order statistics, in float64,
    with no size limit (``torch.quantile`` refuses more than 2**24 elements; a model's ``Λ`` holds
    as many numbers as its tracked weights).

    Args:
        values: any shape, at least one element.
        q: in ``[0, 1]``.
    """
    flat = values.reshape(-1).double()
    pos = q * (flat.numel() - 1)
    lo, frac = int(pos), pos - int(pos)
    v_lo = float(torch.kthvalue(flat, lo + 1).values)
    if frac == 0.0:
        return v_lo
    v_hi = float(torch.kthvalue(flat, lo + 2).values)
    return v_lo + frac * (v_hi - v_lo)


def _pool(lambdas: Mapping[str, Tensor]) -> "PooledValues":
    return PooledValues(list(lambdas.values()))


def _spectrum_rule(lambdas: Mapping[str, Tensor]) -> dict[str, float]:
    pooled = _pool(lambdas)
    lam = max(pooled.quantile(QUANTILE), FLOOR * pooled.mean())
    return {n: lam for n in lambdas}


def _mean_rule(lambdas: Mapping[str, Tensor]) -> dict[str, float]:
    return {n: MEAN_FACTOR * float(l.double().mean()) for n, l in lambdas.items()}


def _spectrum_floor_rule(lambdas: Mapping[str, Tensor]) -> dict[str, float]:
    pooled = _pool(lambdas)
    lam = max(pooled.quantile(QUANTILE), STRONG_FLOOR * pooled.mean())
    return {n: lam for n in lambdas}


def mass_floor(values: Tensor, mass: float = MASS) -> float:
    """The smallest value among the fewest largest ``values`` (``≥ 0``) whose sum reaches
    ``mass × sum(values)``: the noise floor below which the remaining ``1 − mass`` of the total
    lies. ``0`` when every value is ``0``.

    Args:
        values: any shape, at least one element, ``≥ 0`` (negatives are clamped to 0).
        mass: in ``(0, 1]``.
    """
    return PooledValues([values]).mass_floor(mass)


def _mass_rule(lambdas: Mapping[str, Tensor]) -> dict[str, float]:
    lam = _pool(lambdas).mass_floor(MASS)
    return {n: lam for n in lambdas}


def _top_rule(lambdas: Mapping[str, Tensor]) -> dict[str, float]:
    pooled = _pool(lambdas)
    lam = max(pooled.quantile(QUANTILE), TOP_FLOOR * pooled.max())
    return {n: lam for n in lambdas}


def _pooled_mean_rule(lambdas: Mapping[str, Tensor]) -> dict[str, float]:
    lam = MEAN_FACTOR * _pool(lambdas).mean()
    return {n: lam for n in lambdas}


class PooledValues:
    """The values of several tensors as one pool, clamped at 0, never concatenated.

    The pooled rules need order statistics of every tracked layer's ``Λ`` together: as many
    numbers as the tracked weights (85M on GPT-2 small). Concatenating them in float64 and sorting
    held two to three float64 copies of all of them at once. Here each statistic is exact, found
    without a copy: a random sample of :attr:`SAMPLE` values brackets it, one pass per bracket end
    checks the bracket (counting one tensor at a time), bisection over the values' bit patterns
    (non-negative floats order like their bit patterns) narrows a bracket that failed, and the
    last at most :attr:`GATHER` candidates are gathered and sorted. Pools of at most ``GATHER``
    values are simply sorted. Memory: one tensor's comparison mask and the candidates (and one
    float64 copy of tensors whose dtype is neither float32 nor float64, or of mixed dtypes).

    Args:
        parts: tensors of any shapes, at least one element in all; negatives count as ``0``.
    """

    GATHER = 1 << 20
    """Candidates gathered and sorted once a bracket holds this many (and the whole pool below it)."""
    SAMPLE = 1 << 18
    """Values sampled (with replacement, a fixed seed) to bracket a statistic."""

    def __init__(self, parts: Sequence[Tensor]) -> None:
        flat = [p.detach().reshape(-1) for p in parts]
        dtypes = {p.dtype for p in flat}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
            flat = [p.double() for p in flat]
        self.parts = [p for p in flat if p.numel()]
        self.n = sum(p.numel() for p in self.parts)
        if self.n == 0:
            raise ValueError("no values to pool")
        self.dtype = self.parts[0].dtype
        self._bits_dtype = torch.int32 if self.dtype == torch.float32 else torch.int64
        self._sorted: Optional[Tensor] = None
        self._sample: Optional[Tensor] = None

    # -- passes over the pool, one tensor at a time -----------------------------------------------
    def _value(self, bits: int) -> float:
        return float(torch.tensor([bits], dtype=self._bits_dtype).view(self.dtype))

    def _bits(self, value: float) -> int:
        return int(torch.tensor([value], dtype=self.dtype).view(self._bits_dtype))

    def _count_le(self, t: float) -> int:
        return sum(int((p <= t).sum()) for p in self.parts)

    def _sum_ge(self, t: float) -> float:
        """``Σ max(y, 0)`` over values ``y ≥ t``, in float64."""
        return sum(float(torch.where(p >= t, p, 0).clamp_min_(0).sum(dtype=torch.float64)) for p in self.parts)

    def _between(self, lo: float, hi: float, upper_closed: bool) -> Tensor:
        keep = (lambda p: (p > lo) & (p <= hi)) if upper_closed else (lambda p: (p >= lo) & (p < hi))
        return torch.cat([p[keep(p)] for p in self.parts]).double()

    def _small(self) -> Optional[Tensor]:
        """The whole pool sorted (float64, clamped), when it holds at most ``GATHER`` values."""
        if self._sorted is None and self.n <= self.GATHER:
            self._sorted = torch.sort(torch.cat([p.double() for p in self.parts]).clamp_min_(0)).values
        return self._sorted

    def _sampled(self) -> Tensor:
        """A sorted sample of ``SAMPLE`` pooled values (float64, clamped; fixed seed)."""
        if self._sample is None:
            g = torch.Generator().manual_seed(0)
            idx = torch.randint(self.n, (self.SAMPLE,), generator=g).sort().values
            offsets = torch.tensor([0] + [p.numel() for p in self.parts]).cumsum(0)
            out = []
            for i, p in enumerate(self.parts):
                mine = idx[(idx >= offsets[i]) & (idx < offsets[i + 1])] - offsets[i]
                out.append(p[mine].double())
            self._sample = torch.sort(torch.cat(out).clamp_min_(0)).values
        return self._sample

    # -- statistics --------------------------------------------------------------------------------
    def total(self) -> float:
        """``Σ max(x, 0)`` in float64."""
        return sum(float(p.double().clamp_min_(0).sum()) for p in self.parts)

    def mean(self) -> float:
        return self.total() / self.n

    def max(self) -> float:
        return max(0.0, max(float(p.max()) for p in self.parts))

    def order_statistics(self, k_lo: int, k_hi: int) -> tuple[float, float]:
        """The ``k_lo``-th and ``k_hi``-th smallest values (0-based, ``k_lo ≤ k_hi < n``), exactly."""
        small = self._small()
        if small is not None:
            return float(small[k_lo]), float(small[k_hi])
        zeros = self._count_le(0.0)
        if k_hi < zeros:
            return 0.0, 0.0
        # bracket (val(lo), val(hi)] with count_le(val(lo)) <= max(k_lo, zeros) and count_le(val(hi)) > k_hi
        s = self._sampled()
        m, margin = s.numel(), 6.0 * (self.SAMPLE * 0.25) ** 0.5 + 2
        lo_v = float(s[max(int(k_lo * m / self.n - margin), 0)])
        hi_v = float(s[min(int(k_hi * m / self.n + margin), m - 1)])
        lo, c_lo = self._bits(lo_v), self._count_le(lo_v)
        if c_lo > max(k_lo, zeros) or lo_v <= 0.0:
            lo, c_lo = self._bits(0.0), zeros
        hi, c_hi = self._bits(hi_v), self._count_le(hi_v)
        if c_hi <= k_hi:
            hi, c_hi = self._bits(self.max()), self.n
        while c_hi - c_lo > self.GATHER and hi - lo > 1:
            mid = (lo + hi) // 2
            c = self._count_le(self._value(mid))
            if c > k_hi:
                hi, c_hi = mid, c
            elif c <= k_lo:
                lo, c_lo = mid, c
            else:  # the two statistics straddle mid: take them one at a time
                return self.order_statistics(k_lo, k_lo)[0], self.order_statistics(k_hi, k_hi)[0]
        if c_hi - c_lo > self.GATHER:  # no float between the ends: every candidate equals val(hi)
            return tuple(0.0 if k < zeros else self._value(hi) for k in (k_lo, k_hi))  # type: ignore[return-value]
        vals = torch.sort(self._between(self._value(lo), self._value(hi), upper_closed=True)).values
        return tuple(0.0 if k < zeros else float(vals[k - c_lo]) for k in (k_lo, k_hi))  # type: ignore[return-value]

    def quantile(self, q: float) -> float:
        """``torch.quantile`` of the pooled values (linear interpolation between order statistics)."""
        pos = q * (self.n - 1)
        lo, frac = int(pos), pos - int(pos)
        v_lo, v_hi = self.order_statistics(lo, min(lo + 1, self.n - 1))
        return v_lo if frac == 0.0 else v_lo + frac * (v_hi - v_lo)

    def mass_floor(self, mass: float) -> float:
        """See :func:`mass_floor`: the largest value ``x`` with ``Σ_{y ≥ x} y ≥ mass · Σ y``."""
        small = self._small()
        if small is not None:
            v = small.flip(0)
            total = float(v.sum())
            return 0.0 if total == 0.0 else _first_reaching(v, 0.0, mass * total)
        target = mass * self.total()
        if target <= 0.0:
            return 0.0
        top = self.max()
        if self._sum_ge(top) >= target:
            return top
        # bracket [val(lo), val(hi)) with S(val(lo)) >= target > S(val(hi)), S(t) = Σ_{y ≥ t} y
        s = self._sampled().flip(0)
        est = torch.cumsum(s, 0) * (self.n / s.numel())
        j = int(torch.searchsorted(est, torch.tensor(target, dtype=torch.float64)))
        margin = int(6.0 * s.numel() ** 0.5) + 2
        lo_v, hi_v = float(s[min(j + margin, s.numel() - 1)]), float(s[max(j - margin, 0)])
        lo = self._bits(lo_v) if lo_v > 0 and self._sum_ge(lo_v) >= target else self._bits(0.0)
        hi = self._bits(hi_v) if self._sum_ge(hi_v) < target else self._bits(top)
        while hi - lo > 1:
            between = sum(int(((p >= self._value(lo)) & (p < self._value(hi))).sum()) for p in self.parts)
            if between <= self.GATHER:
                break
            mid = (lo + hi) // 2
            if self._sum_ge(self._value(mid)) >= target:
                lo = mid
            else:
                hi = mid
        if hi - lo <= 1:
            return self._value(lo)
        vals = torch.sort(self._between(self._value(lo), self._value(hi), upper_closed=False), descending=True).values
        return _first_reaching(vals.clamp_min(0), self._sum_ge(self._value(hi)), target)


def _first_reaching(desc: Tensor, above: float, target: float) -> float:
    """The first of ``desc`` (float64, non-negative, descending) at which ``above`` plus the running
    sum reaches ``target`` (the last value when rounding keeps it short)."""
    k = int(torch.searchsorted(torch.cumsum(desc, 0) + above, torch.tensor(target, dtype=torch.float64)))
    return float(desc[min(k, desc.numel() - 1)])


DAMPING_RULES: dict[str, Callable[[Mapping[str, Tensor]], dict[str, float]]] = {
    "spectrum": _spectrum_rule, "mean": _mean_rule, "spectrum_floor": _spectrum_floor_rule, "mass": _mass_rule,
    "top": _top_rule, "pooled_mean": _pooled_mean_rule,
}
"""Rule name → ``{layer: Λ} → {layer: λ}``."""

_DESCRIPTIONS = {
    "spectrum": f"max(quantile(Λ of all layers, {QUANTILE}), {FLOOR} × mean(Λ of all layers)), the same for every layer",
    "mean": f"{MEAN_FACTOR} × mean(Λ) per layer",
    "spectrum_floor": f"max(quantile(Λ of all layers, {QUANTILE}), {STRONG_FLOOR} × mean(Λ of all layers)), the same for every layer",
    "mass": f"the smallest of the fewest largest eigenvalues (all layers) that carry {MASS:.0%} of their sum, the same for every layer",
    "top": f"max(quantile(Λ of all layers, {QUANTILE}), {TOP_FLOOR} × max(Λ of all layers)), the same for every layer",
    "pooled_mean": f"{MEAN_FACTOR} × mean(Λ of all layers), the same for every layer",
}


def rule_dampings(lambdas: Mapping[str, Tensor], rule: str = DEFAULT_DAMPING_RULE) -> dict[str, float]:
    """The damping ``λ`` that ``rule`` picks for each layer.

    Args:
        lambdas: layer name → its corrected eigenvalues ``Λ`` (``[d_out, a_dim]``, ``≥ 0``); the
            layers that will be scored together (the ``"spectrum"`` rule pools them).
        rule: a name of :data:`DAMPING_RULES`.

    Returns:
        ``{layer: λ ≥ 0}`` (``0`` only when every eigenvalue is ``0``).

    Raises:
        ValueError: unknown rule, no layer, or a layer without eigenvalues.
    """
    if rule not in DAMPING_RULES:
        raise ValueError(f"unknown damping rule {rule!r}; expected one of {sorted(DAMPING_RULES)}")
    if not lambdas or any(l.numel() == 0 for l in lambdas.values()):
        raise ValueError("no eigenvalue to choose a damping from")
    return DAMPING_RULES[rule](lambdas)


def describe_rule(rule: str) -> str:
    """A one-line formula of ``rule`` (recorded in factor manifests)."""
    return _DESCRIPTIONS[rule]
