"""Post-hoc influence scores from EK-FAC factors.

Sign and scale: ``score(x, z) = ∇m(x)ᵀ (G + λI)⁻¹ ∇ℓ(z)`` summed over tracked layers, where
``G`` is the EK-FAC approximation of the curvature of the **mean** per-example training loss,
``ℓ`` and ``m`` are per-example (token-summed) losses/measurements. A positive score means
up-weighting ``z`` lowers ``m(x)`` (``z`` helps ``x``): with the objective
``mean_i ℓ_i + ε ℓ_z`` the first-order change of ``m(x)`` is ``-ε · score``. Self-influence
``∇ℓ(z)ᵀ (G + λI)⁻¹ ∇ℓ(z) ≥ 0``. Scores are not normalised by the dataset size.

Cost and memory. A query's measurement gradient ``G = Σ_t ds_t a_tᵀ`` is rotated into the
eigenbasis from its token vectors (``(DS Q_S)ᵀ (A Q_A)``, about ``T (o² + a²) + T o a``
multiply-adds per layer of output side ``o``, input side ``a``; or from the formed gradient,
``o a (o + a)``, when the sequence is longer than that), scaled by ``1/(Λ+λ)`` and rotated back
once (``o a (o + a)``): that is the fixed cost of a scoring call, per query. Training gradients
are formed batch by batch (``T o a`` per example), scored against every query by one matrix
product and dropped. The eigenbases are cast to the compute dtype once per scorer.

Memory is bounded by ``memory_budget`` (bytes; default :data:`BUDGET_FRACTION` of the memory
available when the scorer is made): the preconditioned queries (``n_query × P`` values, ``P``
the tracked parameters) and the 1/(Λ+λ) tables (``P`` values) are kept; per-example gradients
of one layer are formed a block of examples at a time, the block sized to what the budget has
left (at most :data:`MAX_BLOCK_BYTES`). When the queries and one example's workspace cannot fit,
:class:`~lightning_influence.memory.InsufficientMemoryError` is raised before the work starts,
with the numbers and the knobs. The budget covers what the scorer allocates; the model's own
forward and backward pass (set by the loaders' batch size) and the loaded factors come on top.
:meth:`InfluenceScorer.search` keeps only the running top-``k`` per query (``O(n_query · k)``),
whatever the training set's size; :meth:`InfluenceScorer.pairwise` fills one preallocated
``[n_query, n_train]`` matrix when the training loader's size is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from ..memory import InsufficientMemoryError, available_memory, format_bytes
from ..patterns import select_names
from ..ranking import StreamingTopInfluences, TopInfluences
from ..scores import InfluenceScores
from ..task import TaskLike, resolve_task
from .. import validation as check
from ..normalization import Normalize, check_normalize, needs_train_norms, normalize_scores
from .capture import per_example_gradients, rotated_per_example_gradients
from .factors import Damping, EKFACFactors
from .layer_data import LayerData, Which, iter_layer_data
from .preconditioner import Preconditioner

__all__ = ["InfluenceScorer", "PreparedQueries", "ColumnBuffer", "size_hint", "BUDGET_FRACTION", "MAX_BLOCK_BYTES"]

BUDGET_FRACTION = 0.8
"""``memory_budget=None``: this fraction of the memory available when the scorer is made."""
MAX_BLOCK_BYTES = 256 << 20
"""Largest block of per-example gradients (of one layer) formed at once; larger blocks are no
faster (the products are already large) and only hold more memory."""
WORKSPACE_COPIES = 3
"""Gradient-sized buffers alive while one block of query gradients is preconditioned (the
rotated gradient, its scaled copy and the product rotating it back)."""


@dataclass
class PreparedQueries:
    """Queries ready to be scored (:meth:`InfluenceScorer.prepare_queries`).

    Attributes:
        ids: ``LongTensor[n_query]``.
        chunks: per query batch, ``{layer: Tensor[b, d_out · a_dim]}``: the preconditioned
            measurement gradients ``(G + λI)⁻¹ ∇m``, flattened.
        self_influence: ``Tensor[n_query]``: ``∇mᵀ (G + λI)⁻¹ ∇m`` (the norms the normalised
            variants divide by).
        eigenbasis: layers whose chunks hold ``(Λ+λ)⁻¹ ⊙ Q_Sᵀ ∇m Q_A`` (the preconditioned
            gradient *in the eigenbasis*, not rotated back) because few training examples are to
            be scored (see :meth:`InfluenceScorer.prepare_queries`); training gradients of these
            layers are rotated instead. Empty: every chunk is in the standard basis.
    """

    ids: Tensor
    chunks: list[dict[str, Tensor]]
    self_influence: Tensor
    eigenbasis: frozenset[str] = field(default_factory=frozenset)


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
        memory_budget: bytes the scorer may allocate: preconditioned queries, 1/(Λ+λ) tables,
            eigenbases cast to ``dtype`` and per-example gradient blocks (see the module
            docstring); ``None``: :data:`BUDGET_FRACTION` of the memory available now (RAM on
            CPU, free GPU memory on CUDA), unbounded where that cannot be read.

    Examples without ids (batches that carry none) are named by their position in the loader.

    Raises:
        InsufficientMemoryError: (when scoring) the queries and the smallest workspace do not
            fit ``memory_budget``; the message gives the numbers and what to change.
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
        memory_budget: Optional[int] = None,
    ) -> None:
        if memory_budget is not None:
            check.positive_int("InfluenceScorer", "memory_budget", memory_budget)
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
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        if memory_budget is None:
            avail = available_memory(self.device)
            memory_budget = None if avail is None else int(BUDGET_FRACTION * avail)
            self._budget_source = (f"{BUDGET_FRACTION:.0%} of the {format_bytes(avail)} available" if avail is not None else "unbounded")
        else:
            self._budget_source = "memory_budget"
        self.memory_budget: Optional[int] = memory_budget

    @property
    def layer_names(self) -> list[str]:
        return self.preconditioner.names

    # -- memory -----------------------------------------------------------------------------
    def _sizes(self) -> dict[str, int]:
        """Gradient entries ``o · a`` per layer."""
        return {n: int(self.factors.layers[n].grad_shape[0] * self.factors.layers[n].grad_shape[1]) for n in self.layer_names}

    def fixed_bytes(self) -> int:
        """Bytes the scorer holds whatever the queries: 1/(Λ+λ) tables and eigenbases cast to
        the compute dtype (none when the factors already are in it)."""
        total = 0 if self.preconditioner.identity else sum(self._sizes().values()) * self.itemsize
        for n in self.layer_names:
            f = self.factors.layers[n]
            if f.q_s.dtype != self.dtype or f.q_s.device != self.device:
                total += (f.q_s.numel() + f.q_a.numel()) * self.itemsize
        return total

    def query_bytes(self, n_query: int) -> int:
        """Bytes of ``n_query`` preconditioned query gradients (``n_query × P`` values)."""
        return int(n_query) * sum(self._sizes().values()) * self.itemsize

    def _refuse(self, what: str, need: int, n_query: Optional[int]) -> None:
        sizes = self._sizes()
        big = max(sizes, key=sizes.get)
        q = f"{n_query} queries × {sum(sizes.values()):,} tracked parameters × {self.itemsize} B = {format_bytes(self.query_bytes(n_query or 0))} " \
            "of preconditioned query gradients, " if n_query else ""
        raise InsufficientMemoryError(
            f"InfluenceScorer: {what} needs {format_bytes(need)}: {q}{format_bytes(self.fixed_bytes())} of 1/(Λ+λ) tables and cast "
            f"eigenbases, and a workspace of at least one example's gradient of the largest layer {big!r} "
            f"({WORKSPACE_COPIES} × {sizes[big]:,} × {self.itemsize} B = {format_bytes(WORKSPACE_COPIES * sizes[big] * self.itemsize)}); "
            f"the budget is {format_bytes(self.memory_budget or 0)} ({self._budget_source}). Score fewer queries per call "
            "(split the query loader), select fewer layers (layers=...), or raise memory_budget=... (bytes)")

    def _workspace(self, n_query: int, what: str) -> int:
        """Bytes left for gradient blocks once ``n_query`` queries are held; refuses when not
        even one example's workspace of the largest layer fits."""
        one = WORKSPACE_COPIES * max(self._sizes().values()) * self.itemsize
        if self.memory_budget is None:
            return MAX_BLOCK_BYTES
        left = self.memory_budget - self.fixed_bytes() - self.query_bytes(n_query)
        if left < one:
            self._refuse(what, self.fixed_bytes() + self.query_bytes(n_query) + one, n_query)
        return int(min(left, MAX_BLOCK_BYTES))

    def _rows(self, name: str, workspace: int, copies: int = WORKSPACE_COPIES) -> int:
        """Examples of layer ``name`` whose ``copies`` gradient-sized buffers fit ``workspace``."""
        return max(1, workspace // (copies * self._sizes()[name] * self.itemsize))

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

    def prepare_queries(self, query_loader: Iterable[Any], n_train: Optional[int] = None) -> PreparedQueries:
        """The queries' preconditioned, flattened measurement gradients, ready to be scored
        against training batches (:meth:`batch_scores`).

        Each layer's gradient is rotated into the eigenbasis straight from its token vectors
        when that is cheaper (:func:`~.capture.rotated_per_example_gradients`), scaled, rotated
        back and kept; raw gradients of all queries never exist. A block of a batch's examples
        is preconditioned at a time, sized to what the memory budget leaves.

        Args:
            query_loader: query batches.
            n_train: how many training examples will be scored against these queries, when
                known. Rotating a query back costs ``o·a·(o + a)`` per layer; scoring instead in
                the eigenbasis costs each training example a rotation (``T·(o² + a²)`` for ``T``
                tokens, taken as the queries'). A layer for which ``n_train`` rotations are
                cheaper than rotating every query back is kept in the eigenbasis
                (:attr:`PreparedQueries.eigenbasis`): the same scores, without the fixed cost
                when few training examples are scored. ``None``: every layer is rotated back.

        Raises:
            ValueError: the loader yielded no batch.
            InsufficientMemoryError: the queries (counted before the first batch when the
                loader's size is known, else as they come) and one example's workspace exceed
                ``memory_budget``.
        """
        hint = size_hint(query_loader)
        if hint is not None:
            self._workspace(hint, f"preparing {hint} queries")
        ids, chunks, norms = [], [], []
        n_done = 0
        eigen: Optional[frozenset[str]] = None
        for bid, data in self._batches(query_loader, "measurement"):
            b = int(bid.shape[0])
            workspace = self._workspace(n_done + b, f"preparing {max(n_done + b, hint or 0)} queries")
            if eigen is None:
                tokens = int(next(iter(data.values())).a.shape[1])
                eigen = self._eigenbasis_layers(hint, n_train, tokens)
            ids.append(bid)
            chunk, sq = {}, torch.zeros(b, dtype=self.dtype, device=self.device)
            for n in self.layer_names:
                io = data.pop(n)
                out = torch.empty(b, self._sizes()[n], dtype=self.dtype, device=self.device)
                rows = self._rows(n, workspace)
                for s0 in range(0, b, rows):
                    e = min(b, s0 + rows)
                    g, norm = self._precondition_tokens(n, io.a[s0:e], io.ds[s0:e], back=n not in eigen)
                    out[s0:e] = g.reshape(e - s0, -1)
                    sq[s0:e] += norm
                    del g
                chunk[n] = out
            chunks.append(chunk)
            norms.append(sq)
            n_done += b
        if not chunks:
            raise ValueError("InfluenceScorer: the query loader yielded no batch")
        return PreparedQueries(torch.cat(ids), chunks, torch.cat(norms), eigen or frozenset())

    def _eigenbasis_layers(self, n_query: Optional[int], n_train: Optional[int], tokens: int) -> frozenset[str]:
        """Layers cheaper to score in the eigenbasis: ``n_train`` training rotations
        (``min(T (o² + a²), o a (o + a))`` each) cost less than rotating ``n_query`` queries back
        (``o a (o + a)`` each). Needs both counts; none without factors."""
        if n_query is None or n_train is None or not self.preconditioner.has_factors:
            return frozenset()
        out = set()
        for n in self.layer_names:
            o, a = self.factors.layers[n].grad_shape
            back = o * a * (o + a)
            if n_train * min(tokens * (o * o + a * a), back) < n_query * back:
                out.add(n)
        return frozenset(out)

    def _precondition_tokens(self, name: str, a: Tensor, ds: Tensor, back: bool = True) -> tuple[Tensor, Tensor]:
        """``((G + λI)⁻¹ G, Gᵀ (G + λI)⁻¹ G)`` for the per-example gradients ``G`` of token data
        ``a: [b, T, a_dim]``, ``ds: [b, T, d_out]``: ``([b, d_out, a_dim], [b])``; with
        ``back=False`` the first is left in the eigenbasis, ``(Λ+λ)⁻¹ ⊙ Q_Sᵀ G Q_A``."""
        pre = self.preconditioner
        if not pre.has_factors:
            g = per_example_gradients(a, ds, dtype=self.dtype)
            return g, g.pow(2).sum(dim=(1, 2))
        q_s, q_a = pre.eigenbasis(name, self.dtype, self.device)
        r = rotated_per_example_gradients(a, ds, q_a, q_s, self.dtype)
        w = r if pre.identity else r * pre.inverse_scale(name).to(self.device)
        norm = (r * w).sum(dim=(1, 2))
        del r
        return (q_s @ w @ q_a.T if back else w), norm

    def _train_gradients(self, name: str, a: Tensor, ds: Tensor, eigen: bool) -> Tensor:
        """Flattened per-example gradients ``[b, o·a]`` of token data, rotated into the
        eigenbasis when the queries of this layer are kept there."""
        if eigen:
            q_s, q_a = self.preconditioner.eigenbasis(name, self.dtype, self.device)
            g = rotated_per_example_gradients(a, ds, q_a, q_s, self.dtype)
        else:
            g = per_example_gradients(a, ds, dtype=self.dtype)
        return g.reshape(a.shape[0], -1)

    def query_gradients(self, query_loader: Iterable[Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Preconditioned measurement gradients of the queries, ``{layer: Tensor[n_query, d_out, a_dim]}``, and ids."""
        q = self.prepare_queries(query_loader)
        ids, chunks = q.ids, q.chunks
        return ids, {n: torch.cat([c[n] for c in chunks]).reshape(-1, *self.factors.layers[n].grad_shape) for n in self.layer_names}

    def _train_self(self, data: LayerData) -> dict[str, Tensor]:
        """Per-layer self-influence ``{layer: Tensor[b]}`` of one training batch (rotated gradients
        from the token data, squared and scaled by ``1/(Λ+λ)``)."""
        out = {}
        workspace = self._workspace(0, "self-influence")
        for n in self.layer_names:
            io = data[n]
            b = int(io.a.shape[0])
            rows = self._rows(n, workspace, copies=2)
            vals = []
            for s0 in range(0, b, rows):
                a, ds = io.a[s0 : s0 + rows], io.ds[s0 : s0 + rows]
                if self.preconditioner.identity or not self.preconditioner.has_factors:
                    g = per_example_gradients(a, ds, dtype=self.dtype)
                    vals.append(g.pow(2).sum(dim=(1, 2)))
                    continue
                q_s, q_a = self.preconditioner.eigenbasis(n, self.dtype, self.device)
                rot = rotated_per_example_gradients(a, ds, q_a, q_s, self.dtype)
                vals.append((rot.pow(2) * self.preconditioner.inverse_scale(n).to(self.device)).sum(dim=(1, 2)))
            out[n] = vals[0] if len(vals) == 1 else torch.cat(vals)
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

    def _train_scores(self, queries: list[dict[str, Tensor]], data: LayerData, workspace: int,
                      eigenbasis: frozenset[str] = frozenset()) -> dict[str, Tensor]:
        """Per-layer scores ``{layer: Tensor[n_query, b]}`` of one training batch: each layer's
        per-example gradients are formed (rotated, for layers in ``eigenbasis``) a block of
        examples at a time (within ``workspace`` bytes), scored against every query by one
        product per query chunk, and dropped."""
        out = {}
        n_q = sum(int(next(iter(q.values())).shape[0]) for q in queries)
        for n in self.layer_names:
            io = data[n]
            b = int(io.a.shape[0])
            eig = n in eigenbasis
            rows = self._rows(n, workspace, copies=2 if eig else 1)
            if rows >= b:
                g = self._train_gradients(n, io.a, io.ds, eig)
                out[n] = torch.cat([q[n] @ g.T for q in queries]) if len(queries) > 1 else queries[0][n] @ g.T
                continue
            block = torch.empty(n_q, b, dtype=self.dtype, device=self.device)
            for s0 in range(0, b, rows):
                e = min(b, s0 + rows)
                g = self._train_gradients(n, io.a[s0:e], io.ds[s0:e], eig)
                r0 = 0
                for q in queries:
                    r1 = r0 + int(q[n].shape[0])
                    block[r0:r1, s0:e] = q[n] @ g.T
                    r0 = r1
                del g
            out[n] = block
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
        # the queries are already held: what the budget leaves beyond them is the gradient workspace
        workspace = self._workspace(int(queries.ids.shape[0]), f"scoring {int(queries.ids.shape[0])} queries")
        for bid, data in self._batches(train_loader, "loss"):
            block, parts = self._normalized(self._train_scores(queries.chunks, data, workspace, queries.eigenbasis), data, normalize,
                                            queries.self_influence)
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
            normalize: score variant (:mod:`lightning_influence.normalization`): ``"raw"`` (the
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
        hint = size_hint(train_loader)
        queries = self.prepare_queries(query_loader, n_train=hint)
        q_ids = queries.ids
        n_q = q_ids.shape[0]
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
        queries = self.prepare_queries(query_loader, n_train=size_hint(train_loader))
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
