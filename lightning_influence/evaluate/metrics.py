"""How good are the scores on your data? Three answers, with metrics from torchmetrics.

* :func:`mislabel_detection`: do the highest self-influence scores find the examples known to
  be mislabeled (AUROC, average precision, the share found in the top p%)?
* :func:`fact_tracing`: do the highest train-test scores retrieve the training examples known to
  be a query's source (mean reciprocal rank, recall@k)?
* :func:`linear_datamodeling_score`: do sums of train-test scores over random training subsets
  rank the losses of models retrained on those subsets (LDS, Park et al. 2023)?

Sign convention: higher self-influence = more suspicious; a positive train-test score means the
training example lowers the query's loss (helps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.classification import binary_auroc, binary_average_precision
from torchmetrics.functional.retrieval import retrieval_recall, retrieval_reciprocal_rank

from ..ranking import top_k

__all__ = [
    "MislabelDetection",
    "mislabel_detection",
    "FactTracing",
    "fact_tracing",
    "LinearDatamodelingScore",
    "linear_datamodeling_score",
    "spearman",
]


def _finite_ranked(scores: Tensor) -> Tensor:
    """``float64`` scores with non-finite entries below every finite one (never ranked high)."""
    s = scores.detach().double().reshape(-1).cpu()
    bad = ~torch.isfinite(s)
    if bad.any():
        floor = float(s[~bad].min()) - 1.0 if (~bad).any() else 0.0
        s = s.masked_fill(bad, floor)
    return s


@dataclass
class MislabelDetection:
    """How well self-influence finds known mislabeled examples.

    Attributes:
        auroc: area under the ROC curve (0.5 = random, 1 = every mislabeled example ranks above
            every clean one).
        average_precision: area under the precision-recall curve (random = the mislabeled share).
        found: top fraction ``p`` → share of all mislabeled examples among the ``⌊p·n⌋`` highest.
        precision: top fraction ``p`` → share of the ``⌊p·n⌋`` highest that are mislabeled.
        n: examples scored.
        n_mislabeled: how many are mislabeled.
    """

    auroc: float
    average_precision: float
    found: dict[float, float]
    precision: dict[float, float]
    n: int
    n_mislabeled: int

    def as_dict(self) -> dict[str, Any]:
        """Flat dict: ``auroc``, ``average_precision``, ``found@p``, ``precision@p``, counts."""
        out: dict[str, Any] = {"auroc": self.auroc, "average_precision": self.average_precision, "n": self.n,
                               "n_mislabeled": self.n_mislabeled}
        out.update({f"found@{p:g}": v for p, v in self.found.items()})
        out.update({f"precision@{p:g}": v for p, v in self.precision.items()})
        return out


def mislabel_detection(scores: Tensor, mislabeled: Tensor, fractions: Sequence[float] = (0.01, 0.05, 0.1)) -> MislabelDetection:
    """Evaluate self-influence as a mislabel detector.

    Args:
        scores: ``Tensor[n]`` self-influence (higher = more suspicious); non-finite scores rank
            below every finite one.
        mislabeled: ``BoolTensor[n]`` (or 0/1), True for the examples known to be mislabeled,
            in the order of ``scores``.
        fractions: the top shares ``p`` (0 < p ≤ 1) at which to count what was found.

    Returns:
        :class:`MislabelDetection`.

    Raises:
        ValueError: shapes differ, or ``mislabeled`` is all True or all False (no ranking to judge).
    """
    s = _finite_ranked(scores)
    y = torch.as_tensor(mislabeled).reshape(-1).cpu().bool()
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.numel()} entries, mislabeled {y.numel()}; give one flag per score")
    n, m = int(s.numel()), int(y.sum())
    if m == 0 or m == n:
        raise ValueError(f"mislabeled must mark some but not all examples (got {m} of {n})")
    found, precision = {}, {}
    for p in fractions:
        if not 0 < p <= 1:
            raise ValueError(f"fractions must lie in (0, 1], got {p!r}")
        k = max(1, int(p * n))
        hits = int(y[top_k(s, k).ids].sum())
        found[float(p)] = hits / m
        precision[float(p)] = hits / k
    # torchmetrics reads scores outside [0, 1] as logits and squashes them with a sigmoid, which
    # ties every large score at 1.0 in float32; both metrics depend only on the order, so pass
    # dense ranks scaled into [0, 1] (ties stay ties)
    dense = torch.unique(s, return_inverse=True)[1].double()
    p = dense / max(float(dense.max()), 1.0)
    return MislabelDetection(
        auroc=float(binary_auroc(p, y.long())),
        average_precision=float(binary_average_precision(p, y.long())),
        found=found, precision=precision, n=n, n_mislabeled=m,
    )


@dataclass
class FactTracing:
    """How well train-test scores retrieve each query's known sources.

    Attributes:
        mrr: mean over queries of 1 / (rank of the first relevant training example).
        recall: ``k`` → mean over queries of the share of its relevant examples in its top ``k``.
        per_query_rr: ``Tensor[Q']`` reciprocal rank of each evaluated query.
        n_queries: queries evaluated (those with at least one relevant example).
        skipped: queries without any relevant example (left out of the means).
    """

    mrr: float
    recall: dict[int, float]
    per_query_rr: Tensor = field(repr=False)
    n_queries: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Flat dict: ``mrr``, ``recall@k``, ``n_queries``, ``skipped``."""
        return {"mrr": self.mrr, **{f"recall@{k}": v for k, v in self.recall.items()}, "n_queries": self.n_queries,
                "skipped": self.skipped}


def fact_tracing(scores: Tensor, relevant: Tensor, ks: Sequence[int] = (1, 10)) -> FactTracing:
    """Evaluate train-test scores as a retrieval of each query's sources.

    Args:
        scores: ``Tensor[Q, N]``, higher = ranked earlier (a positive score helps the query).
            Non-finite scores rank last.
        relevant: ``BoolTensor[Q, N]``: True where the training example is a source of the query.
        ks: cut-offs for recall@k.

    Returns:
        :class:`FactTracing`; queries with no relevant example are skipped (counted in ``skipped``).

    Raises:
        ValueError: shapes differ, or no query has a relevant example.
    """
    if scores.dim() != 2 or tuple(scores.shape) != tuple(relevant.shape):
        raise ValueError(f"scores and relevant must both be [Q, N], got {tuple(scores.shape)} and {tuple(relevant.shape)}")
    rel = relevant.detach().cpu().bool()
    rows = [q for q in range(rel.shape[0]) if rel[q].any()]
    if not rows:
        raise ValueError("no query has a relevant training example; nothing to evaluate")
    rr = torch.stack([retrieval_reciprocal_rank(_finite_ranked(scores[q]), rel[q]) for q in rows]).double()
    recall = {int(k): float(torch.stack([retrieval_recall(_finite_ranked(scores[q]), rel[q], top_k=int(k)) for q in rows]).double().mean())
              for k in ks}
    return FactTracing(mrr=float(rr.mean()), recall=recall, per_query_rr=rr, n_queries=len(rows),
                       skipped=int(rel.shape[0]) - len(rows))


@dataclass
class LinearDatamodelingScore:
    """Linear datamodeling score.

    Attributes:
        lds: mean over queries of the Spearman correlation, over the retrained subsets, between
            the summed scores of each subset and the retrained model's negative query loss.
        se: its standard error over queries (sample std / √Q').
        per_query: ``Tensor[Q]`` each query's correlation (``nan`` where it was left out).
        n_subsets: retrained subsets ``M``.
        constant: queries whose prediction or loss was constant over the subsets.
    """

    lds: float
    se: float
    per_query: Tensor = field(repr=False)
    n_subsets: int = 0
    constant: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Flat dict: ``lds``, ``se``, ``n_subsets``, ``constant``."""
        return {"lds": self.lds, "se": self.se, "n_subsets": self.n_subsets, "constant": self.constant}


def _pairwise_matrix(scores: Any) -> Tensor:
    """``Tensor[Q, N]`` from a tensor or an InfluenceScores whose columns are training positions."""
    pairwise = getattr(scores, "pairwise", None)
    if pairwise is None:
        if isinstance(scores, Tensor):
            return scores
        raise ValueError("scores must be a Tensor[Q, N] or InfluenceScores with a pairwise matrix")
    ids = scores.train_ids.long()
    n = ids.numel()
    if not torch.equal(torch.sort(ids).values, torch.arange(n)):
        raise ValueError("InfluenceScores.train_ids must be the positions 0..N-1 of the retrained training set "
                         "(IndexedDataset without offset); reorder the columns yourself and pass the Tensor")
    return pairwise[:, torch.argsort(ids)]


def linear_datamodeling_score(
    scores: Any,
    masks: Tensor,
    losses: Tensor,
    constant: Literal["zero", "omit"] = "zero",
) -> LinearDatamodelingScore:
    """Linear datamodeling score of train-test influence.

    For each query ``q`` and retrained subset ``S_m``, the prediction is ``Σ_{i ∈ S_m} scores[q, i]``
    (more helpful examples present → lower loss); LDS is the Spearman correlation, over the ``M``
    subsets, between the predictions and the negative losses of the models retrained on them,
    averaged over queries.

    Args:
        scores: ``Tensor[Q, N]`` (positive = helps) or :class:`~lightning_influence.InfluenceScores`
            whose ``train_ids`` are the training positions ``0..N-1``.
        masks: ``BoolTensor[M, N]``: which training examples each retrained model saw.
        losses: ``Tensor[M, Q]``: each retrained model's loss (measurement) on each query.
        constant: a query whose prediction or loss does not vary over the subsets has no rank
            correlation: ``"zero"`` counts it as 0, ``"omit"`` leaves it out of the mean.

    Returns:
        :class:`LinearDatamodelingScore`.

    Raises:
        ValueError: shapes do not match, or ``constant`` is unknown.
    """
    if constant not in ("zero", "omit"):
        raise ValueError(f"constant must be 'zero' or 'omit', got {constant!r}")
    s = _pairwise_matrix(scores).detach().double().cpu()
    mk = masks.detach().cpu().bool()
    ls = losses.detach().double().cpu()
    if s.dim() != 2 or mk.dim() != 2 or ls.dim() != 2 or mk.shape[1] != s.shape[1] or ls.shape != (mk.shape[0], s.shape[0]):
        raise ValueError(f"shapes must be scores [Q, N], masks [M, N], losses [M, Q]; got {tuple(s.shape)}, "
                         f"{tuple(mk.shape)}, {tuple(ls.shape)}")
    pred = mk.double() @ s.T  # [M, Q]
    flat = (pred.max(0).values == pred.min(0).values) | (ls.max(0).values == ls.min(0).values)
    rho = spearman_corrcoef(pred, -ls).double().reshape(-1)
    rho = torch.where(flat, torch.tensor(0.0 if constant == "zero" else float("nan"), dtype=torch.float64), rho)
    kept = rho[torch.isfinite(rho)]
    se = float(kept.std() / kept.numel() ** 0.5) if kept.numel() > 1 else float("nan")
    return LinearDatamodelingScore(lds=float(kept.mean()) if kept.numel() else float("nan"), se=se, per_query=rho,
                                   n_subsets=int(mk.shape[0]), constant=int(flat.sum()))


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman correlation of two score sets of the same shape, over all their entries (how
    alike two methods or settings rank the same pairs).

    Raises:
        ValueError: the shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    return float(spearman_corrcoef(a.detach().double().reshape(-1).cpu(), b.detach().double().reshape(-1).cpu()))
