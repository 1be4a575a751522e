"""Per-token influence for sequence models, on demand for a few training sequences.

For a query ``x`` and a training sequence ``z``, the score is a sum over tracked layers of
``⟨P ∇m(x), Σ_t ds_t a_tᵀ⟩`` where ``P = (G + λI)⁻¹`` and ``ds_t``, ``a_t`` are the layer's
output gradient and input at position ``t`` of ``z``. Its per-token scores are the terms of
that sum, one per position:

    ``score_t(x, z) = Σ_layers ds_tᵀ (P ∇m(x)) a_t``

so the per-token scores of a sequence add up to its (exact) sequence score. Position ``t``'s
term is the influence carried by that position's activations and output gradients (the
gradient of the whole sequence's loss at position ``t``, which includes later tokens' losses
through attention): the token-wise decomposition kronfluence also reports. Padding positions
score 0. Costs one gradient pass over the chosen sequences and ``Q·T·d_out·a_dim`` per layer and
sequence: meant for the top-k sequences that a search returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch
from torch import Tensor

from ..ekfac.layer_data import iter_layer_data

if TYPE_CHECKING:  # pragma: no cover
    from .search import InfluenceIndex

__all__ = ["TokenScores", "token_scores"]


@dataclass
class TokenScores:
    """Per-token scores of training sequences for each query.

    Attributes:
        query_ids: ``LongTensor[Q]``.
        train_ids: ``LongTensor[n]``.
        scores: ``Tensor[Q, n, T]`` (``T`` the longest sequence; 0 on padding). Positive means
            the position's contribution helps the query, as for sequence scores.
        mask: ``BoolTensor[n, T]``, True on real tokens.
    """

    query_ids: Tensor
    train_ids: Tensor
    scores: Tensor
    mask: Tensor

    def sequence_scores(self) -> Tensor:
        """``Tensor[Q, n]``: the sum over positions (the exact sequence scores)."""
        return self.scores.sum(dim=-1)

    def top_tokens(self, query: int, train: int, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` positions of training sequence number ``train`` (row, not id) with the
        highest scores for query row ``query``: ``[(position, score), ...]``."""
        s = self.scores[query, train].masked_fill(~self.mask[train], float("-inf"))
        vals, pos = torch.topk(s, min(k, int(self.mask[train].sum())))
        return [(int(p), float(v)) for p, v in zip(pos.tolist(), vals.tolist())]


def token_scores(index: "InfluenceIndex", query_loader: Iterable[Any], train_loader: Iterable[Any]) -> TokenScores:
    """Per-token scores of every sequence of ``train_loader`` for every query of ``query_loader``.

    Args:
        index: an :class:`~lightning_influence.index.InfluenceIndex` bound to the model (its
            factors and damping precondition the queries; its vectors are not used, so the
            result is exact whatever the compression).
        query_loader: query batches.
        train_loader: the training sequences to decompose (e.g. ``Subset(dataset, top_ids)``).

    Returns:
        :class:`TokenScores`.

    Raises:
        ValueError: a layer is called several times per forward (its positions are not the
            sequence's), or a loader yields no batch.
    """
    index._require_model("token_scores")
    model, tracked, task = index.model, index.tracked, index.task
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    q_ids, pre = [], {n: [] for n in index.layer_names}
    for ids, grads in index.query_gradients(query_loader):
        q_ids.append(ids)
        for n in index.layer_names:
            pre[n].append(index.transform.layers[n].preconditioned(grads.pop(n)))
    if not q_ids:
        raise ValueError("token_scores: the query loader yielded no batch")
    pre = {n: torch.cat(v) for n, v in pre.items()}
    rows, masks, t_ids = [], [], []
    for ids, data in iter_layer_data(model, train_loader, tracked, task, "loss", progress=index.progress, desc="token scores"):
        b, t = ids.shape[0], None
        total: Optional[Tensor] = None
        mask: Optional[Tensor] = None
        for n in index.layer_names:
            io = data.pop(n)
            if t is None:
                t = io.a.shape[1]
            elif io.a.shape[1] != t:
                raise ValueError(f"token_scores: layer {n!r} has {io.a.shape[1]} positions per example, another layer {t}: "
                                 "per-token scores need layers called once per position")
            m = pre[n].to(dtype)
            s = torch.einsum("bto,qoi,bti->qbt", io.ds.to(dtype), m, io.a.to(dtype))
            total = s if total is None else total + s
            if mask is None and io.mask is not None:
                mask = io.mask
        rows.append(total)
        masks.append(mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=total.device))
        t_ids.append(ids)
    if not rows:
        raise ValueError("token_scores: the training loader yielded no batch")
    longest = max(r.shape[-1] for r in rows)
    scores = torch.cat([torch.nn.functional.pad(r, (0, longest - r.shape[-1])) for r in rows], dim=1)
    mask = torch.cat([torch.nn.functional.pad(m, (0, longest - m.shape[-1])) for m in masks], dim=0)
    return TokenScores(torch.cat(q_ids), torch.cat(t_ids), scores.cpu(), mask.cpu().bool())
