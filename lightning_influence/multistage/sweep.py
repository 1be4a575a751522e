"""Multi-stage scores for several damping pairs from one gradient pass per side.

No Lightning import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch

from .. import validation as check
from ..ekfac.preconditioner import Preconditioner, StageDamping
from ..scores import InfluenceScores
from .pairing import finetuned_damping

if TYPE_CHECKING:  # pragma: no cover
    from .scorer import MultiStageScorer

__all__ = ["sweep_dampings", "damping_key"]


def damping_key(value: StageDamping) -> Any:
    """Hashable form of a damping for :func:`sweep_dampings` keys (a mapping: ``repr(sorted(items))``)."""
    return repr(sorted(value.items())) if isinstance(value, Mapping) else value


def _with_damping(scorer: "MultiStageScorer", arg: str, base: Preconditioner, damping: StageDamping) -> Preconditioner:
    """``base`` with another damping (a new preconditioner; ``base`` is unchanged)."""
    if arg == "damping_ft":
        damping = finetuned_damping(scorer.layer_pairs, damping)
    try:
        return base.with_damping(damping)
    except ValueError as e:
        raise check.InvalidArgumentError(f"{scorer.OWNER}.damping_sweep({arg}={damping!r}): {e}") from e


def sweep_dampings(
    scorer: "MultiStageScorer",
    query_loader: Iterable[Any],
    train_loader: Iterable[Any],
    dampings: Sequence[tuple[StageDamping, StageDamping]],
) -> dict[tuple[Any, Any], InfluenceScores]:
    """See :meth:`~lightning_influence.multistage.MultiStageScorer.damping_sweep`."""
    owner = f"{scorer.OWNER}.damping_sweep"
    pairs = []
    for pair in dampings:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise check.InvalidArgumentError(f"{owner}(dampings=...) must hold (damping_pt, damping_ft) pairs, got {pair!r}")
        dp = check.stage_damping(owner, "damping_pt", pair[0], scorer.preconditioner_pt.has_factors)
        df = check.stage_damping(owner, "damping_ft", pair[1], scorer.preconditioner_ft.has_factors)
        pairs.append((_with_damping(scorer, "damping_pt", scorer.preconditioner_pt, dp),
                      _with_damping(scorer, "damping_ft", scorer.preconditioner_ft, df),
                      (damping_key(dp), damping_key(df))))
    t_ids, t_rot = [], {n: [] for n in scorer.layers_used}
    for bid, rotated in scorer._gradients("pt", train_loader, rotate_with=scorer.preconditioner_pt):
        t_ids.append(bid)
        for n, r in rotated.items():
            t_rot[n].append(r)
    if not t_ids:
        raise ValueError(f"{owner}: the pre-training loader yielded no batch")
    train_ids, train_rot = torch.cat(t_ids), {n: torch.cat(v) for n, v in t_rot.items()}
    q_ids, q_rot = scorer._query_pass(query_loader, scorer.preconditioner_ft, lambda n, r: r)
    out: dict[tuple[Any, Any], InfluenceScores] = {}
    for pt, ft, key in pairs:
        total = sum(scorer._query_side(n, q_rot[n], ft) @ scorer._candidate_side(n, train_rot[n], pt).T for n in scorer.layers_used)
        out[key] = InfluenceScores("multistage", train_ids, query_ids=q_ids, pairwise=total, options=scorer._options("raw", pt, ft))
    return out
