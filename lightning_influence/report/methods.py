"""One name and one meaning per method, used by the table, the HTML report and the docs.

Every method's per-example score is called **self-influence**, every query/training pair's score
**train-test influence** (positive = the training example lowers the query's loss: it helps);
what the number *is* differs per method and is said here once.

Readable forms of a score (``scores=`` of the report):

* **raw**: the number the method computed (units below; not normalised by dataset size);
* **normalised**: the raw score divided by the median absolute score of the same ranking (all
  training examples for self-influence; one query's row for train-test influence): ``×12`` means
  twelve times the typical example, comparable across methods whose raw scales differ by 10⁴;
* **rank**: the share of examples ranked at least as high: ``top 0.1%`` is among the highest
  thousandth (for opponents, counted from the bottom).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
from torch import Tensor

__all__ = ["MethodInfo", "METHODS", "method_info", "SCORE_FORMS", "ScoreForm", "robust_scale", "normalised", "rank_text"]

ScoreForm = Literal["raw", "normalised", "rank", "all"]
SCORE_FORMS: tuple[str, ...] = ("raw", "normalised", "rank", "all")


@dataclass(frozen=True)
class MethodInfo:
    """How a method is named and what its numbers mean.

    Attributes:
        key: the ``method`` recorded in artifacts (``"ekfac"``, ``"z0"``, ...).
        title: the name shown everywhere (``"EK-FAC"``, ``"Z0-Inf"``, ...).
        self_influence: what a self-influence score is (``None``: the method has none).
        train_test: what a train-test score is (``None``: the method has none).
    """

    key: str
    title: str
    self_influence: Optional[str]
    train_test: Optional[str]


_GRAD = "g is the gradient of the example's loss (summed over its tokens) with respect to the tracked parameters"

METHODS: dict[str, MethodInfo] = {
    "ekfac": MethodInfo(
        "ekfac", "EK-FAC",
        "g·(F + λI)⁻¹·g, where " + _GRAD + " and F is EK-FAC's Kronecker-factored, eigenvalue-corrected Fisher "
        "(Gauss-Newton) of the training loss, damped by λ. ≥ 0. Large: the model had to bend to fit this example "
        "(atypical, memorised or mislabeled). Units: squared loss gradient per unit curvature; not divided by "
        "the dataset size.",
        "g_query·(F + λI)⁻¹·g_train: how much up-weighting the training example lowers the query's loss, to "
        "first order. Positive: it helps the query; negative: it hurts.",
    ),
    "lissa": MethodInfo(
        "lissa", "LiSSA",
        "g·(H + λI)⁻¹·g, where " + _GRAD + " and H is the Hessian (or Gauss-Newton matrix) of the mean training "
        "loss, inverted approximately by sampled LiSSA. ≥ 0: the estimate is a sum of non-negative terms whatever the "
        "curvature (where H + λI is not positive definite along an example's gradient, the report warns). Large: atypical, "
        "memorised or mislabeled. Same units as EK-FAC's; not divided by the dataset size.",
        "g_query·(H + λI)⁻¹·g_train. Positive: the training example helps the query.",
    ),
    "z0": MethodInfo(
        "z0", "Z0-Inf",
        "the example's mean loss across the recorded checkpoints (no gradients). ≥ 0. Large: the model "
        "fitted it late or never during training (hard, atypical or mislabeled examples).",
        "Σ over checkpoints of ĝ(query)·ĝ(train), with gradients estimated from how the losses changed between "
        "nearby checkpoints (zeroth order, like TracIn without backward passes). Positive: the training "
        "example's loss fell together with the query's (it helps).",
    ),
    "ekfac-index": MethodInfo(
        "ekfac-index", "EK-FAC index",
        "as EK-FAC's, from the index's stored training gradients (exact, or a random projection of them).",
        "g_query·(F + λI)⁻¹·g_train with EK-FAC's F, the training gradients read from the index (exact, or "
        "an unbiased estimate through a random projection). Positive: the training example helps the query.",
    ),
    "trajectory": MethodInfo(
        "trajectory", "Trajectory EK-FAC",
        "Σ over the run's segments of w_k · g_k·(F_k + λI)⁻¹·g_k at each segment's end weights. ≥ 0.",
        "Σ over the run's segments of w_k · g_query,k·(F_k + λI)⁻¹·g_train,k. Positive: the training example "
        "helps the query.",
    ),
    "multistage": MethodInfo(
        "multistage", "Multi-stage EK-FAC",
        None,
        "influence of a pre-training example on a fine-tuned model's query, through the pre-training and "
        "fine-tuning curvatures (EK-FAC each). Positive: the pre-training example helps the query.",
    ),
}
"""``method`` key → :class:`MethodInfo`."""


Z0_SELF_INFLUENCE = {
    "mean_loss": METHODS["z0"].self_influence,
    "variance": "the variance of the example's loss across the recorded checkpoints (loss², no gradients). ≥ 0. "
                "Large: its loss moved a lot while the model trained (hard, atypical or mislabeled examples).",
    "finite_difference": "Σ over checkpoints of ‖ĝ‖², with the example's gradient ĝ estimated from how its loss "
                         "changed between nearby checkpoints (finite differences, no backward passes). ≥ 0.",
    "least_squares": "Σ over checkpoints of ‖ĝ‖², with the example's gradient ĝ fitted by least squares to how its "
                     "loss changed between nearby checkpoints (no backward passes). ≥ 0.",
}
"""Z0-Inf's self-influence estimators (``Z0Influence(self_influence=...)``) → what the score is."""


def method_info(method: str, estimator: Optional[str] = None) -> MethodInfo:
    """The :class:`MethodInfo` of ``method`` (an unknown method gets its key as title); for
    ``"z0"``, ``estimator`` (the scores' ``options["estimator"]``) picks the self-influence text."""
    key = method.split()[0] if method else method
    info = METHODS.get(key) or MethodInfo(key, key, "the method's per-example score (higher: more influential).",
                                          "the method's pairwise score (positive: the training example helps).")
    if key == "z0" and estimator in Z0_SELF_INFLUENCE:
        info = replace(info, self_influence=Z0_SELF_INFLUENCE[estimator])
    return info


def robust_scale(scores: Tensor) -> Optional[float]:
    """Median absolute finite score (the middle two averaged for an even count; the mean absolute
    score when the median is 0); ``None`` when every score is zero or non-finite."""
    s = scores.detach().double().reshape(-1)
    s = s[torch.isfinite(s)].abs()
    if not s.numel():
        return None
    n = s.numel()
    median = 0.5 * float(torch.kthvalue(s, (n + 1) // 2).values + torch.kthvalue(s, n // 2 + 1).values)  # mean of the middle two
    for v in (median, float(s.mean())):
        if v > 0:
            return v
    return None


def normalised(score: float, scale: Optional[float]) -> Optional[float]:
    """``score / scale`` (see :func:`robust_scale`), ``None`` without a scale or for non-finite scores."""
    if scale is None or not math.isfinite(score):
        return None
    return score / scale


def rank_text(rank: int, n: int, bottom: bool = False) -> str:
    """``"top 0.07%"``: the share of ``n`` examples ranked at least as high as 1-based ``rank``."""
    share = 100.0 * rank / max(n, 1)
    digits = 0 if share >= 10 else 1 if share >= 1 else 2
    return f"{'bottom' if bottom else 'top'} {share:.{digits}f}%"
