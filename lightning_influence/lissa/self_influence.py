"""Inverse-curvature-vector products and self-influence with sampled LiSSA.

Self-influence of an example ``z`` is ``∇ℓ(z)ᵀ (H + λI)^{-1} ∇ℓ(z)`` where ``ℓ(z)`` is the
example's per-example loss (summed over tokens), ``∇`` is taken with respect to the selected
parameter subset, and ``H`` is the Hessian (or GGN) of the **mean** per-example loss over the
mini-batch drawn at each LiSSA step. Scores are ``≥ 0`` for every curvature: each is a sum of
non-negative terms (:func:`~lightning_influence.lissa.recursion.lissa_quadratic`); they are in
units of loss², and are **not** normalised by the dataset size.

Every entry point takes one :class:`~lightning_influence.lissa.LiSSAOptions`.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .. import validation as check
from ..batches import leading_size, move_to_device
from ..progress import progress_enabled
from ..scores import InfluenceScores
from ..task import TaskLike, resolve_task
from .budget import INVERSE_HVP_COPIES, RESIDENT_COPIES, MemoryPlan, plan_memory
from .curvature import CurvatureOperator, slice_batch
from .options import LiSSAOptions
from .recursion import NONFINITE_ADVICE, LiSSADivergenceError, LiSSAResult, lissa_quadratic, lissa_recursion
from .samplers import RandomSampler, SamplePool, Sampler

__all__ = ["lissa_inverse_hvp", "self_influence", "estimate_scale", "make_product", "PoolLike"]

PoolLike = Union[SamplePool, Dataset, Sequence[Any]]
"""What mini-batches are drawn from: a map-style dataset, or a :class:`SamplePool` (which also
says how to collate)."""

DEFAULT_OPTIONS = LiSSAOptions()
AUTO_N_BATCHES, AUTO_ITERS, AUTO_SAFETY = 3, 8, 3.0  # what scale="auto" runs estimate_scale with (safety 3: docs/lissa.md)
AUTO_TOL = 0.02  # power iteration stops once the eigenvalue changed by less than this (relative)
AUTO_MIN_ITERS = 2  # ... but not before this many iterations
AUTO_TIME_FRACTION = 0.1  # the auto estimate stops drawing mini-batches past this share of time_budget
ACTIVATION_PROBE_EXAMPLES = 2  # the memory plan measures the saved activations of this many mini-batch examples
AUTO_DAMPING = 0.1  # damping="auto": this times the mean top curvature eigenvalue of the sampled mini-batches
AUTO_SCALE_RETRIES = 2  # scale="auto": a diverged run restarts with the suggested scale at most this many times
BUDGET_MIN_DEPTH = 10  # time_budget: the random sampler's mini-batches shrink before the depth falls below this


def make_product(op: CurvatureOperator, sampler: Sampler, pool: SamplePool, generator: torch.Generator) -> Callable[[Tensor, int], Tensor]:
    """``product(h, step)`` for :func:`lissa_recursion`: draw a mini-batch, return ``H_t h``."""

    def product(h: Tensor, step: int) -> Tensor:
        batch = pool.batch(sampler.sample(generator))
        return op.matvec(batch, h)

    return product


def affordable_sample_size(one: float, two: float, vector_steps: float, seconds: float) -> int:
    """The most examples per LiSSA step that ``vector_steps`` single-vector products fit in
    ``seconds``, from the measured time of one product over one example (``one``) and over two
    (``two``): a fixed cost ``a`` and a cost per example ``b`` (``b = max(0, two − one)``,
    ``a = max(0, one − b)``), so ``vector_steps · (a + b·m) ≤ seconds``. At least 1; a very large
    number when the examples cost nothing measurable and the fixed cost fits."""
    b = max(0.0, two - one)
    a = max(0.0, one - b)
    per_vector_step = seconds / max(vector_steps, 1e-12) - a
    if per_vector_step <= 0:
        return 1
    if b <= 0:
        return 1 << 30
    return max(1, int(per_vector_step // b))


class _Run:
    """What every entry point sets up once: the task, the curvature operator on the parameter
    subset, the pool (on the parameters' device) and the sampler, prepared with ``seed``."""

    def __init__(self, model: nn.Module, pool: PoolLike, options: LiSSAOptions, task: Optional[TaskLike], owner: str,
                 prepare: bool = True) -> None:
        if not isinstance(options, LiSSAOptions):
            raise check.InvalidArgumentError(f"{owner}(options=...) must be a LiSSAOptions, got {options!r}")
        self.model = model
        self.options = options
        self.sampler = options.make_sampler()
        self.task = resolve_task(model, task, needs=options.task_needs)  # the GGN's and the sampler's methods
        self.op = CurvatureOperator(model, self.task, params=options.params, curvature=options.curvature, owner="LiSSAOptions")
        self.pool = pool if isinstance(pool, SamplePool) else SamplePool(pool, device=self.op.device)
        self.products = 0  # single-vector curvature products spent on the auto estimate
        self.plan: Optional[MemoryPlan] = None
        if prepare:
            self.sampler.prepare(model, self.task, self.pool, torch.Generator().manual_seed(options.seed))

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.options.seed)

    def fit_sample_to_budget(self, n_probe: Optional[int], started: float) -> Optional[str]:
        """With ``time_budget`` and the (default) random sampler: shrink the mini-batch before
        anything else runs when ``n_probe`` vectors could not take :data:`BUDGET_MIN_DEPTH` steps
        (or ``depth``, if lower) at ``sample_size`` examples per step within the budget.

        The cost model is measured, not guessed: a single-vector curvature product over one pool
        example and over two (each timed on its second call, after warm-up) give a fixed cost per
        product ``a`` (calls, kernel launches) and a cost per example ``b``; a step over ``m``
        examples then costs about ``a + b·m`` per vector (an overestimate where the vectors of a
        chunk are batched). Timing one example alone and scaling it by ``m`` would charge the fixed
        cost ``m`` times: on a small model, where it dominates, that overestimated a 0.4 s run as
        minutes and shrank its mini-batch for nothing. The ``"auto"`` estimate's share of the
        budget and the probe's gradients (about half a product per example) are set aside first.
        A smaller mini-batch is chosen before the ``"auto"`` scale is estimated, so the scale fits
        the mini-batches the recursion draws.

        Returns:
            The warning to give (the new ``sample_size`` and why), or ``None`` when nothing changed.
        """
        o, sampler = self.options, self.sampler
        if o.time_budget is None or n_probe is None or type(sampler) is not RandomSampler:
            return None
        size = min(sampler.sample_size, len(self.pool))
        if size <= 1:
            return None
        v = torch.randn(1, self.op.num_params, generator=self.generator(), dtype=torch.float64).to(self.op.device, self.op.dtype)
        seconds = []
        for m in (1, 2):
            batch = self.pool.batch(torch.arange(m, dtype=torch.long))
            for _ in range(2):
                t = time.perf_counter()
                self.op.matvec(batch, v)
                took = time.perf_counter() - t
            seconds.append(took)
        auto = AUTO_TIME_FRACTION * o.time_budget if (o.auto_damping or o.auto_scale) else 0.0
        left = o.time_budget - auto - (time.perf_counter() - started) - 0.5 * n_probe * seconds[0]
        vector_steps = n_probe * min(o.depth, BUDGET_MIN_DEPTH) * o.repeats
        new = affordable_sample_size(seconds[0], seconds[1], vector_steps, left)
        if new >= size:
            return None
        sampler.sample_size = new
        return (f"LiSSA self-influence: time_budget={o.time_budget:g} s cannot afford {min(o.depth, BUDGET_MIN_DEPTH)} steps "
                f"for {n_probe} probe examples at sample_size={size} (a curvature product took {seconds[0]:.3g} s on one "
                f"example, {seconds[1]:.3g} s on two): each step draws {new} example{'s' if new > 1 else ''} instead "
                "(reported as meta['sample_size']; noisier steps, the same estimator). Raise LiSSAOptions(time_budget=...) "
                "(or None), or lower the cost per product (params=, e.g. 'last_layer' or the blocks you care about) or the probe.")

    def top_eigenvalues(self, n_batches: int, iters: int, tol: Optional[float] = None,
                        seconds: Optional[float] = None) -> list[float]:
        """``|μ_max(H_t)|`` of up to ``n_batches`` sampled mini-batches, by at most ``iters``
        steps of power iteration each (seeded with ``options.seed``), each stopped early once
        its eigenvalue changed by less than ``tol`` (relative; after :data:`AUTO_MIN_ITERS`
        steps) or once ``seconds`` have passed (after :data:`AUTO_MIN_ITERS` steps of the first
        mini-batch: no further mini-batch is drawn then). ``self.products`` counts the curvature
        products used."""
        gen = self.generator()
        op, found = self.op, []
        t0 = time.perf_counter()
        for _ in range(n_batches):
            if found and seconds is not None and time.perf_counter() - t0 > seconds:
                break
            batch = self.pool.batch(self.sampler.sample(gen))
            v = torch.randn(1, op.num_params, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
            v = v / v.norm()
            lam = 0.0
            for i in range(iters):
                w = op.matvec(batch, v).detach()
                self.products += 1
                prev, lam = lam, float(w.norm())
                if lam == 0.0 or not torch.isfinite(w).all():
                    break
                v = w / lam
                if i + 1 >= AUTO_MIN_ITERS and ((tol is not None and abs(lam - prev) <= tol * lam)
                                                 or (seconds is not None and time.perf_counter() - t0 > seconds)):
                    break
            found.append(lam)
        return found

    def estimate_scale(self, n_batches: int, iters: int, safety: float, tol: Optional[float] = None) -> float:
        """``safety · (max_t |μ_max(H_t)| + damping)`` over ``n_batches`` sampled mini-batches
        (``damping="auto"``: ``AUTO_DAMPING · mean_t |μ_max(H_t)|``)."""
        eigs = self.top_eigenvalues(n_batches, iters, tol)
        damping = AUTO_DAMPING * sum(eigs) / len(eigs) if self.options.auto_damping else float(self.options.damping)
        return float(safety * (max(eigs) + damping))

    def settings(self) -> tuple[float, float]:
        """``(damping, scale)`` of this run: the options' values, with ``"auto"`` ones set from
        one curvature estimate (up to :data:`AUTO_N_BATCHES` mini-batches, power iteration
        stopped at :data:`AUTO_TOL` or :data:`AUTO_ITERS`, no new mini-batch past
        :data:`AUTO_TIME_FRACTION` of ``time_budget``): damping ``AUTO_DAMPING · mean_t
        |μ_max(H_t)|``, scale ``AUTO_SAFETY · (max_t |μ_max(H_t)| + damping)``."""
        o = self.options
        if not (o.auto_damping or o.auto_scale):
            return float(o.damping), float(o.scale)
        seconds = None if o.time_budget is None else AUTO_TIME_FRACTION * o.time_budget
        eigs = self.top_eigenvalues(AUTO_N_BATCHES, AUTO_ITERS, AUTO_TOL, seconds)
        damping = AUTO_DAMPING * sum(eigs) / len(eigs) if o.auto_damping else float(o.damping)
        scale = AUTO_SAFETY * (max(eigs) + damping) if o.auto_scale else float(o.scale)
        if damping <= 0 and o.auto_damping:
            raise LiSSADivergenceError(
                "LiSSA: damping='auto' found no curvature (every sampled mini-batch has a zero curvature product); "
                "pass a damping > 0", step=0, repeat=0, scale=scale, damping=damping, suggested_scale=None)
        return float(damping), float(scale)

    def scale(self) -> float:
        """The scale of this run (see :meth:`settings`)."""
        return self.settings()[1]

    def plan_memory(self, chunk_size: int, resident_copies: int = RESIDENT_COPIES) -> MemoryPlan:
        """Measure the saved activations of :data:`ACTIVATION_PROBE_EXAMPLES` examples of one
        sampled mini-batch (scaled to the whole), choose how many vectors and examples to carry
        (:func:`~lightning_influence.lissa.budget.plan_memory`) and set the operator's
        ``max_vectors``; raises :class:`~lightning_influence.lissa.LiSSAMemoryError` when one
        vector cannot fit."""
        gen = torch.Generator().manual_seed(self.options.seed + 1)  # not the run's draws
        batch = self.pool.batch(self.sampler.sample(gen))
        n = leading_size(batch)
        b = min(n, ACTIVATION_PROBE_EXAMPLES)  # activations grow linearly with the examples: measure a few
        activations = self.op.activation_bytes(slice_batch(batch, 0, b)) * n // b
        self.plan = plan_memory(num_params=self.op.num_params, itemsize=self.op.dtype.itemsize,
                                activation_bytes=activations, chunk_size=chunk_size, sample_size=n,
                                device=self.op.device, memory_budget=self.options.memory_budget,
                                resident_copies=resident_copies)
        self.op.max_vectors = self.plan.vectors_per_product
        self.op.max_examples = self.plan.examples_per_product
        return self.plan

    def solve(self, vectors: Tensor, scale: float, damping: Optional[float] = None, criterion: str = "norm") -> LiSSAResult:
        """The recursion for ``vectors`` (``Tensor[K, P]``) with the sampler re-seeded."""
        o = self.options
        damping = float(o.damping) if damping is None else damping
        product = make_product(self.op, self.sampler, self.pool, self.generator())
        return lissa_recursion(product, vectors, damping=damping, scale=scale, depth=o.depth, repeats=o.repeats,
                               tol=o.tol, psd=o.curvature == "ggn", criterion=criterion)


def lissa_inverse_hvp(
    model: nn.Module,
    vectors: Tensor,
    pool: PoolLike,
    options: LiSSAOptions = DEFAULT_OPTIONS,
    task: Optional[TaskLike] = None,
    prepare: bool = True,
) -> LiSSAResult:
    """Estimate ``(H + λI)^{-1} v`` for each row ``v`` of ``vectors`` with sampled LiSSA.

    Args:
        model: the model; its current parameters are used (put it in eval mode first if it
            has dropout or batch norm).
        vectors: ``Tensor[K, P]`` (or ``Tensor[P]``) in the flat layout of the selected
            parameters (see :class:`~lightning_influence.lissa.CurvatureOperator`); moved to
            the parameters' device and dtype.
        pool: the examples mini-batches are drawn from (a dataset, or a :class:`SamplePool`).
        options: sampler, parameter subset, curvature, damping, scale, depth, repeats, tol, seed
            (see :class:`~lightning_influence.lissa.LiSSAOptions`; ``chunk_size`` is unused).
        task: how to read batches (default: from the model, see ``resolve_task``).
        prepare: call ``sampler.prepare`` (``False`` reuses an ``options.sampler`` instance
            already prepared on this model and pool).

    Returns:
        :class:`LiSSAResult` with ``estimate`` of the shape of ``vectors`` in the parameters'
        dtype, and the ``scale`` used (the damping used is ``options.damping``, or with
        ``"auto"`` the value :class:`LiSSAOptions` describes).

    Raises:
        LiSSADivergenceError: the recursion diverged (raise ``scale``, or ``damping``).
    """
    run = _Run(model, pool, options, task, "lissa_inverse_hvp", prepare=prepare)
    if vectors.shape[-1] != run.op.num_params:
        raise ValueError(f"vectors have {vectors.shape[-1]} columns but the selected parameters number {run.op.num_params}")
    single = vectors.dim() == 1
    v = (vectors.unsqueeze(0) if single else vectors).to(run.op.device, run.op.dtype)
    chunk = run.plan_memory(v.shape[0], INVERSE_HVP_COPIES).chunk_size
    damping, scale = run.settings()
    if chunk >= v.shape[0]:
        res = run.solve(v, scale, damping)
    else:  # every chunk re-seeds the sampler: the same estimate as one batched run, in less memory
        parts = [run.solve(v[i : i + chunk], scale, damping) for i in range(0, v.shape[0], chunk)]
        res = LiSSAResult(estimate=torch.cat([p.estimate for p in parts]), scale=scale,
                          steps=[max(p.steps[r] for p in parts) for r in range(options.repeats)],
                          converged=[all(p.converged[r] for p in parts) for r in range(options.repeats)],
                          rel_change=parts[0].rel_change,
                          vector_steps=[torch.cat([p.vector_steps[r] for p in parts]) for r in range(options.repeats)],
                          seconds=sum(p.seconds for p in parts))
    if single:
        res.estimate = res.estimate.squeeze(0)
    return res


def self_influence(
    model: nn.Module,
    probe: Iterable[Any],
    pool: PoolLike,
    options: LiSSAOptions = DEFAULT_OPTIONS,
    task: Optional[TaskLike] = None,
    id_map: Optional[Tensor] = None,
    progress: Optional[bool] = None,
) -> InfluenceScores:
    """Self-influence ``∇ℓ(z)ᵀ (H + λI)^{-1} ∇ℓ(z)`` of every example of ``probe``, ``≥ 0``.

    Probe examples are processed in chunks of at most ``options.chunk_size`` (fewer when the
    memory budget cannot hold them, see :mod:`lightning_influence.lissa.budget`): their
    per-example gradients (``Tensor[chunk, P]``, torch.func ``vmap(grad)``) go through one
    batched recursion, :func:`~lightning_influence.lissa.recursion.lissa_quadratic`, whose
    estimate is a sum of non-negative terms, so every score is ``≥ 0`` whatever the curvature
    (exact Hessian included) and whatever the mini-batch noise. Every chunk re-seeds the
    sampler's generator with ``options.seed``, so all chunks see the same mini-batches and the
    scores of all examples come from the same estimator.

    Cost, in curvature products: the ``"auto"`` estimate's single-vector products (see
    :class:`LiSSAOptions` ``scale``: at most 24, bounded by 10% of ``time_budget``), then per chunk
    at most ``depth × repeats`` batched products, each over one mini-batch of ``sample_size``
    examples and all the chunk's vectors still running: about ``depth × sample_size``
    single-example curvature products per scored example. With ``options.time_budget``, first
    the random sampler's mini-batch shrinks when even 10 steps per example would not fit (timed
    on one product before the run: :meth:`_Run.fit_sample_to_budget`), then the depth is lowered
    for every chunk alike when the projected cost still exceeds it (both reported in ``meta``,
    with a warning). Memory is ``O(chunk · P)`` plus one curvature product.

    Args:
        model: the model (in eval mode if it has dropout or batch norm).
        probe: iterable of batches (e.g. a ``DataLoader``) the task understands.
        pool: what each step's mini-batch is drawn from (see :func:`lissa_inverse_hvp`).
        options: see :class:`~lightning_influence.lissa.LiSSAOptions`.
        task: how to read batches (default: from the model).
        id_map: ``LongTensor`` mapping probe positions to ids, used for batches that carry no
            ids (without it such examples get their positions in ``probe``).
        progress: show a progress bar over the recursion steps (``None``: when standard error
            is a terminal, see :mod:`lightning_influence.progress`).

    Returns:
        :class:`~lightning_influence.InfluenceScores` with ``method="lissa"``, ``train_ids``
        (``LongTensor[n]``, in probe order), ``self_influence`` (``Tensor[n]`` in the
        parameters' dtype, on CPU, every value ``≥ 0``), ``options=options.as_dict()`` and
        ``meta`` with ``steps`` (LiSSA steps per chunk, summed over repeats: the most any vector
        ran), ``vector_steps`` (steps per probe example, summed over repeats, averaged over the
        probe: with ``tol`` each example stops on its own), ``converged`` (per chunk: every
        vector of every repeat reached ``tol``), ``seconds`` (wall time) and ``phase_seconds``
        (``settings``, ``gradients``, ``recursion``), ``num_params`` (``P``), ``scale`` and
        ``damping`` (the values used, also with ``"auto"``), ``auto_products`` (curvature
        products the ``"auto"`` estimate used), ``depth`` (the depth used) and
        ``budget_limited`` (whether ``time_budget`` lowered it), ``sample_size`` (examples per
        step of a named sampler) and ``sample_limited`` (whether ``time_budget`` lowered it
        before the run, see below), ``memory`` (the
        :class:`~lightning_influence.lissa.budget.MemoryPlan` as a dict), and
        ``negative_curvature`` (how many examples' iterates met negative curvature of
        ``H + λI``: their scores weight those directions as at least flat ones, see
        docs/lissa.md; always 0 with ``"ggn"``).

    Raises:
        LiSSADivergenceError: the recursion diverged (raise ``scale``, or ``damping``), or a
            probe example's gradient is not finite (the message names the ids and says whether
            the weights are).
        LiSSAMemoryError: one vector cannot fit in ``options.memory_budget``, or a product ran
            out of memory (the message names the numbers and the knobs).
    """
    t0 = time.perf_counter()
    run = _Run(model, pool, options, task, "self_influence")
    n_probe = _probe_size(probe)
    shrunk = run.fit_sample_to_budget(n_probe, t0)
    if shrunk is not None:
        warnings.warn(shrunk, RuntimeWarning, stacklevel=2)
    plan = run.plan_memory(options.chunk_size, RESIDENT_COPIES - 1 if options.repeats == 1 else RESIDENT_COPIES)
    chunk = plan.chunk_size
    damping, scale = run.settings()
    t_settings = time.perf_counter() - t0
    steps: list[int] = []
    converged: list[bool] = []
    vector_steps: list[float] = []
    ids_out: list[Tensor] = [torch.zeros(0, dtype=torch.long)]
    scores_out: list[Tensor] = [torch.zeros(0, dtype=run.op.dtype)]
    negative = [0]
    timing = {"gradients": 0.0, "recursion": 0.0}
    depth = {"cap": options.depth, "limited": False}
    show = progress_enabled(progress)
    bar = None
    if show:
        from tqdm.auto import tqdm

        total = None if n_probe is None else math.ceil(n_probe / chunk) * options.depth * options.repeats
        bar = tqdm(total=total, desc=f"LiSSA self-influence ({chunk} vectors per chunk)", unit="step", leave=False,
                   dynamic_ncols=True)

    def plan_depth(step_seconds: float) -> Optional[int]:
        """After the first step of the first chunk: the depth every chunk can afford."""
        if options.time_budget is None or n_probe is None or depth["limited"]:
            return None
        chunks = math.ceil(n_probe / chunk)
        left = options.time_budget - (time.perf_counter() - t0)
        per_step = max(step_seconds, 1e-9) * options.repeats
        grad_rest = timing["gradients"] * (chunks - 1)  # gradients of the chunks still to come, about
        affordable = max(1, int((left - grad_rest) // (per_step * chunks) + 1))  # +1: this step is done
        if affordable < options.depth:
            depth["cap"], depth["limited"] = affordable, True
            projected = time.perf_counter() - t0 + grad_rest + per_step * (chunks * affordable - 1)
            over = (f" Even depth 1 exceeds the budget: the run will take about {projected:.0f} s in all."
                    if projected > options.time_budget * 1.05 else "")
            warnings.warn(
                f"LiSSA self-influence: time_budget={options.time_budget:g} s allows depth {affordable} of "
                f"{options.depth} (one step over {chunk} vectors took {step_seconds:.3g} s; {chunks} chunks of the "
                f"{n_probe} probe examples): every chunk runs at most {affordable} steps, which weights the flattest "
                f"directions like a larger damping.{over} Raise LiSSAOptions(time_budget=...) (or None) for the full "
                "depth, or lower the cost per step (params=, sample_size=) or the number of chunks (max_probe=, a "
                "larger memory_budget).", RuntimeWarning, stacklevel=6)  # the caller of self_influence
            return affordable
        return None

    def flush(g: Tensor, ids: Tensor) -> None:
        bad = ~torch.isfinite(g).all(dim=1)
        if bool(bad.any()):
            weights = [n for n, p in zip(run.op.names, run.op._params) if not bool(torch.isfinite(p).all())]
            cause = (f"the model's weights are not finite ({len(weights)} parameters hold NaN or inf, e.g. {weights[:3]})"
                     if weights else "their losses are not finite for finite weights (inputs or labels hold NaN, inf or "
                     "values that overflow)")
            raise LiSSADivergenceError(
                f"self_influence: {int(bad.sum())} probe examples have non-finite loss gradients (e.g. ids "
                f"{ids[bad.cpu()][:5].tolist()}): {cause}; {NONFINITE_ADVICE}",
                step=0, repeat=0, scale=scale, damping=damping, suggested_scale=None,
            )
        first = not steps
        t_start = time.perf_counter()

        def on_step(rows: int) -> Optional[int]:
            if bar is not None:
                bar.update(1)
            if first and on_step.calls == 0:
                on_step.calls = 1
                return plan_depth(time.perf_counter() - t_start)
            on_step.calls += 1
            return None

        on_step.calls = 0  # type: ignore[attr-defined]
        product = make_product(run.op, run.sampler, run.pool, run.generator())
        res = lissa_quadratic(product, g, damping=damping, scale=scale, depth=depth["cap"], repeats=options.repeats,
                              tol=options.tol, psd=options.curvature == "ggn", on_step=on_step, overwrite=True)
        timing["recursion"] += time.perf_counter() - t_start
        scores_out.append(res.estimate.detach().cpu())
        ids_out.append(ids)
        steps.append(res.total_steps)
        converged.append(all(res.converged))
        vector_steps.append(res.mean_vector_steps * g.shape[0])
        negative[0] += int(res.negative_curvature.sum()) if res.negative_curvature is not None else 0

    def score_probe() -> None:
        for out in (steps, converged, vector_steps):
            out.clear()
        del ids_out[1:], scores_out[1:]
        negative[0] = 0
        pending_g = torch.zeros(0, run.op.num_params, dtype=run.op.dtype, device=run.op.device)
        pending_ids = torch.zeros(0, dtype=torch.long)
        position = 0
        for batch in probe:
            batch = move_to_device(batch, run.op.device)
            n = leading_size(batch)
            ids = run.task.example_ids(batch)
            if ids is None:
                pos = torch.arange(position, position + n)
                ids = id_map[pos] if id_map is not None else pos
            if ids.numel() != n:
                raise ValueError(f"self_influence: a probe batch has {n} examples but {ids.numel()} ids")
            ids = ids.detach().cpu().long().reshape(-1)
            position += n
            start = 0
            while start < n:  # never more than one chunk of gradients held
                take = min(n - start, chunk - pending_g.shape[0])
                part = batch if (start == 0 and take == n) else slice_batch(batch, start, start + take)
                tg = time.perf_counter()
                g = run.op.per_example_grads(part).detach()
                timing["gradients"] += time.perf_counter() - tg
                pending_g = torch.cat([pending_g, g]) if pending_g.shape[0] else g
                pending_ids = torch.cat([pending_ids, ids[start : start + take]])
                del g
                start += take
                if pending_g.shape[0] >= chunk:
                    flush(pending_g, pending_ids)
                    pending_g = pending_g[:0]
                    pending_ids = pending_ids[:0]
        if pending_g.shape[0]:
            flush(pending_g, pending_ids)

    retries = 0
    try:
        while True:
            try:
                score_probe()
                break
            except LiSSADivergenceError as e:
                # an "auto" scale comes from a few sampled mini-batches; a later one may curve more
                # (tiny or noisy mini-batches): every chunk restarts with the scale the divergence
                # suggests, so all scores still come from one estimator
                if (not options.auto_scale or e.suggested_scale is None or retries >= AUTO_SCALE_RETRIES
                        or iter(probe) is probe):
                    raise
                retries += 1
                new_scale = max(float(e.suggested_scale), 2.0 * scale)
                warnings.warn(
                    f"LiSSA self-influence: the recursion diverged at step {e.step} with the estimated scale "
                    f"{scale:.4g} (a sampled mini-batch curves more than the estimate's); restarting every chunk with "
                    f"scale {new_scale:.4g} (retry {retries} of {AUTO_SCALE_RETRIES}; meta['scale_retries'])",
                    RuntimeWarning, stacklevel=2)
                scale = new_scale
    finally:
        if bar is not None:
            bar.close()
    n_scored = int(sum(t.numel() for t in ids_out))
    if negative[0]:
        warnings.warn(
            f"LiSSA self-influence: {negative[0]} of {n_scored} examples met negative curvature of H + damping*I "
            f"(curvature={options.curvature!r}, damping={damping:.3g}); their scores stay >= 0 (those directions are "
            "weighted at least as flat ones) but are not (H + damping*I)^-1 quadratic forms there: use curvature='ggn' "
            "or a larger damping for a positive definite curvature", RuntimeWarning, stacklevel=2)
    meta = {"steps": steps, "converged": converged, "seconds": time.perf_counter() - t0, "num_params": run.op.num_params,
            "scale": scale, "damping": damping, "vector_steps": sum(vector_steps) / max(1, n_scored),
            "auto_products": run.products, "depth": depth["cap"], "budget_limited": depth["limited"],
            "negative_curvature": negative[0], "memory": plan.as_dict(),
            "sample_size": getattr(run.sampler, "sample_size", None), "sample_limited": shrunk is not None,
            "scale_retries": retries,
            "phase_seconds": {"settings": t_settings, **timing}}
    return InfluenceScores(method="lissa", train_ids=torch.cat(ids_out), self_influence=torch.cat(scores_out),
                           options=options.as_dict(), meta=meta)


def _probe_size(probe: Iterable[Any]) -> Optional[int]:
    """Examples in ``probe`` when known without iterating it (a ``DataLoader`` over a sized
    dataset, or a list of batches); ``None`` otherwise."""
    if isinstance(getattr(probe, "dataset", None), Dataset):  # a DataLoader, or a wrapper of one
        try:
            return len(probe.dataset)  # type: ignore[arg-type, attr-defined]
        except TypeError:
            return None
    if isinstance(probe, (list, tuple)):
        try:
            return sum(leading_size(b) for b in probe)
        except Exception:  # noqa: BLE001 - an unusual batch layout: no estimate
            return None
    return None


def estimate_scale(
    model: nn.Module,
    pool: PoolLike,
    options: LiSSAOptions = DEFAULT_OPTIONS,
    task: Optional[TaskLike] = None,
    n_batches: int = AUTO_N_BATCHES,
    iters: int = AUTO_ITERS,
    safety: float = AUTO_SAFETY,
    tol: Optional[float] = AUTO_TOL,
) -> float:
    """A LiSSA ``scale`` for this model, sampler and budget: ``safety · (max_t |μ_max(H_t)| + damping)``.

    ``|μ_max(H_t)|`` is the largest-magnitude eigenvalue of the curvature of ``n_batches``
    mini-batches drawn by ``options``' sampler (seeded with ``options.seed``), by at most
    ``iters`` steps of power iteration each (one single-vector curvature product per step),
    each stopped once the eigenvalue changed by less than ``tol`` (relative, after 2 steps;
    ``None``: all ``iters``): at most ``n_batches × iters`` products (3 × 8 by default, about
    3–4 per mini-batch in practice). ``damping`` is ``options.damping`` and ``options.scale``
    is ignored. Power iteration approaches the eigenvalue from below, hence ``safety``; an
    unlucky draw can still exceed it, in which case LiSSA raises
    :class:`LiSSADivergenceError` with a suggested value. ``scale="auto"`` in
    :class:`LiSSAOptions` runs this with the defaults (and stops drawing mini-batches after 10%
    of ``options.time_budget``).
    """
    owner = "estimate_scale"
    check.positive_int(owner, "n_batches", n_batches)
    check.positive_int(owner, "iters", iters)
    check.finite_float(owner, "safety", safety, minimum=1.0)
    check.finite_float(owner, "tol", tol, minimum=0.0, allow_none=True)
    return _Run(model, pool, options, task, owner).estimate_scale(n_batches, iters, safety, tol)
