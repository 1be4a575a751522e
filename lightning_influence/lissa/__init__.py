"""Sampled LiSSA (arXiv 2510.26776): batched inverse-curvature-vector products, samplers and
self-influence, on plain tensors and modules (no Lightning import).

Conventions: vectors are flat over the selected parameter subset (``Tensor[K, P]``); ``H`` is the
Hessian (or GGN) of the **mean** per-example loss over each step's mini-batch, per-example
losses being sums over tokens; self-influence ``∇ℓ(z)ᵀ(H + λI)⁻¹∇ℓ(z)`` is ``≥ 0`` for every curvature
and is not normalised by the dataset size. Memory is planned from a budget
(:mod:`~lightning_influence.lissa.budget`). Every entry point takes one :class:`LiSSAOptions`; self-influence comes back
as :class:`~lightning_influence.InfluenceScores` (``method="lissa"``), saved and loaded with
:func:`~lightning_influence.save_scores` / :func:`~lightning_influence.load_scores`.
"""

from .curvature import CURVATURES, CurvatureOperator
from ..memory import PeakMemory
from .options import LiSSAOptions
from .budget import LiSSAMemoryError, MemoryPlan, available_memory, plan_memory
from .recursion import LiSSADivergenceError, LiSSAResult, lissa_quadratic, lissa_recursion
from .samplers import FeatureSampler, LogitSampler, RandomSampler, SamplePool, Sampler, kmeans, make_sampler
from .self_influence import PoolLike, estimate_scale, lissa_inverse_hvp, self_influence

__all__ = [
    "LiSSAOptions",
    "lissa_inverse_hvp",
    "lissa_recursion",
    "lissa_quadratic",
    "LiSSAMemoryError",
    "MemoryPlan",
    "available_memory",
    "plan_memory",
    "self_influence",
    "estimate_scale",
    "LiSSAResult",
    "LiSSADivergenceError",
    "CurvatureOperator",
    "CURVATURES",
    "Sampler",
    "RandomSampler",
    "LogitSampler",
    "FeatureSampler",
    "SamplePool",
    "PoolLike",
    "kmeans",
    "make_sampler",
    "PeakMemory",
]
