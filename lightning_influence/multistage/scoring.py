"""Multi-stage scores from the two sides' vectors: stored candidates, chunking, normalisation.

The pre-training side of a candidate is ``c = P_pt ∇ℓ(z)`` and the query side
``q = P_ft ∇m(x)``, both per shared layer in the pre-training Kronecker eigenbasis and flattened
to ``[·, d_out·a_dim]``; a score is ``Σ_layers ⟨q, c⟩``. No Lightning import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from torch import Tensor

from ..ekfac.preconditioner import Preconditioner
from ..normalization import needs_train_norms, normalize_scores

__all__ = ["CandidateGradients", "CANDIDATE_CHUNK", "LayerGrads", "stored_chunks", "chunk_scores", "query_norms", "normalized"]

CANDIDATE_CHUNK = 4096
"""Candidates scored per matrix product when scoring stored :class:`CandidateGradients`."""

LayerGrads = dict[str, Tensor]
"""Layer name → ``Tensor[n, d_out·a_dim]`` (or ``[n, d_out, a_dim]`` before flattening)."""


@dataclass
class CandidateGradients:
    """Pre-training side, computed once and reused across queries.

    Attributes:
        ids: ``LongTensor[N]`` example ids (positions in the loader when the batches carry none).
        grads: pre-trained layer name → ``Tensor[N, d_out·a_dim]``: ``(G_pt + λ_pt I)⁻¹ ∇ℓ_pt(z, θ_pt)``
            in the pre-training Kronecker eigenbasis (``Q_Sᵀ · Q_A``; the standard basis when the
            pre-training stage has no factors), flattened row-major, in the scorer's compute dtype.
        seconds: wall time spent computing them.
    """

    ids: Tensor
    grads: LayerGrads
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def select(self, rows: Tensor) -> "CandidateGradients":
        """The candidates at row positions ``rows`` (``LongTensor[M]``)."""
        return CandidateGradients(self.ids[rows.to(self.ids.device)], {n: g[rows.to(g.device)] for n, g in self.grads.items()})


def stored_chunks(owner: str, cand: CandidateGradients, layers_used: Sequence[str]) -> Iterator[tuple[Tensor, LayerGrads]]:
    """``(ids[c], {layer: Tensor[c, P]})`` slices of at most :data:`CANDIDATE_CHUNK` stored candidates.

    Raises:
        ValueError: the candidates were computed for other layers than ``layers_used``.
    """
    if list(cand.grads) != list(layers_used):
        raise ValueError(
            f"{owner}: these CandidateGradients are for layers {list(cand.grads)}, this scorer uses {list(layers_used)}; "
            "compute them with this scorer's candidates()"
        )
    for s in range(0, len(cand), CANDIDATE_CHUNK):
        yield cand.ids[s : s + CANDIDATE_CHUNK], {n: g[s : s + CANDIDATE_CHUNK] for n, g in cand.grads.items()}


def chunk_scores(queries: LayerGrads, chunk: LayerGrads) -> LayerGrads:
    """Per-layer scores ``{layer: Tensor[Q, c]}`` of one candidate chunk (on the queries' device)."""
    return {n: q @ chunk[n].to(q.device).T for n, q in queries.items()}


def _weighted_squares(vectors: LayerGrads, pt: Preconditioner, power: float) -> Tensor:
    """``Σ_layers Σ v² · W^power`` per row, ``W = 1/(Λ_pt+λ_pt)`` flattened (``W = 1``: identity)."""
    out = 0.0
    for n, v in vectors.items():
        w = None if pt.identity else pt.inverse_scale(n).reshape(-1).pow(power)
        out = out + (v.pow(2) if w is None else v.pow(2) * w.to(v.device)).sum(1)
    return out


def query_norms(queries: LayerGrads, pt: Preconditioner) -> Tensor:
    """``‖P_ft ∇m‖²`` in the pre-training inner product, ``(P_ft ∇m)ᵀ P_pt (P_ft ∇m)``, of query
    vectors (:meth:`~lightning_influence.multistage.MultiStageScorer.query_gradients`), ``Tensor[Q]``."""
    return _weighted_squares(queries, pt, 1.0)


def candidate_norms(chunk: LayerGrads, pt: Preconditioner) -> Tensor:
    """Pre-training self-influence ``∇ℓᵀ P_pt ∇ℓ`` of candidate vectors ``c = P_pt ∇ℓ`` (in the
    eigenbasis ``c = W ⊙ R(∇ℓ)``, so ``Σ c² / W``), ``Tensor[c]``."""
    return _weighted_squares(chunk, pt, -1.0)


def normalized(parts: LayerGrads, chunk: LayerGrads, normalize: str, q_self: Optional[Tensor], pt: Preconditioner) -> tuple[Tensor, LayerGrads]:
    """Total and per-layer scores of one candidate chunk under ``normalize`` (per-layer terms
    share the total's denominators); ``parts`` from :func:`chunk_scores`, ``q_self`` from
    :func:`query_norms` when the variant needs it."""
    total = sum(parts.values())
    if not needs_train_norms(normalize):
        return total, parts
    t_self = candidate_norms(chunk, pt)
    return (normalize_scores(total, normalize, q_self, t_self),
            {n: normalize_scores(p, normalize, q_self, t_self) for n, p in parts.items()})
