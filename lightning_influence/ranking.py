"""The one top-k of the library: rankings of scores, NaN-safe, dense or streaming.

Non-finite scores never rank first: ``nan`` sorts below every number in both directions
(highest-first and lowest-first), so a poisoned example can not top a report.

* :func:`top_k` — the ``k`` best entries of each row of a dense ``Tensor[R, n]`` (or ``[n]``).
* :class:`StreamingTopK` — the same over column chunks that arrive one at a time, in
  ``O(R · k)`` memory whatever the number of columns: what the scorer and the index use to
  answer "the top 20 training examples for each query" over millions of examples.
* :class:`StreamingTopInfluences` — proponents and (optionally) opponents per query at once.
* :func:`top_examples` — ``[(id, score), ...]`` for tables and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["TopK", "TopInfluences", "top_k", "top_examples", "StreamingTopK", "StreamingTopInfluences"]


@dataclass
class TopK:
    """Top-``k`` of each row: ``scores[R, k]`` best first, ``ids[R, k]`` the ids (or column
    positions when no ids were given) of those columns; ``k`` is capped at the number of columns."""

    scores: Tensor
    ids: Tensor


@dataclass
class TopInfluences:
    """Per query, the most helpful (proponents) and, when asked, the most harmful (opponents)
    training examples.

    Attributes:
        query_ids: ``LongTensor[Q]``.
        ids: ``LongTensor[Q, k]`` proponents, highest score first (positive = helps the query).
        scores: ``Tensor[Q, k]`` their scores.
        opponent_ids: ``LongTensor[Q, k]`` opponents, lowest score first, or ``None``.
        opponent_scores: ``Tensor[Q, k]`` their scores, or ``None``.
    """

    query_ids: Tensor
    ids: Tensor
    scores: Tensor
    opponent_ids: Optional[Tensor] = None
    opponent_scores: Optional[Tensor] = None

    def as_rows(self) -> list[dict]:
        """One dict per query: ``{"query_id", "proponents": [(id, score)...], "opponents": [...]}``."""
        out = []
        for r, q in enumerate(self.query_ids.tolist()):
            row = {"query_id": int(q), "proponents": _pairs(self.ids[r], self.scores[r]), "opponents": []}
            if self.opponent_ids is not None:
                row["opponents"] = _pairs(self.opponent_ids[r], self.opponent_scores[r])
            out.append(row)
        return out


def _pairs(ids: Tensor, scores: Tensor) -> list[tuple[int, float]]:
    return [(int(i), float(s)) for i, s in zip(ids.tolist(), scores.tolist()) if s == s]


def _keyed(scores: Tensor, largest: bool) -> Tensor:
    """Scores with ``nan`` replaced so that it ranks last in the requested direction."""
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    return torch.nan_to_num(scores, nan=float("-inf") if largest else float("inf"))


def top_k(scores: Tensor, k: int, ids: Optional[Tensor] = None, largest: bool = True) -> TopK:
    """Top-``k`` entries of each row of ``scores`` (``Tensor[R, n]``; a ``Tensor[n]`` is one row
    and gives ``Tensor[k]`` results).

    Args:
        scores: the scores.
        k: how many per row (capped at ``n``).
        ids: ``LongTensor[n]`` ids of the columns (default: column positions).
        largest: highest first (``True``) or lowest first.
    """
    one_d = scores.dim() == 1
    s = scores[None] if one_d else scores
    k = min(int(k), s.shape[1])
    _, idx = torch.topk(_keyed(s, largest), k, dim=1, largest=largest)
    vals = s.gather(1, idx)
    col = idx if ids is None else ids.to(idx.device)[idx]
    return TopK(vals[0], col[0]) if one_d else TopK(vals, col)


def top_examples(ids: Tensor, scores: Tensor, k: int = 10, largest: bool = True) -> list[tuple[int, float]]:
    """The ``k`` best ``(id, score)`` pairs of ``scores: Tensor[n]``, best first; ``nan`` scores
    are left out."""
    t = top_k(scores, k, ids, largest)
    return _pairs(t.ids, t.scores)


class StreamingTopK:
    """Top-``k`` per row over column chunks, in ``O(rows · k)`` memory.

    ``update(chunk, ids)`` merges a ``Tensor[R, c]`` chunk (``ids``: ``LongTensor[c]``) into the
    running best; :meth:`result` gives the same :class:`TopK` as :func:`top_k` on the
    concatenated columns (ties aside).

    Args:
        rows: ``R``.
        k: how many per row.
        largest: highest first (``True``) or lowest first.
        device: where the running best lives.
    """

    def __init__(self, rows: int, k: int, largest: bool = True, device: Optional[torch.device | str] = None) -> None:
        self.rows, self.k, self.largest, self.device = int(rows), int(k), largest, device
        self._keys: Optional[Tensor] = None
        self._scores: Optional[Tensor] = None
        self._ids: Optional[Tensor] = None

    def update(self, chunk: Tensor, ids: Tensor) -> None:
        """Merge columns ``chunk: Tensor[R, c]`` with ids ``LongTensor[c]``."""
        if chunk.dtype in (torch.float16, torch.bfloat16):
            chunk = chunk.float()
        chunk = chunk.to(self.device) if self.device is not None else chunk
        ids = ids.to(chunk.device).reshape(1, -1).expand(chunk.shape[0], -1)
        keys = _keyed(chunk, self.largest)
        if self._keys is not None:
            keys = torch.cat([self._keys, keys], dim=1)
            chunk = torch.cat([self._scores, chunk.to(self._scores.dtype)], dim=1)
            ids = torch.cat([self._ids, ids], dim=1)
        _, idx = torch.topk(keys, min(self.k, keys.shape[1]), dim=1, largest=self.largest)
        self._keys, self._scores, self._ids = keys.gather(1, idx), chunk.gather(1, idx), ids.gather(1, idx)

    def result(self) -> TopK:
        """The running best: ``scores[R, k']`` and ``ids[R, k']`` with ``k' = min(k, columns seen)``."""
        if self._scores is None:
            return TopK(torch.empty(self.rows, 0), torch.empty(self.rows, 0, dtype=torch.long))
        return TopK(self._scores, self._ids)


class StreamingTopInfluences:
    """Per query, the ``k`` highest (proponents) and, with ``opponents``, the ``k`` lowest
    (opponents) scores over column chunks of training examples: two :class:`StreamingTopK`.

    Args:
        query_ids: ``LongTensor[Q]``, the rows.
        k: how many per query and direction.
        opponents: also keep the lowest scores.
    """

    def __init__(self, query_ids: Tensor, k: int, opponents: bool = False) -> None:
        self.query_ids = query_ids
        self._up = StreamingTopK(query_ids.shape[0], k, largest=True)
        self._down = StreamingTopK(query_ids.shape[0], k, largest=False) if opponents else None

    def update(self, scores: Tensor, ids: Tensor) -> None:
        """Merge ``scores: Tensor[Q, c]`` of the training examples ``ids: LongTensor[c]``."""
        self._up.update(scores, ids)
        if self._down is not None:
            self._down.update(scores, ids)

    def result(self) -> TopInfluences:
        """The proponents (and opponents) so far, on the CPU."""
        best = self._up.result()
        worst = self._down.result() if self._down is not None else None
        return TopInfluences(
            self.query_ids.cpu(), best.ids.cpu(), best.scores.cpu(),
            None if worst is None else worst.ids.cpu(), None if worst is None else worst.scores.cpu(),
        )
