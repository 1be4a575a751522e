"""Candidate narrowing (Ding et al. §4.3): score each query against its ``k`` nearest
pre-training examples in an embedding space only.

No Lightning import.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .. import validation as check
from ..retrieval import METRICS, EmbedFn, MeanPooledHiddenStates, Metric, knn_indices
from .scoring import chunk_scores

__all__ = ["NarrowedScores", "Narrowing"]


@dataclass
class NarrowedScores:
    """Scores restricted to each query's ``k`` nearest pre-training candidates.

    Time is saved when computing pre-training gradients for ``n_train - n_candidates``
    examples costs more than embedding the corpus (forward passes only, and reusable across
    query sets through ``train_embeddings=``) plus the k-NN search.

    Attributes:
        scores: ``Tensor[Q, k]`` multi-stage scores, descending per row (positive = helps).
        indices: ``LongTensor[Q, k]`` positions of those candidates in the pre-training dataset.
        ids: ``LongTensor[Q, k]`` their example ids (the positions when the batches carry none).
        n_train: size of the pre-training dataset.
        n_candidates: size of the union of all queries' neighbours (pre-training gradients computed).
        seconds: ``{"embed", "knn", "candidates", "queries", "scores", "total"}`` wall times.
        estimated_full_seconds: estimated time of :meth:`MultiStageScorer.pairwise` over all
            ``n_train`` candidates: candidate gradients at the measured per-example rate, plus
            the measured query and scoring times (no embedding or k-NN step then).
        seconds_saved: ``estimated_full_seconds - seconds["total"]`` (negative: narrowing cost more).
        query_ids: ``LongTensor[Q]`` ids of the queries (positions when their batches carry none).
    """

    scores: Tensor
    indices: Tensor
    ids: Tensor
    n_train: int
    n_candidates: int
    seconds: dict[str, float] = field(default_factory=dict)
    estimated_full_seconds: float = 0.0
    seconds_saved: float = 0.0
    query_ids: Optional[Tensor] = None

    def dense(self, fill: float = float("-inf")) -> Tensor:
        """``Tensor[Q, n_train]`` with the kept scores in place and ``fill`` elsewhere (for ranking metrics)."""
        out = torch.full((self.scores.shape[0], self.n_train), fill, dtype=self.scores.dtype, device=self.scores.device)
        return out.scatter_(1, self.indices.to(out.device), self.scores)


class Narrowing:
    """:meth:`narrowed` and :meth:`embeddings` of
    :class:`~lightning_influence.multistage.MultiStageScorer` (a mixin: ``self`` is the scorer)."""

    def narrowed(
        self,
        query_dataset: Dataset | Sequence[Any],
        train_dataset: Dataset | Sequence[Any],
        k: int,
        collate_fn: Optional[Callable[[list], Any]] = None,
        batch_size: int = 32,
        embed_fn: Optional[EmbedFn] = None,
        metric: Metric = "cosine",
        query_embed_fn: Optional[EmbedFn] = None,
        train_embeddings: Optional[Tensor] = None,
    ) -> NarrowedScores:
        """Scores for each query's ``k`` nearest pre-training candidates only (the paper's §4.3).

        Embeds every pre-training example and query with ``embed_fn`` (default:
        :class:`~lightning_influence.retrieval.MeanPooledHiddenStates` of the pre-trained model),
        finds each query's ``k`` nearest candidates
        (:func:`~lightning_influence.retrieval.knn_indices`), computes the pre-training side only
        for the union of those candidates, and scores each query against its own ``k``. The kept
        scores equal the corresponding entries of :meth:`pairwise`.

        Args:
            query_dataset: map-style dataset of queries (items as the loaders would yield them,
                e.g. :class:`~lightning_influence.IndexedDataset`).
            train_dataset: map-style dataset of pre-training examples (likewise).
            k: candidates per query (``≥ 1``; capped at ``len(train_dataset)``).
            collate_fn: how batches are built from items of both datasets.
            batch_size: examples per batch (``≥ 1``).
            embed_fn: ``batch → Tensor[B, D]`` for pre-training batches.
            metric: neighbour metric (see :func:`~lightning_influence.retrieval.knn_indices`).
            query_embed_fn: ``batch → Tensor[B, D]`` for query batches (default: ``embed_fn``).
            train_embeddings: ``Tensor[N, D]`` precomputed embeddings of ``train_dataset`` (an
                index built once and reused across query sets); skips embedding the corpus.

        Returns:
            :class:`NarrowedScores`, with timings and the estimated time saved. Ids of examples
            whose batches carry none are their positions in the datasets.
        """
        owner = f"{self.OWNER}.narrowed"
        check.map_dataset(owner, "query_dataset", query_dataset)
        check.map_dataset(owner, "train_dataset", train_dataset)
        check.positive_int(owner, "k", k)
        check.positive_int(owner, "batch_size", batch_size)
        check.choice(owner, "metric", metric, METRICS)
        n_train = len(train_dataset)
        if train_embeddings is not None and (not isinstance(train_embeddings, Tensor) or train_embeddings.dim() != 2 or train_embeddings.shape[0] != n_train):
            shape = tuple(train_embeddings.shape) if isinstance(train_embeddings, Tensor) else type(train_embeddings).__name__
            raise check.InvalidArgumentError(f"{owner}(train_embeddings=...) must be a Tensor[len(train_dataset)={n_train}, D], got {shape}")
        k = min(k, n_train)
        embed_fn = embed_fn or MeanPooledHiddenStates(self.pretrained_model)
        query_embed_fn = query_embed_fn or embed_fn
        loader = lambda ds: DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)  # noqa: E731
        t_start = time.perf_counter()
        train_emb = self.embeddings(loader(train_dataset), embed_fn) if train_embeddings is None else train_embeddings.detach().cpu()
        query_emb = self.embeddings(loader(query_dataset), query_embed_fn)
        t_embed = time.perf_counter() - t_start
        t0 = time.perf_counter()
        nn_idx, _ = knn_indices(query_emb, train_emb, k, metric)
        t_knn = time.perf_counter() - t0
        union = torch.unique(nn_idx)  # sorted dataset positions
        cand = self._candidates(loader(Subset(train_dataset, union.tolist())), default_ids=union)
        q_ids, q = self.query_gradients(loader(query_dataset))
        t0 = time.perf_counter()
        # [Q, n_union] by one matmul per layer, then each query's own k columns (a gather of
        # [Q, k, P] gradients would move far more memory than this product)
        union_scores = sum(chunk_scores(q, cand.grads).values())
        scores = union_scores.gather(1, torch.searchsorted(union, nn_idx).to(union_scores.device))
        order = torch.argsort(scores, dim=1, descending=True)
        scores = scores.gather(1, order)
        indices = nn_idx.gather(1, order.to(nn_idx.device))
        ids = cand.ids[torch.searchsorted(union, indices)]
        t_scores = time.perf_counter() - t0
        total = time.perf_counter() - t_start
        estimated_full = cand.seconds / max(len(union), 1) * n_train + self.query_seconds + t_scores
        seconds = {"embed": t_embed, "knn": t_knn, "candidates": cand.seconds, "queries": self.query_seconds, "scores": t_scores, "total": total}
        return NarrowedScores(scores, indices, ids, n_train, int(len(union)), seconds, estimated_full, estimated_full - total, q_ids)

    def embeddings(self, loader: Iterable[Any], embed_fn: Optional[EmbedFn] = None) -> Tensor:
        """``Tensor[N, D]`` (CPU) embeddings of every example of ``loader`` with ``embed_fn``
        (default: :class:`~lightning_influence.retrieval.MeanPooledHiddenStates` of the
        pre-trained model), e.g. to build the candidate index once and pass it to
        :meth:`narrowed` as ``train_embeddings``."""
        embed_fn = embed_fn or MeanPooledHiddenStates(self.pretrained_model)
        return torch.cat([embed_fn(b).detach().cpu() for b in loader])
