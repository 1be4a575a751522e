"""The options of a sampled-LiSSA run, written once and validated once.

:class:`LiSSAOptions` travels unchanged through :func:`~lightning_influence.lissa.lissa_inverse_hvp`,
:func:`~lightning_influence.lissa.self_influence`, :func:`~lightning_influence.lissa.estimate_scale`
and :class:`~lightning_influence.LiSSASelfInfluence`, and is recorded in every artifact's manifest
through :meth:`LiSSAOptions.as_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, Optional, Sequence, Union

from .. import validation as check
from .curvature import CURVATURES
from .recursion import check_recursion_args
from .samplers import SAMPLER_NAMES, Sampler, make_sampler

__all__ = ["LiSSAOptions", "OWNER"]

OWNER = "LiSSAOptions"


@dataclass(frozen=True)
class LiSSAOptions:
    """How a sampled-LiSSA estimate is computed (validated on construction; immutable, so one
    instance can be shared and a variant made with :func:`dataclasses.replace`).

    Attributes:
        sampler: how each step's mini-batch is drawn from the pool: ``"random"``, ``"logit"``,
            ``"feature"`` (= ``"feature_topk"``), ``"feature_weighted"``, or a
            :class:`~lightning_influence.lissa.Sampler` instance (which then ignores
            ``sample_size``, ``redraw`` and ``n_clusters``).
        sample_size: examples per LiSSA step for a named sampler (split evenly over classes /
            clusters for the logit / feature samplers).
        redraw: draw a new mini-batch every step (``True``) or one subset per run.
        n_clusters: k-means centroids of the feature samplers.
        params: the parameter subset LiSSA works on: ``None`` (every trainable parameter),
            ``"last_layer"``, or glob pattern(s) over ``named_parameters()`` names (see
            :func:`lightning_influence.params.select_parameters`). Memory is
            ``O(chunk_size · P)`` for ``P`` selected parameters.
        curvature: ``"hessian"`` (exact) or ``"ggn"`` (generalised Gauss-Newton, positive
            semi-definite) of the **mean** per-example loss over each step's mini-batch.
        damping: ``λ ≥ 0``; the estimate is of ``(H + λI)⁻¹ v``. ``"auto"`` (the default):
            ``0.1 · μ̄`` where ``μ̄`` is the mean, over the mini-batches drawn by
            :func:`~lightning_influence.lissa.estimate_scale`, of the largest curvature
            eigenvalue (magnitude); relative damping keeps ``s / λ``, and so the steps LiSSA
            needs, the same for every model. The value used is reported in the results' meta.
        scale: ``s > 0``, above the largest eigenvalue of every mini-batch ``H_t + λI``, or
            ``"auto"`` (the default): estimated before each run by
            :func:`~lightning_influence.lissa.estimate_scale` (3 mini-batches, power iteration
            stopped once the eigenvalue changes by less than 2% or after 8 iterations, safety
            factor 3: chosen on the evaluation matrix over 1.5, which ranked flipped labels
            worse on the tasks it was chosen on, docs/benchmarks_matrix.md). **Cost:** one single-vector curvature product per iteration, so
            at most 24 products (18–20 on the 30-epoch digits MLP, whose early-stopped
            eigenvalues are 1–8% below 100 iterations), and no new mini-batch or iteration past
            10% of ``time_budget`` (after the first mini-batch's 2 iterations).
            ``"auto"`` damping and scale share one estimate. The values used are reported in
            the results' meta.
        depth: maximum LiSSA steps per repeat (``≥ 1``). The default 20 does not converge in the
            directions of smallest curvature (``s/λ`` is about 33–54 with the automatic damping and
            scale); the truncated series weights them like a larger damping. On the digits mislabel
            benchmark it ranks flipped labels as well as 100 steps (average precision within the
            spread over seeds) at a fifth of the cost (docs/benchmarks_mislabel.md); raise it (with
            ``tol``) when the values themselves matter, e.g. against an exact reference.
        repeats: independent repeats whose estimates are averaged (``≥ 1``).
        tol: per-vector early stopping: a vector stops once the relative change of its
            quadratic form ``vᵀh`` (in :func:`~lightning_influence.lissa.self_influence`; of
            ``‖h‖`` in :func:`~lightning_influence.lissa.lissa_inverse_hvp`) stayed below it for
            two consecutive steps; ``None`` runs the full depth. At the default depth 20 few
            self-influence vectors reach ``3e-3`` on the digits benchmarks (about 20 steps each);
            with ``depth=100`` most stop after 80–90 steps. The norm's change levels off at the mini-batch noise (about 0.05–0.2 there), so for inverse-HVPs keep
            it well above that, or pass ``None``.
        chunk_size: the most probe examples per batched recursion in
            :func:`~lightning_influence.lissa.self_influence`; fewer when ``memory_budget``
            cannot hold them (see :mod:`lightning_influence.lissa.budget`).
        memory_budget: bytes one LiSSA run may use; ``None`` (the default): 60% of the memory
            available when the run starts (RAM bounded by the cgroup limit on CPU,
            ``torch.cuda.mem_get_info`` on CUDA). The vectors carried at once (``chunk_size``,
            and the vectors mapped over in one curvature product) are chosen to fit it; when one
            vector alone cannot fit, :class:`~lightning_influence.lissa.LiSSAMemoryError` is
            raised before any product, naming the numbers and these knobs.
        time_budget: seconds one :func:`~lightning_influence.lissa.self_influence` run may take
            (default 600); ``None``: unbounded. After the first recursion step the run projects
            its cost, and when ``depth`` steps for every chunk would exceed the budget it lowers
            the depth for every chunk alike (at least 1 step; the truncated series weights the
            flattest directions like a larger damping), warns with the numbers, and reports the
            depth used in the results' meta (``depth``, ``budget_limited``). The digits
            benchmarks finish well within it, so it only acts on large models.
        seed: seeds the sampler's generator; every run and every chunk re-seeds with it, so
            all scores of a run come from the same mini-batches.

    Raises:
        InvalidArgumentError: an option has the wrong type or value (the message names it).
    """

    sampler: Union[str, Sampler] = "random"
    sample_size: int = 32
    redraw: bool = True
    n_clusters: int = 10
    params: Optional[Union[str, Sequence[str]]] = None
    curvature: Literal["hessian", "ggn"] = "hessian"
    damping: Union[float, Literal["auto"]] = "auto"
    scale: Union[float, Literal["auto"]] = "auto"
    depth: int = 20
    repeats: int = 1
    tol: Optional[float] = 3e-3
    chunk_size: int = 256
    seed: int = 0
    memory_budget: Optional[int] = None
    time_budget: Optional[float] = 600.0

    def __post_init__(self) -> None:
        if not isinstance(self.sampler, Sampler):
            check.choice(OWNER, "sampler", self.sampler, SAMPLER_NAMES)
        check.positive_int(OWNER, "sample_size", self.sample_size)
        check.boolean(OWNER, "redraw", self.redraw)
        check.positive_int(OWNER, "n_clusters", self.n_clusters)
        params = check.patterns(OWNER, "params", self.params)
        check.choice(OWNER, "curvature", self.curvature, CURVATURES)
        if not self.auto_scale:
            try:
                check.finite_float(OWNER, "scale", self.scale, minimum=0.0, strict_minimum=True)
            except check.InvalidArgumentError:
                raise check.InvalidArgumentError(
                    f"{OWNER}(scale=...) must be a finite float > 0 (above the largest curvature eigenvalue plus "
                    f"damping) or 'auto', got {self.scale!r}"
                ) from None
        if not self.auto_damping:
            try:
                check.finite_float(OWNER, "damping", self.damping, minimum=0.0)
            except check.InvalidArgumentError:
                raise check.InvalidArgumentError(
                    f"{OWNER}(damping=...) must be a finite float >= 0 or 'auto', got {self.damping!r}"
                ) from None
        check_recursion_args(OWNER, 0.0, None, self.depth, self.repeats, self.tol)
        check.positive_int(OWNER, "chunk_size", self.chunk_size)
        check.integer(OWNER, "seed", self.seed)
        check.positive_int(OWNER, "memory_budget", self.memory_budget, allow_none=True)
        check.finite_float(OWNER, "time_budget", self.time_budget, minimum=0.0, strict_minimum=True, allow_none=True)
        if self.time_budget is not None:
            object.__setattr__(self, "time_budget", float(self.time_budget))
        # normal forms: one glob stays a string ("last_layer" is a keyword), several become a list
        object.__setattr__(self, "params", self.params if isinstance(self.params, str) else params)
        if not self.auto_damping:
            object.__setattr__(self, "damping", float(self.damping))
        if self.scale != "auto":
            object.__setattr__(self, "scale", float(self.scale))
        if self.tol is not None:
            object.__setattr__(self, "tol", float(self.tol))

    @property
    def auto_damping(self) -> bool:
        """Whether ``damping`` is set relative to the estimated curvature before each run."""
        return isinstance(self.damping, str) and self.damping == "auto"

    @property
    def auto_scale(self) -> bool:
        """Whether ``scale`` is estimated before each run."""
        return isinstance(self.scale, str) and self.scale == "auto"

    @property
    def task_needs(self) -> tuple[str, ...]:
        """Task methods beyond every task's that these options use (``resolve_task(needs=...)``):
        the GGN's ``logits`` and ``loss_from_outputs``, and the sampler's."""
        ggn = ("logits", "loss_from_outputs") if self.curvature == "ggn" else ()
        return (*ggn, *self.make_sampler().task_methods())

    def make_sampler(self) -> Sampler:
        """The :class:`~lightning_influence.lissa.Sampler` these options describe (the
        ``sampler`` instance itself when one was given)."""
        return make_sampler(self.sampler, sample_size=self.sample_size, redraw=self.redraw, n_clusters=self.n_clusters)

    def as_dict(self) -> dict[str, Any]:
        """The options as JSON-serialisable values, for manifests: a
        :class:`~lightning_influence.lissa.Sampler` instance is recorded by its ``describe()``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.sampler, Sampler):
            out["sampler"] = self.sampler.describe()
        if isinstance(self.params, list):
            out["params"] = list(self.params)
        return out
