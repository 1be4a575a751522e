"""Score normalisation: raw influence, unit-normalised (cosine) and relative influence.

Every EK-FAC scorer computes ``score(x, z) = ⟨u(x), v(z)⟩_P``, an inner product under the
damped inverse curvature ``P = (G + λI)⁻¹`` (single-stage: ``u = ∇m(x)``, ``v = ∇ℓ(z)``,
``score = uᵀ P v``). Next to it there are two squared norms in the same inner product:

* ``‖u‖²_P = uᵀ P u`` of the query (``Tensor[Q]``) and
* ``‖v‖²_P = vᵀ P v ≥ 0`` of the training example: its **self-influence** (``Tensor[N]``).

The variants (argument ``normalize=`` of ``InfluenceScorer.pairwise`` / ``search``,
``MultiStageScorer.pairwise`` / ``search`` and ``InfluenceIndex.scores`` / ``search``):

* ``"raw"``: ``score`` (the influence function; positive = ``z`` helps ``x``).
* ``"cosine"``: ``score / (‖u‖_P ‖v‖_P)``, in ``[-1, 1]`` (Cauchy–Schwarz): the cosine of the
  angle between query and training gradient under ``P`` (unit-normalised influence).
* ``"relative"``: ``score / ‖v‖²_P = score / self-influence(z)``: influence per unit of the
  example's own influence on itself (the issue's definition). Barshan et al. 2020 (RelatIF)
  divide by ``‖v‖_P`` instead: that ranks the training examples of each query exactly as
  ``"cosine"`` does (the two differ by the positive factor ``‖u‖_P`` per query), so it is not
  offered separately; ``"relative"`` penalises large-gradient examples more strongly.

Multi-stage scores are ``⟨P_ft ∇m(x), ∇ℓ(z)⟩_{P_pt}`` (``u = P_ft ∇m(x)``, ``P = P_pt``): the
norms are taken in the pre-training stage's inner product, so ``"cosine"`` is again a cosine
and ``‖v‖²_P`` the pre-training self-influence.

A zero norm (an example without gradient, e.g. all its tokens masked) has every score ``0``;
its normalised scores are defined as ``0``, never ``nan``. Sign conventions are unchanged.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from . import validation as check

__all__ = ["Normalize", "NORMALIZATIONS", "check_normalize", "needs_query_norms", "needs_train_norms", "normalize_scores"]

Normalize = Literal["raw", "cosine", "relative"]
NORMALIZATIONS: tuple[str, ...] = ("raw", "cosine", "relative")


def check_normalize(owner: str, value: object) -> str:
    """``value`` if it is one of :data:`NORMALIZATIONS`.

    Raises:
        InvalidArgumentError: any other value.
    """
    return check.choice(owner, "normalize", value, NORMALIZATIONS)


def needs_query_norms(normalize: str) -> bool:
    """Whether ``normalize`` divides by the queries' norms ``‖u‖_P``."""
    return normalize == "cosine"


def needs_train_norms(normalize: str) -> bool:
    """Whether ``normalize`` divides by the training examples' self-influence ``‖v‖²_P``."""
    return normalize != "raw"


def _safe_divide(scores: Tensor, denom: Tensor) -> Tensor:
    """``scores / denom`` in place where ``denom > 0``, ``0`` where it is ``0``."""
    positive = denom > 0
    scores.div_(torch.where(positive, denom, torch.ones_like(denom)))
    return scores.masked_fill_(~positive.expand_as(scores), 0.0)


def normalize_scores(
    scores: Tensor,
    normalize: str,
    query_self: Optional[Tensor] = None,
    train_self: Optional[Tensor] = None,
) -> Tensor:
    """Apply a variant to a block of raw scores, **in place**.

    Args:
        scores: raw scores ``Tensor[Q, n]`` (queries × training examples), float32 or float64.
        normalize: ``"raw"``, ``"cosine"`` or ``"relative"``.
        query_self: ``Tensor[Q]``, the queries' ``‖u‖²_P ≥ 0`` (needed by ``"cosine"``).
        train_self: ``Tensor[n]``, the training examples' self-influence ``‖v‖²_P ≥ 0``
            (needed by ``"cosine"`` and ``"relative"``).

    Returns:
        ``scores`` itself, divided as the variant says (``0`` where a norm is ``0``).

    Raises:
        ValueError: a norm the variant needs is missing or has the wrong length.
    """
    if normalize == "raw":
        return scores
    if train_self is None or train_self.shape != scores.shape[-1:]:
        raise ValueError(f"normalize={normalize!r} needs the training examples' self-influence [{scores.shape[-1]}]")
    t = train_self.to(device=scores.device, dtype=scores.dtype).clamp_min(0)
    if normalize == "relative":
        return _safe_divide(scores, t[None, :])
    if query_self is None or query_self.shape != scores.shape[:1]:
        raise ValueError(f"normalize='cosine' needs the queries' squared norms [{scores.shape[0]}]")
    q = query_self.to(device=scores.device, dtype=scores.dtype).clamp_min(0)
    return _safe_divide(scores, q.sqrt()[:, None] * t.sqrt()[None, :])
