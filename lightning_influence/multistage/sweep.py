"""Multi-stage scores for several damping pairs from one gradient pass per side.

No Lightning import.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from .. import validation as check
from ..ekfac.preconditioner import Preconditioner, StageDamping
from ..scores import InfluenceScores
from .pairing import finetuned_damping

__all__ = ["DampingSweep", "damping_key"]


def damping_key(value: StageDamping) -> Any:
    """Hashable form of a damping for :meth:`DampingSweep.damping_sweep` keys (a mapping: ``repr(sorted(items))``)."""
    return repr(sorted(value.items())) if isinstance(value, Mapping) else value


class DampingSweep:
    """:meth:`damping_sweep` of :class:`~lightning_influence.multistage.MultiStageScorer` (a mixin:
    ``self`` is the scorer)."""

    def damping_sweep(
        self,
        query_loader: Iterable[Any],
        train_loader: Iterable[Any],
        dampings: Sequence[tuple[StageDamping, StageDamping]],
    ) -> dict[tuple[Any, Any], InfluenceScores]:
        """Scores for several ``(damping_pt, damping_ft)`` pairs from one gradient pass per side.

        The per-example gradients of both sides are computed once and kept, rotated into each
        stage's eigenbasis (memory: ``(n_query + n_train) × Σ_layers d_out·a_dim`` values in
        :attr:`dtype`); per pair, only the eigenvalue scaling and the queries' change of basis
        are repeated, with preconditioners built by
        :meth:`~lightning_influence.ekfac.preconditioner.Preconditioner.with_damping` (this
        scorer's own preconditioners are never changed).

        Args:
            dampings: ``(damping_pt, damping_ft)`` pairs, each as accepted by the constructor.

        Returns:
            ``{(damping_pt, damping_ft): InfluenceScores}``, each equal to :meth:`pairwise` of a
            scorer built with those dampings (a mapping damping is keyed by
            ``repr(sorted(mapping.items()))``).
        """
        owner = f"{self.OWNER}.damping_sweep"
        pairs = []
        for pair in dampings:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise check.InvalidArgumentError(f"{owner}(dampings=...) must hold (damping_pt, damping_ft) pairs, got {pair!r}")
            dp = check.stage_damping(owner, "damping_pt", pair[0], self.preconditioner_pt.has_factors)
            df = check.stage_damping(owner, "damping_ft", pair[1], self.preconditioner_ft.has_factors)
            pairs.append((self._with_damping("damping_pt", self.preconditioner_pt, dp),
                          self._with_damping("damping_ft", self.preconditioner_ft, df),
                          (damping_key(dp), damping_key(df))))
        t_ids, t_rot = [], {n: [] for n in self.layers_used}
        for bid, rotated in self._gradients("pt", train_loader, rotate_with=self.preconditioner_pt):
            t_ids.append(bid)
            for n, r in rotated.items():
                t_rot[n].append(r)
        if not t_ids:
            raise ValueError(f"{owner}: the pre-training loader yielded no batch")
        train_ids, train_rot = torch.cat(t_ids), {n: torch.cat(v) for n, v in t_rot.items()}
        q_ids, q_rot = self._query_pass(query_loader, self.preconditioner_ft, lambda n, r: r)
        out: dict[tuple[Any, Any], InfluenceScores] = {}
        for pt, ft, key in pairs:
            total = sum(self._query_side(n, q_rot[n], ft) @ self._candidate_side(n, train_rot[n], pt).T for n in self.layers_used)
            out[key] = InfluenceScores("multistage", train_ids, query_ids=q_ids, pairwise=total, options=self._options("raw", pt, ft))
        return out

    def _with_damping(self, arg: str, base: Preconditioner, damping: StageDamping) -> Preconditioner:
        """``base`` with another damping (a new preconditioner; ``base`` is unchanged)."""
        if arg == "damping_ft":
            damping = finetuned_damping(self.layer_pairs, damping)
        try:
            return base.with_damping(damping)
        except ValueError as e:
            raise check.InvalidArgumentError(f"{self.OWNER}.damping_sweep({arg}={damping!r}): {e}") from e
