"""Post-hoc influence scores from EK-FAC factors.

Sign and scale: ``score(x, z) = ∇m(x)ᵀ (G + λI)⁻¹ ∇ℓ(z)`` summed over tracked layers, where
``G`` is the EK-FAC approximation of the curvature of the **mean** per-example training loss,
``ℓ`` and ``m`` are per-example (token-summed) losses/measurements. A positive score means
up-weighting ``z`` lowers ``m(x)`` (``z`` helps ``x``): with the objective
``mean_i ℓ_i + ε ℓ_z`` the first-order change of ``m(x)`` is ``-ε · score``. Self-influence
``∇ℓ(z)ᵀ (G + λI)⁻¹ ∇ℓ(z) ≥ 0``. Scores are not normalised by the dataset size.

Memory: query gradients are preconditioned batch by batch and kept (``n_query × P`` values);
training gradients are formed one batch at a time and dropped. :meth:`InfluenceScorer.search`
keeps only the running top-``k`` per query (``O(n_query · k)``), whatever the training set's
size; :meth:`InfluenceScorer.pairwise` fills one preallocated ``[n_query, n_train]`` matrix when
the training loader's size is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from ..patterns import select_names
from ..ranking import StreamingTopInfluences, TopInfluences
from ..scores import InfluenceScores
from ..task import TaskLike, resolve_task
from .. import validation as check
from ..variants import Normalize, check_normalize, needs_train_norms, normalize_scores
from .capture import per_example_gradients, rotated_per_example_gradients
from .factors import Damping, EKFACFactors
from .passes import LayerData, Which, iter_layer_data
from .preconditioner import Preconditioner

__all__ = ["InfluenceScorer", "PreparedQueries", "ColumnBuffer", "size_hint"]


@dataclass
class PreparedQueries:
    """Queries ready to be scored (:meth:`InfluenceScorer.prepare_queries`).

    Attributes:
        ids: ``LongTensor[n_query]``.
        chunks: per query batch, ``{layer: Tensor[b, d_out · a_dim]}``: the preconditioned
            measurement gradients ``(G + λI)⁻¹ ∇m``, flattened.
        self_influence: ``Tensor[n_query]``: ``∇mᵀ (G + λI)⁻¹ ∇m`` (the norms the normalised
            variants divide by).
    """

    ids: Tensor
    chunks: list[dict[str, Tensor]]
    self_influence: Tensor


class InfluenceScorer:
    """Scores training examples against queries with saved or fitted EK-FAC factors.

    Args:
        model: the model at the weights to explain (usually the final one).
        factors: :class:`EKFACFactors` (checked against ``model``).
        task: how to read batches; default from the module / batch layout.
        damping: float for all layers, mapping per layer, a rule name (``"spectrum"``, ``"mean"``:
            :mod:`lightning_influence.ekfac.damping`), or ``None`` for the default rule
            (``"spectrum"``: the 75% quantile of the selected layers' pooled eigenvalues). The
            values and the rule's name are recorded in the scores' ``options``.
        layers: glob pattern(s) selecting a subset of the factors' layers (default: all).
        dtype: compute dtype (default: float32, or float64 for a float64 model).
        progress: show progress bars (``None``: only on a terminal; see :mod:`lightning_influence.progress`).

    Examples without ids (batches that carry none) are named by their position in the loader.
    """

    def __init__(
        self,
        model: nn.Module,
        factors: EKFACFactors,
        task: Optional[TaskLike] = None,
        damping: Damping = None,
        layers: Optional[str | Sequence[str]] = None,
        dtype: Optional[torch.dtype] = None,
        progress: Optional[bool] = None,
    ) -> None:
        if not isinstance(factors, EKFACFactors):
            raise check.InvalidArgumentError(f"InfluenceScorer(factors=...) must be EKFACFactors (see load_factors), got {type(factors).__name__}")
        pats = check.patterns("InfluenceScorer", "layers", layers)
        names = select_names(factors.layer_names, pats, what="layer of the factors", owner="InfluenceScorer")
        factors = EKFACFactors({n: factors.layers[n] for n in names}, factors.fisher, factors.n_examples,
                               factors.n_lambda_examples, factors.meta)
        self.model = model
        self.tracked = factors.check_model(model)
        self.device = next(model.parameters()).device
        self.dtype = dtype or torch.promote_types(next(model.parameters()).dtype, torch.float32)
        self.preconditioner = Preconditioner(factors, names, damping, self.dtype, self.device)
        self.factors = factors
        self.damping = self.preconditioner.damping
        self.task = resolve_task(model, task)
        self.progress = progress

    @property
    def layer_names(self) -> list[str]:
        return self.preconditioner.names

    # -- gradients --------------------------------------------------------------------------
    def _batches(self, loader: Iterable[Any], which: Which) -> Iterable[tuple[Tensor, LayerData]]:
        """``(ids, layer data)`` per batch; ids are positions in the loader when batches carry none."""
        desc = "query gradients" if which == "measurement" else "training gradients"
        return iter_layer_data(self.model, loader, self.tracked, self.task, which, progress=self.progress, desc=desc)

    def gradients(self, loader: Iterable[Any], which: Literal["loss", "measurement"] = "loss") -> tuple[Tensor, dict[str, Tensor]]:
        """Per-example gradients per layer, ``{name: Tensor[N, d_out, a_dim]}``, and ids ``LongTensor[N]``."""
        ids, grads = [], {n: [] for n in self.layer_names}
        for bid, data in self._batches(loader, which):
            ids.append(bid)
            for n in grads:
                grads[n].append(per_example_gradients(data[n].a, data[n].ds, dtype=self.dtype))
        return torch.cat(ids), {n: torch.cat(g) for n, g in grads.items()}

    def prepare_queries(self, query_loader: Iterable[Any]) -> PreparedQueries:
        """The queries' preconditioned, flattened measurement gradients, ready to be scored
        against training batches (:meth:`batch_scores`).

        Each layer's gradient is preconditioned as soon as it exists, so raw and preconditioned
        copies of all queries never coexist.

        Raises:
            ValueError: the loader yielded no batch.
        """
        ids, chunks, norms = [], [], []
        for bid, data in self._batches(query_loader, "measurement"):
            ids.append(bid)
            chunk, sq = {}, 0.0
            for n in self.layer_names:
                io = data.pop(n)
                raw = per_example_gradients(io.a, io.ds, dtype=self.dtype)
                g = self.preconditioner.precondition(n, raw)
                sq = sq + (raw * g).sum(dim=(1, 2))
                chunk[n] = g.reshape(g.shape[0], -1)
            chunks.append(chunk)
            norms.append(sq)
        if not chunks:
            raise ValueError("InfluenceScorer: the query loader yielded no batch")
        return PreparedQueries(torch.cat(ids), chunks, torch.cat(norms))

    def query_gradients(self, query_loader: Iterable[Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Preconditioned measurement gradients of the queries, ``{layer: Tensor[n_query, d_out, a_dim]}``, and ids."""
        q = self.prepare_queries(query_loader)
        ids, chunks = q.ids, q.chunks
        return ids, {n: torch.cat([c[n] for c in chunks]).reshape(-1, *self.factors.layers[n].grad_shape) for n in self.layer_names}

    def _train_self(self, data: LayerData) -> dict[str, Tensor]:
        """Per-layer self-influence ``{layer: Tensor[b]}`` of one training batch (rotated gradients
        from the token data, squared and scaled by ``1/(Λ+λ)``)."""
        out = {}
        for n in self.layer_names:
            io = data[n]
            if self.preconditioner.identity:
                g = per_example_gradients(io.a, io.ds, dtype=self.dtype)
                out[n] = g.pow(2).sum(dim=(1, 2))
                continue
            f = self.preconditioner.factors[n]
            rot = rotated_per_example_gradients(io.a, io.ds, f.q_a, f.q_s, self.dtype)
            out[n] = (rot.pow(2) * self.preconditioner.inverse_scale(n)).sum(dim=(1, 2))
        return out

    def _normalized(self, parts: dict[str, Tensor], data: LayerData, normalize: str, q_self: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Total and per-layer scores of one training batch under ``normalize`` (per-layer terms
        share the total's denominators, so they still sum to it)."""
        total = sum(parts.values())
        if not needs_train_norms(normalize):
            return total, parts
        t_self = sum(self._train_self(data).values())
        return (normalize_scores(total, normalize, q_self, t_self),
                {n: normalize_scores(p, normalize, q_self, t_self) for n, p in parts.items()})

    def _train_scores(self, queries: list[dict[str, Tensor]], data: LayerData) -> dict[str, Tensor]:
        """Per-layer scores ``{layer: Tensor[n_query, b]}`` of one training batch."""
        out = {}
        for n in self.layer_names:
            io = data[n]
            g = per_example_gradients(io.a, io.ds, dtype=self.dtype).reshape(io.a.shape[0], -1)
            out[n] = torch.cat([q[n] @ g.T for q in queries])
        return out

    # -- scores -----------------------------------------------------------------------------
    def batch_scores(self, queries: PreparedQueries, train_loader: Iterable[Any],
                     normalize: Normalize = "raw") -> Iterator[tuple[Tensor, Tensor, dict[str, Tensor]]]:
        """Scores of ``queries`` against ``train_loader``, one training batch at a time:
        ``(ids LongTensor[b], scores Tensor[n_query, b], per-layer {layer: Tensor[n_query, b]})``
        (per-layer terms sum to the scores). :meth:`pairwise` and :meth:`search` are built on it;
        so are scorers that combine several (e.g. :class:`~lightning_influence.trajectory.TrajectoryScorer`).

        Args:
            queries: from :meth:`prepare_queries`.
            train_loader: training batches (their per-example loss is differentiated).
            normalize: score variant, as in :meth:`pairwise`.
        """
        check_normalize("InfluenceScorer.batch_scores", normalize)
        for bid, data in self._batches(train_loader, "loss"):
            block, parts = self._normalized(self._train_scores(queries.chunks, data), data, normalize, queries.self_influence)
            del data
            yield bid, block, parts

    def pairwise(self, query_loader: Iterable[Any], train_loader: Iterable[Any], per_layer: bool = False,
                 normalize: Normalize = "raw") -> InfluenceScores:
        """Pairwise scores of every query against every training example.

        Memory: the output (one ``[n_query, n_train]`` matrix, preallocated when the training
        loader's dataset is sized, else grown geometrically; per layer too with ``per_layer``),
        the preconditioned query gradients and one training batch; nothing else is kept per
        training example.

        Args:
            query_loader: query batches (their ``measurement`` is differentiated).
            train_loader: training batches (their per-example loss is differentiated).
            per_layer: also keep each layer's ``[n_query, n_train]`` term (``InfluenceScores.per_layer``).
            normalize: score variant (:mod:`lightning_influence.variants`): ``"raw"`` (the
                influence), ``"cosine"`` (divided by both norms ``√(∇mᵀP∇m) √(∇ℓᵀP∇ℓ)``) or
                ``"relative"`` (divided by the training example's self-influence ``∇ℓᵀP∇ℓ``); the
                normalised variants compute each training example's self-influence too (about
                twice the training-side cost).

        Returns:
            :class:`InfluenceScores` with ``pairwise: Tensor[n_query, n_train]`` (positive = the
            training example helps the query), ``query_ids`` and ``train_ids``; ``options``
            records ``normalize`` and ``damping_rule``.

        Raises:
            InvalidArgumentError: ``normalize`` is not one of the variants.
        """
        check_normalize("InfluenceScorer.pairwise", normalize)
        queries = self.prepare_queries(query_loader)
        q_ids = queries.ids
        n_q, hint = q_ids.shape[0], size_hint(train_loader)
        total = ColumnBuffer(n_q, hint, self.dtype, self.device)
        layers = {n: ColumnBuffer(n_q, hint, self.dtype, self.device) for n in self.layer_names} if per_layer else {}
        ids = ColumnBuffer(None, hint, torch.long)
        for bid, block, parts in self.batch_scores(queries, train_loader, normalize):
            total.append(block)
            for n, col in layers.items():
                col.append(parts[n])
            ids.append(bid)
        if not ids.n:
            raise ValueError("InfluenceScorer.pairwise: the training loader yielded no batch")
        return InfluenceScores("ekfac", ids.tensor(), query_ids=q_ids, pairwise=total.tensor(),
                               per_layer={n: c.tensor() for n, c in layers.items()}, options=self._options(normalize))

    def search(self, query_loader: Iterable[Any], train_loader: Iterable[Any], k: int = 10, opponents: bool = False,
               normalize: Normalize = "raw") -> TopInfluences:
        """The ``k`` most helpful (and, with ``opponents``, most harmful) training examples per
        query, in ``O(n_query · k)`` memory beyond one training batch (streaming top-k).

        Args:
            query_loader: query batches.
            train_loader: training batches.
            k: how many per query.
            opponents: also the ``k`` lowest scores.
            normalize: score variant ranked by, as in :meth:`pairwise`.

        Returns:
            :class:`~lightning_influence.ranking.TopInfluences` (ids and scores ``[n_query, k]``).
        """
        check.positive_int("InfluenceScorer.search", "k", k)
        check_normalize("InfluenceScorer.search", normalize)
        queries = self.prepare_queries(query_loader)
        top = StreamingTopInfluences(queries.ids, k, opponents)
        for bid, block, _ in self.batch_scores(queries, train_loader, normalize):
            top.update(block, bid)
        return top.result()

    def self_influence(self, train_loader: Iterable[Any], per_layer: bool = False) -> InfluenceScores:
        """Self-influence ``∇ℓ(z)ᵀ (G + λI)⁻¹ ∇ℓ(z) ≥ 0`` of every example of ``train_loader``.

        Memory: the ``[n]`` outputs (preallocated when the loader's dataset is sized) and one
        batch of rotated per-example gradients.

        Returns:
            :class:`InfluenceScores` with ``self_influence: Tensor[n]`` (and per-layer terms).
        """
        hint = size_hint(train_loader)
        totals, ids = ColumnBuffer(None, hint, self.dtype, self.device), ColumnBuffer(None, hint, torch.long)
        layer_vals = {n: ColumnBuffer(None, hint, self.dtype, self.device) for n in self.layer_names} if per_layer else {}
        for bid, data in self._batches(train_loader, "loss"):
            parts = self._train_self(data)
            del data
            totals.append(sum(parts.values()))
            for n, col in layer_vals.items():
                col.append(parts[n])
            ids.append(bid)
        if not ids.n:
            raise ValueError("InfluenceScorer.self_influence: the loader yielded no batch")
        return InfluenceScores("ekfac", ids.tensor(), self_influence=totals.tensor(),
                               per_layer={n: v.tensor() for n, v in layer_vals.items()}, options=self._options())

    def _options(self, normalize: str = "raw") -> dict[str, Any]:
        return {"damping": dict(self.damping), "damping_rule": self.preconditioner.damping_rule, "normalize": normalize,
                "layers": list(self.layer_names), "fisher": self.factors.fisher}


def size_hint(loader: Iterable[Any]) -> Optional[int]:
    """Examples a ``DataLoader`` will yield when its dataset is sized and its sampler takes every
    example once (``None`` otherwise)."""
    dataset = getattr(loader, "dataset", None)
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    sampler = getattr(loader, "sampler", None)
    try:
        return n if sampler is None or len(sampler) == n else None
    except TypeError:
        return None


class ColumnBuffer:
    """A matrix ``[rows, n]`` (or a vector ``[n]`` when ``rows`` is ``None``) filled block by block
    along its last dimension: preallocated when ``n`` is known, else grown geometrically; never a
    list of blocks plus a concatenated copy.

    Args:
        rows: leading dimension, or ``None`` for a vector.
        n_hint: expected final length (``None``: unknown).
        dtype: element type.
        device: where it lives.
    """

    def __init__(self, rows: Optional[int], n_hint: Optional[int], dtype: torch.dtype, device: Optional[torch.device] = None) -> None:
        self.lead = () if rows is None else (int(rows),)
        self.buf = torch.empty(*self.lead, n_hint or 1024, dtype=dtype, device=device)
        self.n = 0

    def append(self, block: Tensor) -> None:
        """Append ``block`` (``[rows, c]``, or ``[c]`` for a vector)."""
        end = self.n + block.shape[-1]
        if end > self.buf.shape[-1]:
            grown = torch.empty(*self.lead, max(end, 2 * self.buf.shape[-1]), dtype=self.buf.dtype, device=self.buf.device)
            grown[..., : self.n] = self.buf[..., : self.n]
            self.buf = grown
        self.buf[..., self.n : end] = block
        self.n = end

    def tensor(self) -> Tensor:
        """The filled part (the buffer itself when it is exactly full)."""
        return self.buf if self.n == self.buf.shape[-1] else self.buf[..., : self.n].clone()
