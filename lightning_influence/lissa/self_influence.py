"""Inverse-curvature-vector products and self-influence with sampled LiSSA.

Self-influence of an example ``z`` is ``∇ℓ(z)ᵀ (H + λI)^{-1} ∇ℓ(z)`` where ``ℓ(z)`` is the
example's per-example loss (summed over tokens), ``∇`` is taken with respect to the selected
parameter subset, and ``H`` is the Hessian (or GGN) of the **mean** per-example loss over the
mini-batch drawn at each LiSSA step. Scores are ``≥ 0`` (for positive semi-definite curvature;
``H + λI`` is positive definite then), in units of loss², and are **not** normalised by the
dataset size.

Every entry point takes one :class:`~lightning_influence.lissa.LiSSAOptions`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .. import validation as check
from ..batches import move_to_device
from ..scores import InfluenceScores
from ..task import TaskLike, resolve_task
from .curvature import CurvatureOperator
from .options import LiSSAOptions
from .recursion import NONFINITE_ADVICE, LiSSADivergenceError, LiSSAResult, lissa_recursion
from .samplers import SamplePool, Sampler

__all__ = ["lissa_inverse_hvp", "self_influence", "estimate_scale", "make_product", "PoolLike"]

PoolLike = Union[SamplePool, Dataset, Sequence[Any]]
"""What mini-batches are drawn from: a map-style dataset, or a :class:`SamplePool` (which also
says how to collate)."""

DEFAULT_OPTIONS = LiSSAOptions()
AUTO_N_BATCHES, AUTO_ITERS, AUTO_SAFETY = 5, 10, 1.5  # what scale="auto" runs estimate_scale with
AUTO_DAMPING = 0.1  # damping="auto": this times the mean top curvature eigenvalue of the sampled mini-batches


def make_product(op: CurvatureOperator, sampler: Sampler, pool: SamplePool, generator: torch.Generator) -> Callable[[Tensor, int], Tensor]:
    """``product(h, step)`` for :func:`lissa_recursion`: draw a mini-batch, return ``H_t h``."""

    def product(h: Tensor, step: int) -> Tensor:
        batch = pool.batch(sampler.sample(generator))
        return op.matvec(batch, h)

    return product


class _Run:
    """What every entry point sets up once: the task, the curvature operator on the parameter
    subset, the pool (on the parameters' device) and the sampler, prepared with ``seed``."""

    def __init__(self, model: nn.Module, pool: PoolLike, options: LiSSAOptions, task: Optional[TaskLike], owner: str,
                 prepare: bool = True) -> None:
        if not isinstance(options, LiSSAOptions):
            raise check.InvalidArgumentError(f"{owner}(options=...) must be a LiSSAOptions, got {options!r}")
        self.model = model
        self.options = options
        self.task = resolve_task(model, task)
        self.op = CurvatureOperator(model, self.task, params=options.params, curvature=options.curvature, owner="LiSSAOptions")
        self.pool = pool if isinstance(pool, SamplePool) else SamplePool(pool, device=self.op.device)
        self.sampler = options.make_sampler()
        if prepare:
            self.sampler.prepare(model, self.task, self.pool, torch.Generator().manual_seed(options.seed))

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.options.seed)

    def top_eigenvalues(self, n_batches: int, iters: int) -> list[float]:
        """``|μ_max(H_t)|`` of ``n_batches`` sampled mini-batches, by ``iters`` steps of power
        iteration each (seeded with ``options.seed``)."""
        gen = self.generator()
        op, found = self.op, []
        for _ in range(n_batches):
            batch = self.pool.batch(self.sampler.sample(gen))
            v = torch.randn(1, op.num_params, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
            v = v / v.norm()
            lam = 0.0
            for _ in range(iters):
                w = op.matvec(batch, v).detach()
                lam = float(w.norm())
                if lam == 0.0 or not torch.isfinite(w).all():
                    break
                v = w / lam
            found.append(lam)
        return found

    def estimate_scale(self, n_batches: int, iters: int, safety: float) -> float:
        """``safety · (max_t |μ_max(H_t)| + damping)`` over ``n_batches`` sampled mini-batches
        (``damping="auto"``: ``AUTO_DAMPING · mean_t |μ_max(H_t)|``)."""
        eigs = self.top_eigenvalues(n_batches, iters)
        damping = AUTO_DAMPING * sum(eigs) / len(eigs) if self.options.auto_damping else float(self.options.damping)
        return float(safety * (max(eigs) + damping))

    def settings(self) -> tuple[float, float]:
        """``(damping, scale)`` of this run: the options' values, with ``"auto"`` ones set from
        one curvature estimate (:data:`AUTO_N_BATCHES` mini-batches, :data:`AUTO_ITERS` power
        iterations): damping ``AUTO_DAMPING · mean_t |μ_max(H_t)|``, scale ``AUTO_SAFETY ·
        (max_t |μ_max(H_t)| + damping)``."""
        o = self.options
        if not (o.auto_damping or o.auto_scale):
            return float(o.damping), float(o.scale)
        eigs = self.top_eigenvalues(AUTO_N_BATCHES, AUTO_ITERS)
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
    damping, scale = run.settings()
    return run.solve(vectors.to(run.op.device, run.op.dtype), scale, damping)


def self_influence(
    model: nn.Module,
    probe: Iterable[Any],
    pool: PoolLike,
    options: LiSSAOptions = DEFAULT_OPTIONS,
    task: Optional[TaskLike] = None,
    id_map: Optional[Tensor] = None,
) -> InfluenceScores:
    """Self-influence ``∇ℓ(z)ᵀ (H + λI)^{-1} ∇ℓ(z)`` of every example of ``probe``.

    Probe examples are processed in chunks of at most ``options.chunk_size``: their per-example
    gradients (``Tensor[chunk, P]``, torch.func ``vmap(grad)``) go through one batched LiSSA
    recursion. Every chunk re-seeds the sampler's generator with ``options.seed``, so all chunks
    see the same mini-batches and the scores of all examples come from the same estimator.
    Memory is ``O(chunk_size · P)`` plus the per-step curvature product.

    Args:
        model: the model (in eval mode if it has dropout or batch norm).
        probe: iterable of batches (e.g. a ``DataLoader``) the task understands.
        pool: what each step's mini-batch is drawn from (see :func:`lissa_inverse_hvp`).
        options: see :class:`~lightning_influence.lissa.LiSSAOptions`.
        task: how to read batches (default: from the model).
        id_map: ``LongTensor`` mapping probe positions to ids, used for batches that carry no
            ids (without it such examples get their positions in ``probe``).

    Returns:
        :class:`~lightning_influence.InfluenceScores` with ``method="lissa"``, ``train_ids``
        (``LongTensor[n]``, in probe order), ``self_influence`` (``Tensor[n]`` in the
        parameters' dtype, on CPU), ``options=options.as_dict()`` and ``meta`` with ``steps``
        (LiSSA steps per chunk, summed over repeats: the most any vector ran), ``vector_steps``
        (steps per probe example, summed over repeats, averaged over the probe: with ``tol``
        each example stops on its own), ``converged`` (per chunk: every vector of every repeat
        reached ``tol``), ``seconds`` (wall time), ``num_params`` (``P``), ``scale`` and
        ``damping`` (the values used, also with ``"auto"``).

    Raises:
        LiSSADivergenceError: the recursion diverged (raise ``scale``, or ``damping``), or a
            probe example's gradient is not finite (the message names the ids and says whether
            the weights are).
    """
    t0 = time.perf_counter()
    run = _Run(model, pool, options, task, "self_influence")
    damping, scale = run.settings()
    chunk = options.chunk_size
    steps: list[int] = []
    converged: list[bool] = []
    vector_steps: list[float] = []
    ids_out: list[Tensor] = [torch.zeros(0, dtype=torch.long)]
    scores_out: list[Tensor] = [torch.zeros(0, dtype=run.op.dtype)]

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
        res = run.solve(g, scale, damping, criterion="quadratic")
        scores_out.append((g * res.estimate).sum(dim=1).detach().cpu())
        ids_out.append(ids)
        steps.append(res.total_steps)
        converged.append(all(res.converged))
        vector_steps.append(res.mean_vector_steps * g.shape[0])

    pending_g = torch.zeros(0, run.op.num_params, dtype=run.op.dtype, device=run.op.device)
    pending_ids = torch.zeros(0, dtype=torch.long)
    position = 0
    for batch in probe:
        batch = move_to_device(batch, run.op.device)
        g = run.op.per_example_grads(batch).detach()
        n = g.shape[0]
        ids = run.task.example_ids(batch)
        if ids is None:
            pos = torch.arange(position, position + n)
            ids = id_map[pos] if id_map is not None else pos
        if ids.numel() != n:
            raise ValueError(f"self_influence: a probe batch has {n} examples but {ids.numel()} ids")
        position += n
        pending_g = torch.cat([pending_g, g])
        pending_ids = torch.cat([pending_ids, ids.detach().cpu().long().reshape(-1)])
        while pending_g.shape[0] >= chunk:
            flush(pending_g[:chunk], pending_ids[:chunk])
            pending_g, pending_ids = pending_g[chunk:], pending_ids[chunk:]
    if pending_g.shape[0]:
        flush(pending_g, pending_ids)
    meta = {"steps": steps, "converged": converged, "seconds": time.perf_counter() - t0, "num_params": run.op.num_params,
            "scale": scale, "damping": damping, "vector_steps": sum(vector_steps) / max(1, int(sum(t.numel() for t in ids_out)))}
    return InfluenceScores(method="lissa", train_ids=torch.cat(ids_out), self_influence=torch.cat(scores_out),
                           options=options.as_dict(), meta=meta)


def estimate_scale(
    model: nn.Module,
    pool: PoolLike,
    options: LiSSAOptions = DEFAULT_OPTIONS,
    task: Optional[TaskLike] = None,
    n_batches: int = AUTO_N_BATCHES,
    iters: int = AUTO_ITERS,
    safety: float = AUTO_SAFETY,
) -> float:
    """A LiSSA ``scale`` for this model, sampler and budget: ``safety · (max_t |μ_max(H_t)| + damping)``.

    ``|μ_max(H_t)|`` is the largest-magnitude eigenvalue of the curvature of ``n_batches``
    mini-batches drawn by ``options``' sampler (seeded with ``options.seed``), by ``iters``
    steps of power iteration each (one curvature-vector product per step); ``damping`` is
    ``options.damping`` and ``options.scale`` is ignored. Power iteration approaches the
    eigenvalue from below, hence ``safety``; an unlucky draw can still exceed it, in which case
    LiSSA raises :class:`LiSSADivergenceError` with a suggested value. ``scale="auto"`` in
    :class:`LiSSAOptions` runs this with the defaults.
    """
    owner = "estimate_scale"
    check.positive_int(owner, "n_batches", n_batches)
    check.positive_int(owner, "iters", iters)
    check.finite_float(owner, "safety", safety, minimum=1.0)
    return _Run(model, pool, options, task, owner).estimate_scale(n_batches, iters, safety)
