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

from typing import Callable, Mapping

import torch
from torch import Tensor

__all__ = ["DAMPING_RULES", "DEFAULT_DAMPING_RULE", "QUANTILE", "FLOOR", "STRONG_FLOOR", "TOP_FLOOR", "MASS", "MEAN_FACTOR", "rule_dampings",
           "describe_rule", "quantile", "mass_floor"]

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


def _spectrum_rule(lambdas: Mapping[str, Tensor]) -> dict[str, float]:
    pooled = torch.cat([l.reshape(-1).double() for l in lambdas.values()]).clamp_min(0)
    lam = max(quantile(pooled, QUANTILE), FLOOR * float(pooled.mean()))
    return {n: lam for n in lambdas}


def _mean_rule(lambdas: Mapping[str, Tensor]) -> dict[str, float]:
    return {n: MEAN_FACTOR * float(l.double().mean()) for n, l in lambdas.items()}


def _pooled(lambdas: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([l.reshape(-1).double() for l in lambdas.values()]).clamp_min(0)


def _spectrum_floor_rule(lambdas: Mapping[str, Tensor]) -> dict[str, float]:
    pooled = _pooled(lambdas)
    lam = max(quantile(pooled, QUANTILE), STRONG_FLOOR * float(pooled.mean()))
    return {n: lam for n in lambdas}


def mass_floor(values: Tensor, mass: float = MASS) -> float:
    """The smallest value among the fewest largest ``values`` (``≥ 0``) whose sum reaches
    ``mass × sum(values)``: the noise floor below which the remaining ``1 − mass`` of the total
    lies. ``0`` when every value is ``0``.

    Args:
        values: any shape, at least one element, ``≥ 0`` (negatives are clamped to 0).
        mass: in ``(0, 1]``.
    """
    v = torch.sort(values.reshape(-1).double().clamp_min(0), descending=True).values
    total = float(v.sum())
    if total == 0.0:
        return 0.0
    cum = torch.cumsum(v, 0)
    k = int(torch.searchsorted(cum, torch.tensor(mass * total, dtype=torch.float64)))  # first index with cum >= mass · total
    return float(v[min(k, v.numel() - 1)])


def _mass_rule(lambdas: Mapping[str, Tensor]) -> dict[str, float]:
    lam = mass_floor(_pooled(lambdas), MASS)
    return {n: lam for n in lambdas}


def _top_rule(lambdas: Mapping[str, Tensor]) -> dict[str, float]:
    pooled = _pooled(lambdas)
    lam = max(quantile(pooled, QUANTILE), TOP_FLOOR * float(pooled.max()))
    return {n: lam for n in lambdas}


def _pooled_mean_rule(lambdas: Mapping[str, Tensor]) -> dict[str, float]:
    lam = MEAN_FACTOR * float(_pooled(lambdas).mean())
    return {n: lam for n in lambdas}


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
