"""Querying an index: streaming top-k, dense scores, self-influence, per-layer terms.

:class:`InfluenceIndex` opens a finished index (:func:`~.builder.build_index`) and answers
queries without touching the training data: a query's measurement gradient is rotated,
scaled and projected (:meth:`InfluenceIndex.query_vectors`: :class:`QueryVectors`), then scored
against every shard in turn. One method per job: :meth:`~InfluenceIndex.search` (top-k),
:meth:`~InfluenceIndex.scores` (dense), :meth:`~InfluenceIndex.rerank` (exact re-scoring),
:meth:`~InfluenceIndex.self_influence` and :meth:`~InfluenceIndex.token_scores`; ``search`` and
``scores`` take a query loader or :class:`QueryVectors` computed once. :meth:`InfluenceIndex.search` keeps only the running top-``k`` per query
(:class:`~lightning_influence.ranking.StreamingTopInfluences`), so its memory is the query
vectors, two shards (the next one is read while the current one is scored) and one
``[n_query, chunk_rows]`` block of scores, whatever the number of training examples.

Sign and scale as :class:`~lightning_influence.InfluenceScorer`: a positive score means the
training example lowers the query's measurement (it helps); not normalised by dataset size.
With ``compression="exact"`` the scores equal ``InfluenceScorer.pairwise`` up to float
rounding; projected indexes give unbiased estimates of them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import validation as check
from ..ekfac.capture import per_example_gradients
from ..ekfac.factors import FactorMismatchError
from ..ekfac.layer_data import iter_layer_data
from ..layers import TrackedLayer
from ..ranking import StreamingTopInfluences, TopInfluences
from ..scores import InfluenceScores
from ..storage import read_artifact
from ..task import TaskLike, resolve_task
from ..normalization import Normalize, check_normalize, needs_query_norms, needs_train_norms, normalize_scores
from .shards import CATALOG_KIND, InfluenceIndexError, read_shard
from .transform import IndexTransform

if TYPE_CHECKING:  # pragma: no cover
    from .tokens import TokenScores

__all__ = ["InfluenceIndex", "IndexBlock", "QueryVectors", "load_index", "top_as_scores"]

OWNER = "InfluenceIndex"


class QueryVectors(NamedTuple):
    """Queries in an index's space, computed once and scored any number of times.

    Attributes:
        ids: ``LongTensor[Q]`` query ids (positions when the batches carry none).
        vectors: ``{layer: Tensor[Q, dim_layer]}``, in the index's layer order.
        norms: ``Tensor[Q]`` the queries' exact squared norms ``gᵀ (G + λI)⁻¹ g`` in the index's
            inner product (summed over layers, before any projection): the denominators of
            ``normalize="cosine"``.
    """

    ids: Tensor
    vectors: dict[str, Tensor]
    norms: Tensor


@dataclass
class IndexBlock:
    """Rows of one shard.

    Attributes:
        ids: ``LongTensor[n]`` training example ids.
        vectors: layer → ``Tensor[n, dim_layer]`` in the storage dtype.
        self_influence: ``Tensor[n]`` float32 (``nan`` when the build skipped it).
        layer_self: layer → ``Tensor[n]`` (only with ``per_layer=True`` builds).
        start: position of the first row in the index's order (catalog order).
    """

    ids: Tensor
    vectors: dict[str, Tensor]
    self_influence: Tensor
    layer_self: dict[str, Tensor] = field(default_factory=dict)
    start: int = 0


class InfluenceIndex:
    """A finished training-gradient index (see the module docstring). Open with :func:`load_index`.

    Args:
        path: the index folder.
        catalog: its catalog manifest.
        transform: its :class:`~.transform.IndexTransform`.
        model: the model whose query gradients are scored (the one the index was built from).
        task: how to read query batches (default: from the module / batch layout).
        progress: show progress bars (``None``: only on a terminal).
        chunk_rows: training rows scored per matrix product.

    Attributes:
        n_examples: number of training examples.
        layer_names: tracked layers, in scoring order.
        compression: ``"exact"``, ``"sjlt"`` or ``"kronecker"``.
        nbytes: bytes of the shards' tensor files on disk.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        catalog: dict[str, Any],
        transform: IndexTransform,
        model: Optional[nn.Module] = None,
        task: Optional[TaskLike] = None,
        progress: Optional[bool] = None,
        chunk_rows: int = 8192,
    ) -> None:
        self.path = Path(path)
        self.catalog = catalog
        self.transform = transform
        self.progress = progress
        self.chunk_rows = check.positive_int(OWNER, "chunk_rows", chunk_rows)
        self.model: Optional[nn.Module] = None
        self.task: Optional[TaskLike] = None
        self.tracked: list[TrackedLayer] = []
        if model is not None:
            self.bind(model, task)

    def bind(self, model: nn.Module, task: Optional[TaskLike] = None) -> "InfluenceIndex":
        """Use ``model`` (the model the index was built from) for query gradients.

        Raises:
            FactorMismatchError: a layer of the index is missing from ``model`` or has another shape.
        """
        modules = dict(model.named_modules())
        tracked, problems = [], []
        for n, lt in self.transform.layers.items():
            m = modules.get(n)
            if m is None:
                problems.append(f"{n}: not in the model")
                continue
            t = TrackedLayer.from_module(n, m)
            if tuple(t.grad_shape) != tuple(lt.grad_shape):
                problems.append(f"{n}: index has gradients {tuple(lt.grad_shape)}, the model {tuple(t.grad_shape)}")
            tracked.append(t)
        if problems:
            raise FactorMismatchError(f"{OWNER} at {self.path} does not match the model:\n  " + "\n  ".join(problems))
        self.model, self.tracked = model, tracked
        self.task = resolve_task(model, task)
        return self

    # -- facts ------------------------------------------------------------------------------
    @property
    def n_examples(self) -> int:
        return int(self.catalog["n_examples"])

    @property
    def layer_names(self) -> list[str]:
        return self.transform.names

    @property
    def dims(self) -> dict[str, int]:
        return self.transform.dims

    @property
    def compression(self) -> str:
        return self.transform.compression

    @property
    def nbytes(self) -> int:
        return int(self.catalog["bytes"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.catalog["shards"])

    def __len__(self) -> int:
        return self.n_examples

    def __repr__(self) -> str:
        return (f"InfluenceIndex({str(self.path)!r}, n_examples={self.n_examples}, compression={self.compression!r}, "
                f"dims={sum(self.dims.values())}, shards={len(self.shards)}, bytes={self.nbytes})")

    # -- reading ----------------------------------------------------------------------------
    def blocks(self, prefetch: bool = True) -> Iterator[IndexBlock]:
        """Every shard in catalog order as an :class:`IndexBlock`, checksums verified; with
        ``prefetch`` the next shard is read in a background thread while this one is used."""
        entries = self.shards
        start = 0
        if not prefetch or len(entries) < 2:
            for e in entries:
                yield self._block(e, start)
                start += int(e["n"])
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read_shard, self.path, entries[0])
            for i, e in enumerate(entries):
                tensors = pending.result()
                if i + 1 < len(entries):
                    pending = pool.submit(read_shard, self.path, entries[i + 1])
                yield self._from_tensors(tensors, start)
                start += int(e["n"])

    def _block(self, entry: dict[str, Any], start: int) -> IndexBlock:
        return self._from_tensors(read_shard(self.path, entry), start)

    def _from_tensors(self, t: dict[str, Tensor], start: int) -> IndexBlock:
        try:
            vectors = {n: t[f"vectors::{n}"] for n in self.layer_names}
        except KeyError as e:
            raise InfluenceIndexError(f"{self.path}: a shard lacks tensor {e}") from e
        layer_self = {n: t[f"self::{n}"] for n in self.layer_names if f"self::{n}" in t}
        return IndexBlock(t["ids"], vectors, t["self_influence"], layer_self, start)

    # -- queries ----------------------------------------------------------------------------
    def _require_model(self, what: str) -> None:
        if self.model is None:
            raise InfluenceIndexError(f"{OWNER}.{what} needs the model: open the index with model=..., or call bind(model)")

    def query_gradients(self, query_loader: Iterable[Any]) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """Per query batch: ids and raw measurement gradients ``{layer: Tensor[b, d_out, a_dim]}``."""
        self._require_model("query_gradients")
        dtype = torch.promote_types(next(self.model.parameters()).dtype, torch.float32)
        for ids, data in iter_layer_data(self.model, query_loader, self.tracked, self.task, "measurement",
                                         progress=self.progress, desc="query gradients"):
            yield ids, {n: per_example_gradients(data[n].a, data[n].ds, dtype) for n in self.layer_names}

    def query_vectors(self, query_loader: Iterable[Any]) -> QueryVectors:
        """The queries of ``query_loader`` in this index's space, computed from each layer's
        token data without forming the queries' gradients in the standard basis
        (:meth:`~.transform.LayerTransform.query_batch`).

        Raises:
            ValueError: no batch.
        """
        self._require_model("query_vectors")
        dtype = torch.promote_types(next(self.model.parameters()).dtype, torch.float32)

        def batches():
            for bid, data in iter_layer_data(self.model, query_loader, self.tracked, self.task, "measurement",
                                             progress=self.progress, desc="query vectors"):
                out = {}
                for n in self.layer_names:
                    io = data.pop(n)
                    out[n] = self.transform.layers[n].query_batch(io.a, io.ds, dtype)
                yield bid, out

        return self._collect(batches())

    def vectors_of(self, gradient_batches: Iterable[tuple[Tensor, dict[str, Tensor]]]) -> QueryVectors:
        """:class:`QueryVectors` of ``(ids, {layer: Tensor[b, d_out, a_dim]})`` batches of gradients
        in the standard basis (anything to be scored as a query gradient: the multi-stage scorer
        passes fine-tuning-preconditioned ones); their norms are ``gᵀ (G + λI)⁻¹ g``.

        Raises:
            ValueError: no batch.
        """
        def batches():
            for bid, grads in gradient_batches:
                yield bid, {n: self.transform.layers[n].query_vectors_and_norms(grads.pop(n)) for n in self.layer_names}

        return self._collect(batches())

    def _collect(self, batches: Iterable[tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]]) -> QueryVectors:
        """Concatenate per-batch ``{layer: (vectors, squared norms)}`` into ids, vectors and total norms."""
        ids, cols, norms = [], {n: [] for n in self.layer_names}, []
        for bid, parts in batches:
            ids.append(bid)
            norms.append(sum(sq for _, sq in parts.values()))
            for n, (v, _) in parts.items():
                cols[n].append(v)
        if not ids:
            raise ValueError(f"{OWNER}: the query loader yielded no batch")
        # one small list per query batch (queries are few); concatenated once
        cat = lambda v: torch.cat(v) if len(v) > 1 else v[0]  # noqa: E731
        return QueryVectors(torch.cat(ids), {n: cat(v) for n, v in cols.items()}, cat(norms))

    def _chunks(self, vectors: dict[str, Tensor], per_layer: bool = False) -> Iterator[tuple[IndexBlock, slice, Tensor, dict[str, Tensor]]]:
        """``(block, rows, total scores [Q, c], per-layer scores)`` over every shard, ``c ≤ chunk_rows``."""
        dtype = next(iter(vectors.values())).dtype
        device = next(iter(vectors.values())).device
        for block in self.blocks():
            n = int(block.ids.shape[0])
            for s in range(0, n, self.chunk_rows):
                rows = slice(s, min(n, s + self.chunk_rows))
                parts = {name: q @ block.vectors[name][rows].to(device=device, dtype=dtype).T for name, q in vectors.items()}
                total = sum(parts.values())
                yield block, rows, total, parts if per_layer else {}

    def _queries(self, queries: "Iterable[Any] | QueryVectors") -> QueryVectors:
        """``queries`` as checked :class:`QueryVectors` (a loader's are computed)."""
        if not isinstance(queries, QueryVectors):
            return self.query_vectors(queries)
        vectors = queries.vectors
        if list(vectors) != self.layer_names:
            raise ValueError(f"{OWNER}: query vectors are for layers {list(vectors)}, the index has {self.layer_names}")
        for n, v in vectors.items():
            if v.dim() != 2 or v.shape[1] != self.dims[n]:
                raise ValueError(f"{OWNER}: query vectors of {n!r} have shape {tuple(v.shape)}, expected [Q, {self.dims[n]}]")
        if tuple(queries.norms.shape) != tuple(queries.ids.shape):
            raise ValueError(f"{OWNER}: QueryVectors.norms has shape {tuple(queries.norms.shape)}, expected [{queries.ids.shape[0]}]")
        return queries

    def search(self, queries: "Iterable[Any] | QueryVectors", k: int = 10, opponents: bool = False, approximate: Any = None,
               normalize: Normalize = "raw") -> TopInfluences:
        """The ``k`` most helpful (and, with ``opponents``, most harmful) training examples per
        query, streaming over the shards (memory independent of the number of training examples).

        Args:
            queries: query batches (their measurement is differentiated), or
                :class:`QueryVectors` already computed (:meth:`query_vectors`, :meth:`vectors_of`).
            k: how many per query (capped at the number of training examples).
            opponents: also the ``k`` lowest scores.
            approximate: a :class:`~lightning_influence.index.approximate.FaissSearch` of this
                index to answer from instead of the exact streaming search (raw scores only).
            normalize: score variant ranked by (:mod:`lightning_influence.normalization`): ``"raw"``,
                ``"cosine"`` or ``"relative"``; the training side's norms are the self-influence
                stored in the shards (exact, also for projected indexes), the queries' are
                computed exactly before projection.

        Returns:
            :class:`~lightning_influence.ranking.TopInfluences`: ``query_ids [Q]``, ``ids`` and
            ``scores`` ``[Q, k]`` highest first, opponents lowest first (or ``None``).

        Raises:
            InvalidArgumentError: an unknown ``normalize``, or a normalised variant with ``approximate``.
            InfluenceIndexError: a normalised variant on an index built with ``self_influence=False``.
        """
        check.positive_int(f"{OWNER}.search", "k", k)
        check.boolean(f"{OWNER}.search", "opponents", opponents)
        check_normalize(f"{OWNER}.search", normalize)
        if approximate is not None and normalize != "raw":
            raise check.InvalidArgumentError(f"{OWNER}.search(normalize={normalize!r}) needs the exact streaming search: pass approximate=None")
        self._check_normalizable(normalize)
        q = self._queries(queries)
        if approximate is not None:
            return approximate.search_vectors(q.ids, q.vectors, k, opponents)
        top = StreamingTopInfluences(q.ids, k, opponents)
        for block, rows, total, _ in self._chunks(q.vectors):
            top.update(self._variant(total, {}, block, rows, normalize, q.norms), block.ids[rows])
        return top.result()

    def _check_normalizable(self, normalize: str) -> None:
        if needs_train_norms(normalize) and not self.catalog.get("settings", {}).get("self_influence", True):
            raise InfluenceIndexError(f"normalize={normalize!r} divides by the self-influence, which {self.path} does not hold "
                                      "(built with self_influence=False)")

    def _variant(self, total: Tensor, parts: dict[str, Tensor], block: IndexBlock, rows: slice, normalize: str,
                 query_self: Tensor) -> Tensor:
        """``total`` (and ``parts``, in place) under ``normalize``, with the block's stored self-influence."""
        if not needs_train_norms(normalize):
            return total
        t_self = block.self_influence[rows]
        for p in parts.values():
            normalize_scores(p, normalize, query_self, t_self)
        return normalize_scores(total, normalize, query_self, t_self)

    def rerank(self, query_loader: Iterable[Any], candidates: TopInfluences, train_data: Any, k: int = 10,
               collate_fn: Optional[Callable[[list], Any]] = None, batch_size: int = 64,
               id_to_index: Optional[Callable[[Tensor], Tensor]] = None) -> TopInfluences:
        """Exact scores for each query's candidates (e.g. the top 100 of a compressed :meth:`search`),
        re-ranked: the exact top-``k`` wherever it lies among the candidates.

        The candidates' gradients are recomputed from ``train_data`` (one gradient pass over the
        union of all queries' candidates, whatever the index's size) and scored exactly against
        the queries (unprojected, whitened gradients), so the scores equal
        ``InfluenceScorer.pairwise`` up to float rounding. Memory: the queries' unprojected
        whitened gradients (``n_query × Σ d_out·a_dim``) and one batch of candidates; meant for
        tens to hundreds of queries.

        Args:
            query_loader: the same queries as ``candidates`` (same order).
            candidates: a search result; its ``ids`` (and ``opponent_ids``) are re-ranked.
            train_data: map-style dataset of the training examples: ``train_data[id_to_index(id)]``
                is the example with that id (an :class:`~lightning_influence.IndexedDataset`
                with ``offset=0`` maps ids to themselves).
            k: how many to keep per query and direction (at most the candidates' width).
            collate_fn: how batches of ``train_data`` items are built.
            batch_size: candidates per gradient batch.
            id_to_index: maps ``LongTensor`` ids to dataset positions (default: identity).

        Returns:
            :class:`~lightning_influence.ranking.TopInfluences` with exact scores.

        Raises:
            ValueError: the query loader's ids differ from the candidates' query ids.
        """
        from torch.utils.data import DataLoader, Subset

        self._require_model("rerank")
        check.positive_int(f"{OWNER}.rerank", "k", k)
        q_ids, exact = [], {n: [] for n in self.layer_names}
        for ids, grads in self.query_gradients(query_loader):
            q_ids.append(ids)
            for n in self.layer_names:
                exact[n].append(self.transform.layers[n].whitened_query(grads.pop(n)))
        q_ids = torch.cat(q_ids)
        if q_ids.tolist() != candidates.query_ids.tolist():
            raise ValueError(f"{OWNER}.rerank: the query loader's ids differ from the candidates' query ids")
        exact = {n: torch.cat(v) for n, v in exact.items()}
        lists = [(candidates.ids, True)] + ([(candidates.opponent_ids, False)] if candidates.opponent_ids is not None else [])
        all_ids = torch.cat([c.reshape(-1) for c, _ in lists])
        union = torch.unique(all_ids[all_ids >= 0])
        positions = union if id_to_index is None else id_to_index(union)
        loader = DataLoader(Subset(train_data, positions.tolist()), batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
        rescored = [torch.full(c.shape, float("nan"), dtype=next(iter(exact.values())).dtype) for c, _ in lists]
        upos = [torch.where(c >= 0, torch.searchsorted(union, c.clamp_min(0)), -1) for c, _ in lists]
        dtype = next(iter(exact.values())).dtype
        start = 0
        for ids, data in iter_layer_data(self.model, loader, self.tracked, self.task, "loss", progress=self.progress,
                                         desc="re-ranking", default_ids=union):
            b = int(ids.shape[0])
            if not torch.equal(ids, union[start : start + b]):
                raise ValueError(f"{OWNER}.rerank: train_data returns examples whose ids {ids[:5].tolist()} are not the "
                                 f"candidates' {union[start : start + 5].tolist()}; pass id_to_index")
            block = sum(exact[n] @ self.transform.layers[n].whitened_train(data[n].a, data[n].ds, dtype).to(exact[n].device).T
                        for n in self.layer_names)
            for out, up in zip(rescored, upos):
                inside = (up >= start) & (up < start + b)
                out[inside] = block.gather(1, (up - start).clamp(0, b - 1))[inside].to(out.dtype)
            start += b
        results = []
        for (c, largest), s in zip(lists, rescored):
            keyed = torch.nan_to_num(s, nan=float("-inf") if largest else float("inf"))
            idx = torch.topk(keyed, min(k, c.shape[1]), dim=1, largest=largest).indices
            results.append((c.gather(1, idx), s.gather(1, idx)))
        up_ids, up_scores = results[0]
        if len(results) == 1:
            return TopInfluences(q_ids, up_ids, up_scores)
        return TopInfluences(q_ids, up_ids, up_scores, results[1][0], results[1][1])

    def scores(self, queries: "Iterable[Any] | QueryVectors", per_layer: bool = False, normalize: Normalize = "raw") -> InfluenceScores:
        """Dense scores ``[n_query, n_train]`` (one preallocated matrix; columns in index order).

        Args:
            queries: query batches, or :class:`QueryVectors` already computed (as in :meth:`search`).
            per_layer: also each layer's ``[n_query, n_train]`` term (their sum is the total;
                normalised variants divide them by the total's denominators).
            normalize: score variant, as in :meth:`search`.

        Returns:
            :class:`~lightning_influence.scores.InfluenceScores` (``method="ekfac-index"``) with
            ``pairwise``, ``query_ids``, ``train_ids`` (and ``self_influence`` when the build
            computed it); ``options["normalize"]`` says which variant.
        """
        check_normalize(f"{OWNER}.scores", normalize)
        self._check_normalizable(normalize)
        q = self._queries(queries)
        n_q, n = int(q.ids.shape[0]), self.n_examples
        ref = next(iter(q.vectors.values()))
        total = torch.empty(n_q, n, dtype=ref.dtype, device=ref.device)
        layers = {name: torch.empty(n_q, n, dtype=ref.dtype, device=ref.device) for name in self.layer_names} if per_layer else {}
        train_ids = torch.empty(n, dtype=torch.long)
        self_infl = torch.empty(n, dtype=torch.float32)
        for block, rows, s, parts in self._chunks(q.vectors, per_layer):
            cols = slice(block.start + rows.start, block.start + rows.stop)
            total[:, cols] = self._variant(s, parts, block, rows, normalize, q.norms)
            train_ids[cols] = block.ids[rows]
            self_infl[cols] = block.self_influence[rows]
            for name, p in parts.items():
                layers[name][:, cols] = p
        has_self = bool(torch.isfinite(self_infl).any())
        return InfluenceScores("ekfac-index", train_ids, self_influence=self_infl if has_self else None, query_ids=q.ids,
                               pairwise=total, per_layer=layers, options={**self.options(), "normalize": normalize})

    def self_influence(self, per_layer: bool = False) -> InfluenceScores:
        """Exact self-influence ``∇ℓ(z)ᵀ (G + λI)⁻¹ ∇ℓ(z) ≥ 0`` of every training example, stored
        by the build (no model needed).

        Args:
            per_layer: also each layer's term (needs a ``per_layer=True`` build).

        Raises:
            InfluenceIndexError: the build skipped self-influence (or per-layer terms, when asked).
        """
        settings = self.catalog.get("settings", {})
        if not settings.get("self_influence", True):
            raise InfluenceIndexError(f"{self.path} was built with self_influence=False")
        if per_layer and not settings.get("per_layer", False):
            raise InfluenceIndexError(f"{self.path} was built without per_layer=True: no per-layer self-influence")
        n = self.n_examples
        ids = torch.empty(n, dtype=torch.long)
        values = torch.empty(n, dtype=torch.float32)
        layers = {name: torch.empty(n, dtype=torch.float32) for name in self.layer_names} if per_layer else {}
        for block in self.blocks():
            cols = slice(block.start, block.start + int(block.ids.shape[0]))
            ids[cols], values[cols] = block.ids, block.self_influence
            for name in layers:
                layers[name][cols] = block.layer_self[name]
        return InfluenceScores("ekfac-index", ids, self_influence=values, per_layer=layers, options=self.options())

    def token_scores(self, query_loader: Iterable[Any], train_loader: Iterable[Any]) -> "TokenScores":
        """Per-token scores of the sequences of ``train_loader`` for each query (exact; they sum
        to the sequence scores). See :func:`~lightning_influence.index.tokens.token_scores`.

        Returns:
            :class:`~lightning_influence.index.tokens.TokenScores`.
        """
        from .tokens import token_scores

        return token_scores(self, query_loader, train_loader)

    def options(self) -> dict[str, Any]:
        """What the index was built with (for result manifests)."""
        return {"index": str(self.path), "compression": self.compression, "dim": self.transform.dim,
                "damping": dict(self.transform.damping), "layers": list(self.layer_names),
                "storage_dtype": self.catalog.get("settings", {}).get("dtype")}


def top_as_scores(top: TopInfluences, method: str = "ekfac-index", options: Optional[dict[str, Any]] = None) -> InfluenceScores:
    """A top-k result as :class:`~lightning_influence.scores.InfluenceScores` (what the report and
    :func:`~lightning_influence.scores.save_scores` read), without a dense matrix over the whole
    training set: the columns are the training examples that appear in some query's lists, and
    an entry is ``nan`` where that example is not in that query's lists (rankings skip ``nan``,
    so the report shows exactly each query's proponents and opponents).

    Args:
        top: proponents (and opponents) per query.
        method: recorded as ``InfluenceScores.method``.
        options: recorded as ``InfluenceScores.options``.

    Returns:
        ``InfluenceScores`` with ``pairwise: Tensor[Q, U]`` (float32) over ``U`` distinct ids and
        ``meta={"top_k": k, "sparse": True}``.
    """
    parts = [(top.ids, top.scores)] + ([(top.opponent_ids, top.opponent_scores)] if top.opponent_ids is not None else [])
    all_ids = torch.cat([i.reshape(-1) for i, _ in parts])
    union = torch.unique(all_ids[all_ids >= 0])
    dense = torch.full((top.query_ids.shape[0], union.shape[0]), float("nan"))
    for ids, scores in parts:
        ok = ids >= 0
        rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)[ok]
        dense[rows, torch.searchsorted(union, ids[ok])] = scores[ok].float()
    return InfluenceScores(method, union, query_ids=top.query_ids, pairwise=dense, options=dict(options or {}),
                           meta={"top_k": int(top.ids.shape[1]), "sparse": True})


def load_index(path: str | os.PathLike, model: Optional[nn.Module] = None, task: Optional[TaskLike] = None,
               progress: Optional[bool] = None, allow_other_weights: bool = False) -> InfluenceIndex:
    """Open the index at ``path`` (catalog and transform verified; shards are verified when read).

    Args:
        path: the index folder.
        model: bind this model for queries (see :meth:`InfluenceIndex.bind`); its tracked weights are checked
            against the ones the index was built with.
        task: how to read query batches.
        progress: show progress bars.
        allow_other_weights: bind ``model`` although its weights are not the ones the index
            was built with (a later checkpoint, a fine-tuned model).

    Raises:
        InfluenceIndexError: no finished index at ``path`` (a build still running or
            interrupted has no catalog yet), or its parts do not match.
        WeightsMismatchError: ``model``'s weights are not the build's (the message gives
            both fingerprints); pass ``allow_other_weights=True`` if you mean it.
    """
    root = Path(path)
    try:
        _, catalog = read_artifact(root / "catalog", kind=CATALOG_KIND)
    except Exception as e:
        raise InfluenceIndexError(
            f"no finished influence index at {root} ({e}); build one with build_index (an interrupted build "
            "resumes when run again)"
        ) from e
    transform, tm = IndexTransform.load(root / "transform", index_dir=root)
    if tm.get("fingerprint") != catalog.get("fingerprint"):
        raise InfluenceIndexError(f"{root}: the transform and the catalog belong to different builds")
    index = InfluenceIndex(root, catalog, transform, model, task, progress)
    if model is not None and not allow_other_weights:
        _check_build_weights(index, tm)
    return index


def _check_build_weights(index: InfluenceIndex, transform_manifest: dict[str, Any]) -> None:
    """Raise :class:`~lightning_influence.weights.WeightsMismatchError` unless the bound model's
    tracked weights are the ones the index was built with: against the catalog's ``"weights"``
    fingerprint when it has one, else by recomputing the build fingerprint (transform, settings
    and a SHA-256 of the tracked weights, as the builder made it) with the model's weights."""
    from ..weights import WeightsFingerprint, WeightsMismatchError, check_weights
    from .builder import _model_digest

    where = f"index at {index.path}"
    stored = WeightsFingerprint.from_manifest(index.catalog.get("weights"))
    if stored is not None:
        check_weights(stored, index.model, where, "the model given to load_index")
        return
    built = index.catalog.get("fingerprint")
    settings = transform_manifest.get("settings")
    if not isinstance(built, str) or not isinstance(settings, dict):
        return  # nothing recorded to compare with
    now = index.transform.fingerprint({"settings": settings, "model": _model_digest(index.tracked)})
    if now != built:
        raise WeightsMismatchError(
            f"the model's weights are not the ones the {where} was built with:\n"
            f"  {where}: build fingerprint {built[:16]} (transform, settings and tracked weights, recorded by build_index)\n"
            f"  the model given to load_index: build fingerprint {now[:16]} (the same, with this model's weights, computed now)\n"
            "Load the trained weights (e.g. the checkpoint the run saved: MyModule.load_from_checkpoint(path)); "
            "if you mean to use other weights (a later checkpoint, a fine-tuned model), pass allow_other_weights=True"
        )
