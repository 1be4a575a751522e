"""Embeddings and exact k nearest neighbours, for narrowing influence candidates.

Multi-stage influence (:meth:`~lightning_influence.multistage.MultiStageScorer.narrowed`)
first keeps, for each query, its ``k`` nearest training examples in an embedding space and
computes training gradients only for those. This module holds the two pieces that need no
curvature:

* :class:`MeanPooledHiddenStates` — the default embedding: mean of a transformers model's last
  hidden states over non-padding tokens;
* :func:`knn_indices` — exact k nearest neighbours (cosine, euclidean or dot product), chunked
  over queries.

No Lightning import: usable on any ``nn.Module``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from . import validation as check
from .model_mode import eval_mode
from .ranking import top_k
from .task import split_ids

__all__ = ["EmbedFn", "Metric", "METRICS", "MeanPooledHiddenStates", "knn_indices", "find_transformers_model"]

EmbedFn = Callable[[Any], Tensor]
"""``batch → Tensor[B, D]``: one embedding row per example of a batch."""

Metric = Literal["cosine", "euclidean", "dot"]
METRICS: tuple[str, ...] = ("cosine", "euclidean", "dot")


def find_transformers_model(model: nn.Module) -> nn.Module:
    """The first transformers ``PreTrainedModel`` inside ``model`` (in ``model.modules()`` order,
    so ``model`` itself if it is one); ``model`` when there is none or transformers is absent."""
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover - transformers is a dependency
        return model
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)


class MeanPooledHiddenStates:
    """Default embedding: mean of the last hidden states over non-padding tokens.

    Args:
        model: a transformers causal LM, or a module that contains one (e.g. a LightningModule
            with a ``.model``); it is called with ``input_ids``, ``attention_mask`` and
            ``output_hidden_states=True``.
        layer: which entry of ``hidden_states`` to pool (``-1``: the last).

    Calling it on a causal-LM batch (a dict with ``input_ids`` and optionally
    ``attention_mask``, or ``(ids, dict)``) returns ``Tensor[B, hidden]``: float32, or the
    model's dtype when wider, computed without gradients with every submodule in eval mode
    (their train/eval flags are restored afterwards). Padding positions (``attention_mask == 0``)
    do not count; a row with no real token gives zeros.
    """

    def __init__(self, model: nn.Module, layer: int = -1) -> None:
        if not isinstance(model, nn.Module):
            raise check.InvalidArgumentError(f"MeanPooledHiddenStates(model=...) must be an nn.Module, got {type(model).__name__}")
        self.model = find_transformers_model(model)
        self.layer = check.integer("MeanPooledHiddenStates", "layer", layer)

    @torch.no_grad()
    def __call__(self, batch: Any) -> Tensor:
        _, fields = split_ids(batch)
        if not isinstance(fields, dict) or "input_ids" not in fields:
            raise ValueError("MeanPooledHiddenStates needs causal-LM dict batches with 'input_ids'; pass embed_fn= for other layouts")
        device = next(self.model.parameters()).device
        input_ids = fields["input_ids"].to(device)
        mask = fields.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
        with eval_mode(self.model):
            out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        h = out.hidden_states[self.layer]
        h = h.to(torch.promote_types(h.dtype, torch.float32))
        m = mask.to(h.dtype)[..., None]
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def knn_indices(queries: Tensor, candidates: Tensor, k: int, metric: Metric = "cosine", chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours of each query row among candidate rows.

    Args:
        queries: ``Tensor[Q, D]``.
        candidates: ``Tensor[N, D]``.
        k: neighbours per query (``≥ 1``; capped at ``N``).
        metric: ``"cosine"`` (largest cosine similarity), ``"euclidean"`` (smallest L2 distance)
            or ``"dot"`` (largest inner product).
        chunk_size: queries per similarity block (bounds memory at ``chunk_size × N``).

    Returns:
        ``(indices LongTensor[Q, k], values Tensor[Q, k])``, nearest first: row positions in
        ``candidates`` and their similarities (for ``"euclidean"``: distances, ascending), in
        the promoted dtype of the inputs (at least float32). Ranking goes through
        :func:`lightning_influence.ranking.top_k`, so a ``nan`` similarity (an embedding with a
        ``nan``) ranks last.
    """
    check.positive_int("knn_indices", "k", k)
    check.choice("knn_indices", "metric", metric, METRICS)
    check.positive_int("knn_indices", "chunk_size", chunk_size)
    if queries.dim() != 2 or candidates.dim() != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"knn_indices needs [Q, D] and [N, D] embeddings, got {tuple(queries.shape)} and {tuple(candidates.shape)}")
    k = min(k, candidates.shape[0])
    dtype = torch.promote_types(torch.promote_types(queries.dtype, candidates.dtype), torch.float32)
    q, c = queries.to(dtype), candidates.to(dtype)
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        c = torch.nn.functional.normalize(c, dim=1)
    idx, vals = [], []
    for s in range(0, q.shape[0], chunk_size):
        qb = q[s : s + chunk_size]
        euclidean = metric == "euclidean"
        best = top_k(torch.cdist(qb, c) if euclidean else qb @ c.T, k, largest=not euclidean)
        idx.append(best.ids)
        vals.append(best.scores)
    return torch.cat(idx), torch.cat(vals)
