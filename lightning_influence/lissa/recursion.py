"""The LiSSA recursion for ``(H + λI)^{-1} v``, batched over many vectors ``v``.

With scale ``s`` (it must exceed the largest eigenvalue of ``H_t + λI`` on every mini-batch),
damping ``λ``, depth ``T`` and ``R`` repeats::

    h_0 = v
    h_t = v + h_{t-1} - (H_t h_{t-1} + λ h_{t-1}) / s        t = 1..T
    estimate = mean over repeats of h_T / s

``H_t`` is the curvature of the mini-batch drawn at step ``t``. The recursion is linear in ``v``,
so all rows of a ``Tensor[K, P]`` share each step's mini-batch: one batched curvature product
per step serves them all. Stopping early, **per vector**: after each step every running row's
relative change is compared with ``tol``; a row whose change stayed below ``tol`` for
``patience`` consecutive steps stops (its iterate is kept) and leaves the batched product, so
the cost of a step falls as rows converge. The change is ``||h_t - h_{t-1}|| / ||h_t||``
(``criterion="norm"``) or, for quadratic forms such as self-influence,
``|vᵀ(h_t - h_{t-1})| / |vᵀh_t|`` (``criterion="quadratic"``): with mini-batch noise the
norm's change levels off at the noise (about ``||H_t - H|| / s``), while the quadratic form
averages it out and keeps falling, so it makes a reachable tolerance.

Divergence: when every ``H_t + λI`` has its eigenvalues in ``[0, s]`` each step is a
non-expansive map, so ``||h_t|| ≤ (t + 1) ||v||``; if moreover ``H_t`` is positive
semi-definite (``psd=True``, e.g. Gauss-Newton curvature) also ``||h_t|| ≤ (s/λ) ||v||``. A norm
above ``divergence_factor`` times that bound (or a non-finite value) raises
:class:`LiSSADivergenceError`. (An indefinite ``H`` made positive definite by damping can have a
fixed point far above ``s/λ``, so that cap is only used with ``psd=True``.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import validation as check
from ..errors import InfluenceError

__all__ = ["LiSSADivergenceError", "LiSSAResult", "lissa_recursion", "lissa_quadratic", "check_recursion_args"]


class LiSSADivergenceError(InfluenceError, RuntimeError):
    """The LiSSA recursion diverged: ``scale`` is too small for the curvature (raise ``scale``),
    or the exact Hessian has negative curvature larger than ``damping`` (raise ``damping`` or use
    ``curvature="ggn"``); or its inputs were not finite (non-finite weights, losses or
    gradients: no setting helps, ``suggested_scale`` and ``parameter`` are ``None``).

    Attributes:
        step: the step (1-based, within the repeat) at which the divergence was detected (0:
            before the first step).
        repeat: the repeat (0-based).
        scale: the scale in use.
        damping: the damping in use.
        suggested_scale: a scale that should converge, from the observed growth rate (``None``
            when the inputs were not finite).
        parameter: the name of the value to raise first (``"scale"``; ``None`` when the inputs
            were not finite).
    """

    def __init__(self, message: str, *, step: int, repeat: int, scale: float, damping: float,
                 suggested_scale: Optional[float]) -> None:
        super().__init__(message)
        self.step = step
        self.repeat = repeat
        self.scale = scale
        self.damping = damping
        self.suggested_scale = suggested_scale
        self.parameter = "scale" if suggested_scale is not None else None


NONFINITE_ADVICE = ("raising scale or damping cannot help: the training diverged or a batch held non-finite values "
                    "(lower the learning rate, clip gradients, or clean the data)")


@dataclass
class LiSSAResult:
    """Outcome of a LiSSA run.

    Attributes:
        estimate: ``Tensor[K, P]`` (or ``Tensor[P]`` for one vector), the estimate of
            ``(H + λI)^{-1} v`` in the dtype of the inputs.
        steps: steps run in each repeat (``≤ depth``; the most any vector ran).
        converged: per repeat, whether every vector stopped on ``tol``.
        rel_change: per repeat, ``Tensor[steps]``: the largest relative change (see
            ``criterion``) among the vectors still running at each step.
        vector_steps: per repeat, ``LongTensor[K]``: the steps each vector ran.
        seconds: wall time of the recursion.
        scale: the scale ``s`` used.
        negative_curvature: (:func:`lissa_quadratic` only) ``BoolTensor[K]``: whether the
            vector's iterates met net negative curvature of ``H_t + λI`` (``Σ_k h_kᵀA_{k+1}h_k < 0``
            in some repeat: its iterates grew); ``None`` from :func:`lissa_recursion`.
    """

    estimate: Tensor
    steps: list[int] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    rel_change: list[Tensor] = field(default_factory=list)
    vector_steps: list[Tensor] = field(default_factory=list)
    seconds: float = 0.0
    scale: float = 0.0
    negative_curvature: Optional[Tensor] = None

    @property
    def total_steps(self) -> int:
        """Steps run, summed over repeats."""
        return int(sum(self.steps))

    @property
    def mean_vector_steps(self) -> float:
        """Steps per vector, summed over repeats and averaged over vectors (the cost of the run
        in curvature products per vector)."""
        if not self.vector_steps:
            return 0.0
        return float(torch.stack(self.vector_steps).sum(0).double().mean())


def check_recursion_args(
    owner: str, damping: Any, scale: Any, depth: Any, repeats: Any, tol: Any
) -> None:
    """Check the recursion's numbers (``scale=None`` skips ``scale``, for ``"auto"``).

    Raises:
        InvalidArgumentError: naming ``owner``, the argument, its value and what is accepted.
    """
    check.finite_float(owner, "damping", damping, minimum=0.0)
    if scale is not None:
        check.finite_float(owner, "scale", scale, minimum=0.0, strict_minimum=True)
    check.positive_int(owner, "depth", depth)
    check.positive_int(owner, "repeats", repeats)
    check.finite_float(owner, "tol", tol, minimum=0.0, strict_minimum=True, allow_none=True)


CRITERIA = ("norm", "quadratic")


def _as_rows(vectors: Tensor, scale: float, damping: float) -> tuple[bool, Tensor]:
    """``(single, v)``: ``vectors`` as ``Tensor[K, P]`` (``single`` when given as ``Tensor[P]``),
    checked finite (``LiSSADivergenceError`` naming the rows otherwise)."""
    single = vectors.dim() == 1
    v = vectors.unsqueeze(0) if single else vectors
    if v.dim() != 2:
        raise ValueError(f"vectors must be Tensor[K, P] or Tensor[P], got shape {tuple(vectors.shape)}")
    finite_rows = torch.isfinite(v).all(dim=1)
    if not bool(finite_rows.all()):
        rows = torch.nonzero(~finite_rows).reshape(-1)
        raise LiSSADivergenceError(
            f"LiSSA: {rows.numel()} of the {v.shape[0]} vectors are not finite (rows {rows[:5].tolist()}): the gradients "
            f"they come from hold NaN or inf because the model's weights or the losses are not finite; {NONFINITE_ADVICE}",
            step=0, repeat=0, scale=scale, damping=damping, suggested_scale=None,
        )
    return single, v


def _begin(owner: str, vectors: Tensor, damping: float, scale: float, depth: int, repeats: int, tol: Optional[float],
           patience: int, criterion: Optional[str] = None) -> tuple[bool, Tensor, Tensor, float]:
    """Check a recursion's arguments and read its vectors: ``(single, v, v_norm, t0)`` with
    ``v: Tensor[K, P]`` (see :func:`_as_rows`), ``v_norm: Tensor[K]`` and the start time."""
    check_recursion_args(owner, damping, scale, depth, repeats, tol)
    if criterion is not None:
        check.choice(owner, "criterion", criterion, CRITERIA)
    check.positive_int(owner, "patience", patience)
    single, v = _as_rows(vectors, scale, damping)
    t0 = time.perf_counter()
    return single, v, v.norm(dim=1), t0


def _check_product(hv: Tensor, hr: Tensor, step: int, repeat: int, scale: float, damping: float) -> None:
    """Raise :class:`LiSSADivergenceError` when the curvature product ``hv`` of finite iterates
    ``hr`` is not finite (the model or the mini-batch is)."""
    if not bool(torch.isfinite(hv).all()) and bool(torch.isfinite(hr).all()):
        raise LiSSADivergenceError(
            f"LiSSA: the curvature product at step {step} of repeat {repeat} is not finite for finite iterates: the "
            f"model's weights or the losses of the sampled mini-batch are NaN or inf; {NONFINITE_ADVICE}",
            step=step, repeat=repeat, scale=scale, damping=damping, suggested_scale=None,
        )


def _check_growth(h_norm: Tensor, prev_norm: Tensor, bound: Tensor, step: int, repeat: int, scale: float,
                  damping: float) -> None:
    """Raise :class:`LiSSADivergenceError` (with a suggested scale) when an iterate's norm
    ``h_norm`` is not finite or above its ``bound`` (``prev_norm``: the norms one step before)."""
    bad = (~torch.isfinite(h_norm)) | (h_norm > bound)
    if bool(bad.any()):
        _raise_divergence(h_norm, prev_norm, bad, step, repeat, scale, damping)


def _still_running(rows: Tensor, calm: Tensor, rel: Tensor, tol: Optional[float], patience: int) -> Tensor:
    """The running ``rows`` after a step whose relative changes are ``rel``: ``calm`` (updated in
    place) counts each row's consecutive steps below ``tol``; a row stops at ``patience``."""
    if tol is None:
        return rows
    calm[rows] = torch.where(rel < tol, calm[rows] + 1, torch.zeros_like(calm[rows]))
    return rows[calm[rows] < patience]


def _end_repeat(result: LiSSAResult, steps: int, rows: Tensor, tol: Optional[float], rels: list[float],
                vsteps: Tensor) -> None:
    """Record one repeat in ``result`` (``rows``: those still running at its end)."""
    result.steps.append(steps)
    result.converged.append(tol is not None and rows.numel() == 0)
    result.rel_change.append(torch.tensor(rels, dtype=torch.float64))
    result.vector_steps.append(vsteps)


def _finish(result: LiSSAResult, total: Tensor, repeats: int, single: bool, t0: float) -> LiSSAResult:
    """``result`` with the estimate (``total`` averaged over repeats, one row as a vector) and
    the wall time since ``t0``."""
    est = total / repeats
    result.estimate = est.squeeze(0) if single else est
    result.seconds = time.perf_counter() - t0
    return result


def lissa_recursion(
    product: Callable[[Tensor, int], Tensor],
    vectors: Tensor,
    *,
    damping: float,
    scale: float,
    depth: int,
    repeats: int = 1,
    tol: Optional[float] = None,
    divergence_factor: float = 4.0,
    psd: bool = False,
    criterion: str = "norm",
    patience: int = 2,
) -> LiSSAResult:
    """Run the LiSSA recursion for a batch of vectors.

    Args:
        product: ``product(h, step) -> H_t h`` for ``h: Tensor[k, P]`` (the rows still running;
            ``k ≤ K``); called once per step (``step`` counts from 0 across repeats), drawing its
            own mini-batch.
        vectors: ``Tensor[K, P]`` (or ``Tensor[P]``), the right-hand sides ``v``.
        damping: ``λ ≥ 0``.
        scale: ``s > 0``; must exceed the largest eigenvalue of ``H_t + λI``.
        depth: maximum steps ``T`` per repeat.
        repeats: independent repeats ``R`` whose estimates are averaged.
        tol: stop a vector once its relative change stayed below this for ``patience``
            consecutive steps (``None``: full depth).
        divergence_factor: slack over the bound ``(t+1)·||v||`` (``min(t+1, s/λ)·||v||`` with
            ``psd``) before raising.
        psd: the curvature products are positive semi-definite (GGN): tightens the bound.
        criterion: ``"norm"`` or ``"quadratic"`` (see the module docstring).
        patience: consecutive steps below ``tol`` before a vector stops.

    Returns:
        :class:`LiSSAResult` whose ``estimate`` has the shape and dtype of ``vectors``.

    Raises:
        LiSSADivergenceError: the iterates grew beyond the bound or became non-finite.
    """
    single, v, v_norm, t0 = _begin("lissa_recursion", vectors, damping, scale, depth, repeats, tol, patience, criterion)
    k_all = v.shape[0]
    nonzero = v_norm > 0
    total = torch.zeros_like(v)
    result = LiSSAResult(estimate=total, scale=float(scale))
    global_step = 0
    cap = scale / damping if (psd and damping > 0) else math.inf
    tiny = torch.finfo(v.dtype).tiny
    for r in range(repeats):
        h = v.clone()
        rows = torch.arange(k_all, device=v.device)[nonzero]  # running rows (a zero vector's estimate is zero)
        calm = torch.zeros(k_all, dtype=torch.long, device=v.device)  # consecutive steps below tol
        vsteps = torch.zeros(k_all, dtype=torch.long)
        prev_norm = v_norm.clone()
        rels = []
        steps = 0
        for t in range(1, depth + 1):
            if rows.numel() == 0:
                break
            hr, vr = h[rows], v[rows]
            hv = product(hr, global_step)
            global_step += 1
            _check_product(hv, hr, t, r, scale, damping)
            delta = vr - (hv + damping * hr) / scale
            hr = hr + delta
            h[rows] = hr
            steps = t
            vsteps[rows.cpu()] += 1
            h_norm = hr.norm(dim=1)
            _check_growth(h_norm, prev_norm[rows], divergence_factor * min(t + 1.0, cap) * v_norm[rows], t, r, scale, damping)
            if criterion == "norm":
                rel = delta.norm(dim=1) / h_norm.clamp_min(tiny)
            else:
                rel = (vr * delta).sum(1).abs() / (vr * hr).sum(1).abs().clamp_min(tiny)
            rels.append(float(rel.max()))
            prev_norm[rows] = h_norm
            rows = _still_running(rows, calm, rel, tol, patience)
        total += h / scale
        _end_repeat(result, steps, rows, tol, rels, vsteps)
    return _finish(result, total, repeats, single, t0)


def _raise_divergence(h_norm: Tensor, prev_norm: Tensor, bad: Tensor, step: int, repeat: int, scale: float, damping: float) -> None:
    finite = torch.isfinite(h_norm) & torch.isfinite(prev_norm) & (prev_norm > 0)
    growth = torch.where(finite & bad, h_norm / prev_norm.clamp_min(1e-300), torch.zeros_like(h_norm))
    g = float(growth.max()) if growth.numel() else 0.0
    if not math.isfinite(g) or g <= 1.0:
        g = 2.0
    # For an eigenvalue μ of H + λI above 2s, |1 - μ/s| = μ/s - 1 = g per step: μ ≈ s (1 + g).
    eig = scale * (1.0 + g)
    suggested = float(f"{1.5 * eig:.3g}")
    raise LiSSADivergenceError(
        f"LiSSA diverged at step {step} of repeat {repeat}: the iterate norm grew by about x{g:.3g} per step "
        f"(largest |h_t| is {float(h_norm[torch.isfinite(h_norm)].max()) if bool(torch.isfinite(h_norm).any()) else float('inf'):.3g}). "
        f"scale={scale!r} is too small for the curvature (largest eigenvalue of H + damping*I is about {eig:.3g}); "
        f"raise `scale` to at least {suggested!r}. If the curvature is the exact Hessian of a non-convex loss, "
        f"negative curvature also makes it diverge: then raise `damping` (now {damping!r}) or use curvature='ggn'.",
        step=step,
        repeat=repeat,
        scale=scale,
        damping=damping,
        suggested_scale=suggested,
    )


def lissa_quadratic(
    product: Callable[[Tensor, int], Tensor],
    vectors: Tensor,
    *,
    damping: float,
    scale: float,
    depth: int,
    repeats: int = 1,
    tol: Optional[float] = None,
    divergence_factor: float = 4.0,
    psd: bool = False,
    patience: int = 2,
    on_step: Optional[Callable[[int], Optional[int]]] = None,
    overwrite: bool = False,
) -> LiSSAResult:
    """The quadratic forms ``vᵀ(H + λI)⁻¹v`` of a batch of vectors, each a sum of non-negative
    terms (so ``≥ 0`` whatever the curvature).

    With ``A_t = H_t + λI`` and ``B_t = I − A_t/s``, the iterates ``h_0 = v``,
    ``h_k = B_k h_{k−1}`` give::

        estimate = (1/s) Σ_{k=0}^{T−1} h_kᵀ (2I − A_{k+1}/s) h_k
                 = (1/s) Σ_{k=0}^{T−1} ( ‖h_k‖² + h_kᵀ B_{k+1} h_k )

    For one fixed ``A`` this is ``(1/s) Σ_{t=0}^{2T−1} vᵀ(I − A/s)ᵗ v``: the Neumann series of
    ``vᵀA⁻¹v`` to order ``2T − 1`` from ``T`` products (:func:`lissa_recursion` reaches order
    ``T`` with ``T``). Each term is ``≥ 0`` whenever the Rayleigh quotient of ``A_{k+1}`` at
    ``h_k`` is at most ``2s`` (the recursion's own convergence condition), so no mini-batch noise
    and no negative curvature can make the sum negative: a direction of negative curvature
    (``A``'s eigenvalue ``a < 0``) gets the weight ``Σ (1 + |a|/s)ᵗ / s``, at least that of a
    flat one, never a negative one. A term that would be negative means ``scale`` is too small
    for that mini-batch: :class:`LiSSADivergenceError` with a suggested scale.

    Under mini-batch noise the even terms ``‖h_k‖²`` estimate ``vᵀE[B_1ᵀ…B_kᵀB_k…B_1]v``, which
    exceeds ``vᵀB̄^{2k}v`` by the noise's variance: a bias upward, small where the mini-batch
    curvature's spread is small against ``s`` (the price of a sign that holds for every draw).

    Args:
        product: ``product(h, step) -> H_t h`` (see :func:`lissa_recursion`).
        vectors: ``Tensor[K, P]`` (or ``Tensor[P]``).
        damping: ``λ ≥ 0``.
        scale: ``s > 0``, above the largest eigenvalue of every ``H_t + λI``.
        depth: maximum products ``T`` per repeat.
        repeats: independent repeats whose estimates are averaged.
        tol: stop a vector once its term is below ``tol`` times its running sum for
            ``patience`` consecutive steps (``None``: full depth).
        divergence_factor: slack over ``‖h_k‖ ≤ ‖v‖`` (``(k+1)·‖v‖`` unless ``psd``) before raising.
        psd: the curvature products are positive semi-definite (GGN): tightens the bound.
        patience: consecutive steps below ``tol`` before a vector stops.
        on_step: called after each product with the number of vectors it carried (progress);
            it may return a smaller depth for the rest of the run (a time budget), else ``None``.
        overwrite: with ``repeats=1``, iterate in ``vectors``' own storage (one ``P``-vector
            per row less; ``vectors`` is overwritten).

    Returns:
        :class:`LiSSAResult` whose ``estimate`` is ``Tensor[K]`` (or a 0-d tensor for one
        vector) and whose ``negative_curvature`` flags the vectors whose iterates met net
        negative curvature (``Σ_k h_kᵀ A_{k+1} h_k < 0``).

    Raises:
        LiSSADivergenceError: an iterate grew beyond the bound, became non-finite, or a term
            was negative (``scale`` too small).
    """
    single, v, v_norm, t0 = _begin("lissa_quadratic", vectors, damping, scale, depth, repeats, tol, patience)
    k_all = v.shape[0]
    nonzero = v_norm > 0
    total = torch.zeros(k_all, dtype=v.dtype, device=v.device)
    negative = torch.zeros(k_all, dtype=torch.bool)
    result = LiSSAResult(estimate=total, scale=float(scale))
    global_step = 0
    tiny = torch.finfo(v.dtype).tiny
    limit = depth
    for r in range(repeats):
        h = v if (overwrite and repeats == 1) else v.clone()
        acc = torch.zeros(k_all, dtype=v.dtype, device=v.device)
        curv = torch.zeros(k_all, dtype=v.dtype, device=v.device)  # Σ_k h_kᵀ A_{k+1} h_k / s
        rows = torch.arange(k_all, device=v.device)[nonzero]
        calm = torch.zeros(k_all, dtype=torch.long, device=v.device)
        vsteps = torch.zeros(k_all, dtype=torch.long)
        prev_norm = v_norm.clone()
        rels = []
        steps = 0
        for t in range(1, depth + 1):
            if rows.numel() == 0 or t > limit:
                break
            whole = rows.numel() == k_all
            hr = h if whole else h[rows]
            hv = product(hr, global_step)
            global_step += 1
            if on_step is not None:
                cap = on_step(int(rows.numel()))
                if cap is not None:
                    limit = max(1, min(limit, int(cap)))
            _check_product(hv, hr, t, r, scale, damping)
            if hv.untyped_storage().data_ptr() == hr.untyped_storage().data_ptr():
                hv = hv.clone()  # a product that returned its input: do not update the iterate through it
            a_h = hv.add_(hr, alpha=damping) if damping else hv  # A_t h, in place of the product
            sq = (hr * hr).sum(1)
            quad = (hr * a_h).sum(1)  # h^T A_t h
            term = (2.0 * sq - quad / scale) / scale
            if bool((term < 0).any()):
                ray = float((quad / sq.clamp_min(tiny)).max())
                suggested = float(f"{1.5 * ray:.3g}")
                raise LiSSADivergenceError(
                    f"LiSSA: at step {t} of repeat {r} the mini-batch curvature in an iterate's direction "
                    f"(Rayleigh quotient of H + damping*I about {ray:.3g}) exceeds twice scale={scale!r}, so the series "
                    f"diverges there; raise `scale` to at least {suggested!r}",
                    step=t, repeat=r, scale=scale, damping=damping, suggested_scale=suggested,
                )
            curv[rows] += quad / scale
            acc[rows] += term
            new = hr.sub_(a_h, alpha=1.0 / scale)  # h itself, or the running rows' copy
            del hv, a_h
            if not whole:
                h[rows] = new
            steps = t
            vsteps[rows.cpu()] += 1
            h_norm = new.norm(dim=1)
            _check_growth(h_norm, prev_norm[rows], divergence_factor * (1.0 if psd else t + 1.0) * v_norm[rows], t, r, scale, damping)
            prev_norm[rows] = h_norm
            rel = term / acc[rows].clamp_min(tiny)
            rels.append(float(rel.max()))
            rows = _still_running(rows, calm, rel, tol, patience)
        total += acc
        negative |= (curv < 0).cpu()
        _end_repeat(result, steps, rows, tol, rels, vsteps)
    result.negative_curvature = negative
    return _finish(result, total, repeats, single, t0)
