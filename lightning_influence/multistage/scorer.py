"""The multi-stage scorer: both stages' preconditioners, the gradient passes of both sides and
the scores (pairwise, streaming top-k, against a loader, stored candidates or an index).

Layer pairing lives in :mod:`.pairing` and score arithmetic in :mod:`.scoring`; the damping
sweep (:class:`.sweep.DampingSweep`) and candidate narrowing (:class:`.narrowing.Narrowing`) are
mixins of the class. No Lightning import.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import validation as check
from ..ekfac.capture import per_example_gradients, rotated_per_example_gradients
from ..ekfac.factors import EKFACFactors
from ..ekfac.layer_data import iter_layer_data
from ..ekfac.preconditioner import Preconditioner, StageDamping
from ..ekfac.scorer import ColumnBuffer, size_hint
from ..layers import TrackedLayer, named_modules
from ..ranking import StreamingTopInfluences, TopInfluences
from ..scores import InfluenceScores
from ..task import TaskLike, resolve_task
from ..normalization import Normalize, check_normalize, needs_query_norms
from ..weights import WeightsFingerprint, check_weights
from .narrowing import Narrowing
from .pairing import LayerMap, finetuned_damping, pair_layers
from .scoring import CandidateGradients, LayerGrads, chunk_scores, normalized, query_norms, stored_chunks
from .sweep import DampingSweep

if TYPE_CHECKING:  # pragma: no cover
    from ..index.search import InfluenceIndex, QueryVectors

__all__ = ["MultiStageScorer"]

OWNER = "MultiStageScorer"


def _is_index(x: Any) -> bool:
    from ..index.search import InfluenceIndex

    return isinstance(x, InfluenceIndex)


class MultiStageScorer(Narrowing, DampingSweep):
    """Multi-stage EK-FAC influence of pre-training examples on a fine-tuned model's queries.

    ``score(z_pt, x) = ∇m(x, θ_ft)ᵀ (G_ft + λ_ft I)⁻¹ (G_pt + λ_pt I)⁻¹ ∇ℓ_pt(z_pt, θ_pt)``
    summed over shared layers (positive = ``z_pt`` lowers ``m(x)``: it helps).

    Args:
        pretrained_model: the model at the pre-trained weights θ_pt (``nn.Module`` or LightningModule).
        pretrained_factors: EK-FAC factors of the pre-training loss at θ_pt (e.g. from
            :class:`~lightning_influence.EKFACInfluence` during pre-training), or ``None`` for
            the identity (then ``layers`` names the layers).
        finetuned_model: the model at the fine-tuned weights θ_ft.
        finetuned_factors: EK-FAC factors of the fine-tuning loss at θ_ft, or ``None`` for the
            identity (the "gradient dot product" baseline when both are ``None``).
        task: how to read batches (per-example loss of pre-training batches, measurement of
            query batches); default: the modules' methods / the batch layout.
        damping_pt: damping λ of the pre-training stage: a finite float ``≥ 0`` (absolute, in
            the units of Λ), a mapping pre-trained layer name → float, ``"identity"`` (that
            stage's preconditioner is the identity), a rule name (``"spectrum"``, ``"mean"``:
            :mod:`lightning_influence.ekfac.damping`), or ``None`` for the default rule
            (``"spectrum"``: the 75% quantile of the eigenvalues of the stage's used layers, pooled).
        damping_ft: damping λ of the fine-tuning stage, as ``damping_pt`` (a mapping may use
            fine-tuned or pre-trained layer names).
        layers: glob pattern(s) over pre-trained-model layer names, with the library's one rule
            (:func:`lightning_influence.patterns.matches`); each must match a layer of
            ``pretrained_factors`` (or a supported layer of the model when it is ``None``).
            Default: every layer of ``pretrained_factors``.
        layer_map: pre-trained layer name → fine-tuned layer name, for models whose module
            names differ (e.g. a prefix added by a wrapper); default: same names.
        finetuned_task: task for the query batches if it differs from ``task``.
        dtype: compute dtype of gradients, preconditioning and scores (``torch.float32`` or
            ``torch.float64``; default float32, or float64 when either model is float64).
        progress: show progress bars (``None``: only on a terminal).
        allow_other_weights: accept models whose weights are not the ones their factors were made
            with; by default each model is checked against the fingerprint its factors recorded
            (pre-trained model ↔ pre-training factors, fine-tuned model ↔ fine-tuning factors).

    Attributes:
        layers_used: pre-trained layer names that take part (in order).
        layer_pairs: ``{pt name: ft name}`` of the layers used.
        layers_excluded: ``{name: reason}`` of the considered layers left out.
        preconditioner_pt: the pre-training stage's
            :class:`~lightning_influence.ekfac.preconditioner.Preconditioner` (pre-trained layer
            names; ``.damping`` holds the λ per layer, empty for the identity).
        preconditioner_ft: the fine-tuning stage's, keyed by fine-tuned layer names.
        candidate_seconds: wall time of the last :meth:`candidates` pass.
        query_seconds: wall time of the last query gradient pass.

    Raises:
        NoSharedLayersError: no layer is present with equal shapes in both models and factors.
        InvalidArgumentError: an argument of the wrong type or value (a ``ValueError`` and a
            ``TypeError``).
        PatternError: a ``layers`` pattern matches no layer.
        WeightsMismatchError: a model's weights are not the ones its factors were made with (the
            message gives both fingerprints); pass ``allow_other_weights=True`` if you mean it.

    Examples without ids (batches that carry none) are named by their position in the loader.
    """

    OWNER = OWNER

    def __init__(
        self,
        pretrained_model: nn.Module,
        pretrained_factors: Optional[EKFACFactors],
        finetuned_model: nn.Module,
        finetuned_factors: Optional[EKFACFactors],
        task: Optional[TaskLike] = None,
        damping_pt: StageDamping = None,
        damping_ft: StageDamping = None,
        layers: Optional[str | Sequence[str]] = None,
        layer_map: LayerMap = None,
        finetuned_task: Optional[TaskLike] = None,
        dtype: Optional[torch.dtype] = None,
        progress: Optional[bool] = None,
        allow_other_weights: bool = False,
    ) -> None:
        check.module(OWNER, "pretrained_model", pretrained_model)
        check.module(OWNER, "finetuned_model", finetuned_model)
        for arg, factors in (("pretrained_factors", pretrained_factors), ("finetuned_factors", finetuned_factors)):
            check.instance(OWNER, arg, factors, EKFACFactors, "EKFACFactors (see load_factors) or None for the identity", allow_none=True)
        check.boolean(OWNER, "allow_other_weights", allow_other_weights)
        for stage, factors, model in (("pretrained", pretrained_factors, pretrained_model),
                                      ("finetuned", finetuned_factors, finetuned_model)):
            if factors is not None:
                check_weights(WeightsFingerprint.from_manifest(factors.meta.get("weights")), model,
                              f"{stage}_factors", f"the {stage}_model given to {OWNER}", allow_other_weights)
        check.stage_damping(OWNER, "damping_pt", damping_pt, pretrained_factors is not None)
        check.stage_damping(OWNER, "damping_ft", damping_ft, finetuned_factors is not None)
        if layer_map is not None and not (isinstance(layer_map, Mapping) or callable(layer_map)):
            raise check.InvalidArgumentError(
                f"{OWNER}(layer_map=...) must be a mapping pt name → ft name, a callable or None, got {type(layer_map).__name__}"
            )
        check.choice(OWNER, "dtype", dtype, (torch.float32, torch.float64, None))
        patterns = check.patterns(OWNER, "layers", layers)
        if pretrained_factors is None and finetuned_factors is None and patterns is None:
            raise check.InvalidArgumentError(
                f"{OWNER}(layers=...) is required when both pretrained_factors and finetuned_factors are None (identity preconditioners)"
            )

        # names of the unwrapped models: an FSDP-trained model and its consolidated checkpoint match alike
        pt_modules, ft_modules = named_modules(pretrained_model), named_modules(finetuned_model)
        self.layer_pairs, self.layers_excluded = pair_layers(
            OWNER, pt_modules, ft_modules, pretrained_model, pretrained_factors, finetuned_factors, patterns, layer_map
        )
        self.layers_used = list(self.layer_pairs)

        pdtypes = [next(pretrained_model.parameters()).dtype, next(finetuned_model.parameters()).dtype]
        self.dtype = dtype or (torch.float64 if torch.float64 in pdtypes else torch.float32)
        self.pretrained_model, self.finetuned_model = pretrained_model, finetuned_model
        self.device = next(pretrained_model.parameters()).device
        self.task = resolve_task(pretrained_model, task)
        self.finetuned_task = resolve_task(finetuned_model, finetuned_task if finetuned_task is not None else task)
        self.tracked_pt = [TrackedLayer.from_module(n, pt_modules[n]) for n in self.layers_used]
        self.tracked_ft = [TrackedLayer.from_module(n, ft_modules[n]) for n in self.layer_pairs.values()]
        self.preconditioner_pt = self._preconditioner(
            "damping_pt", pretrained_factors, self.layers_used, damping_pt, self.device
        )
        self.preconditioner_ft = self._preconditioner(
            "damping_ft", finetuned_factors, list(self.layer_pairs.values()), damping_ft, next(finetuned_model.parameters()).device
        )
        self.progress = progress
        self.candidate_seconds = 0.0
        self.query_seconds = 0.0

    # -- preconditioners --------------------------------------------------------------------
    def _preconditioner(
        self, arg: str, factors: Optional[EKFACFactors], names: list[str], damping: StageDamping, device: torch.device
    ) -> Preconditioner:
        if arg == "damping_ft":
            damping = finetuned_damping(self.layer_pairs, damping)
        try:
            return Preconditioner(factors, names, damping, self.dtype, device)
        except ValueError as e:
            raise check.InvalidArgumentError(f"{OWNER}({arg}={damping!r}): {e}") from e

    # -- gradients --------------------------------------------------------------------------
    def _gradients(
        self, side: Literal["pt", "ft"], loader: Iterable[Any], default_ids: Optional[Tensor] = None,
        rotate_with: Optional[Preconditioner] = None,
    ) -> Iterator[tuple[Tensor, LayerGrads]]:
        """Per batch: ids ``LongTensor[b]`` (CPU) and per-example gradients
        ``{pt layer name: Tensor[b, d_out, a_dim]}`` in :attr:`dtype`: raw, or rotated into the
        eigenbasis of ``rotate_with`` (the stage's preconditioner; from the layer's token data in
        the cheaper contraction order, never a rotation of the formed gradient).

        ``"pt"``: the per-example loss at θ_pt; ``"ft"``: the measurement at θ_ft. Batches
        without ids take ``default_ids[position]`` (default: the position in the loader).
        """
        if side == "pt":
            model, tracked, task, which, desc = self.pretrained_model, self.tracked_pt, self.task, "loss", "pre-training gradients"
        else:
            model, tracked, task, which, desc = self.finetuned_model, self.tracked_ft, self.finetuned_task, "measurement", "query gradients"
        for ids, data in iter_layer_data(model, loader, tracked, task, which, progress=self.progress, desc=desc, default_ids=default_ids):
            out = {}
            for n, t in zip(self.layers_used, tracked):
                io = data.pop(t.name)
                f = rotate_with.factors.get(t.name) if rotate_with is not None else None
                if f is not None:
                    out[n] = rotated_per_example_gradients(io.a, io.ds, f.q_a, f.q_s, self.dtype)
                else:
                    out[n] = per_example_gradients(io.a, io.ds, dtype=self.dtype)
            yield ids, out

    def _candidate_side(self, name: str, rotated: Tensor, pt: Preconditioner) -> Tensor:
        """``(G_pt + λ_pt I)⁻¹ ∇ℓ`` in the pre-training eigenbasis, flattened ``[b, d_out·a_dim]``,
        from the gradient already rotated into that basis."""
        return pt.scale(name, rotated).reshape(rotated.shape[0], -1)

    def _query_side(self, name: str, rotated: Tensor, ft: Preconditioner) -> Tensor:
        """``(G_ft + λ_ft I)⁻¹ ∇m`` in the pre-training eigenbasis, flattened ``[b, d_out·a_dim]``,
        from the gradient already rotated into the fine-tuning eigenbasis by ``ft``."""
        ft_name = self.layer_pairs[name]
        v = ft.unrotate(ft_name, ft.scale(ft_name, rotated)).to(self.device)
        r = self.preconditioner_pt.rotate(name, v)
        return r.reshape(r.shape[0], -1)

    def _candidate_batches(self, loader: Iterable[Any], default_ids: Optional[Tensor] = None) -> Iterator[tuple[Tensor, LayerGrads]]:
        """The pre-training side batch by batch (see :class:`CandidateGradients`)."""
        pt = self.preconditioner_pt
        for ids, rotated in self._gradients("pt", loader, default_ids, rotate_with=pt):
            yield ids, {n: self._candidate_side(n, r, pt) for n, r in rotated.items()}

    def _candidates(self, loader: Iterable[Any], default_ids: Optional[Tensor] = None) -> CandidateGradients:
        t0 = time.perf_counter()
        ids, grads = [], {n: [] for n in self.layers_used}
        for bid, chunk in self._candidate_batches(loader, default_ids):
            ids.append(bid)
            for n, g in chunk.items():
                grads[n].append(g)
        if not ids:
            raise ValueError(f"{OWNER}: the pre-training loader yielded no batch")
        self.candidate_seconds = time.perf_counter() - t0
        return CandidateGradients(torch.cat(ids), {n: torch.cat(g) for n, g in grads.items()}, self.candidate_seconds)

    def candidates(self, train_loader: Iterable[Any]) -> CandidateGradients:
        """Pre-training side for every example of ``train_loader`` (once; reuse across queries).

        Returns:
            :class:`CandidateGradients` holding ``(G_pt + λ_pt I)⁻¹ ∇ℓ_pt(z, θ_pt)`` per layer,
            expressed in the pre-training Kronecker eigenbasis (``Q_Sᵀ · Q_A``, an orthogonal
            change of basis, so inner products are unchanged): one rotation per example
            instead of a rotation and its inverse. ``Tensor[N, d_out·a_dim]`` in ``self.dtype``;
            ids ``LongTensor[N]`` (positions in the loader when the batches carry none).
        """
        return self._candidates(train_loader)

    def build_index(self, train_loader: Iterable[Any], path: str | os.PathLike, **options: Any) -> "InfluenceIndex":
        """Write the pre-training side to disk once, as an
        :class:`~lightning_influence.index.InfluenceIndex`, for any number of fine-tuned query sets
        (:meth:`pairwise` and :meth:`search` accept it in place of a loader).

        The index holds ``Π(√W_pt ⊙ Q_Sᵀ ∇ℓ_pt(z, θ_pt) Q_A)`` per shared layer (the pre-training
        stage's factors and damping, exactly the single-stage index of the pre-trained model),
        and the queries become ``Π(√W_pt ⊙ Q_Sᵀ [(G_ft + λ_ft I)⁻¹ ∇m(x, θ_ft)] Q_A)``: with
        ``compression="exact"`` the scores equal :meth:`pairwise` over the loader.

        Args:
            train_loader: pre-training batches, in a fixed order.
            path: the index folder.
            **options: :func:`~lightning_influence.index.build_index` options: ``compression``,
                ``dim``, ``dtype`` (storage), ``seed``, ``shard_size``, ``per_layer``,
                ``self_influence``, ``if_exists``, ``rank``, ``world_size``, ``barrier``.

        Returns:
            The index (bound to the pre-trained model; its own ``search`` gives single-stage
            scores of the pre-trained model).
        """
        from ..index.builder import IndexOptions, build_index_from_preconditioner

        build_keys = ("if_exists", "rank", "world_size", "barrier")
        build = {k: options.pop(k) for k in build_keys if k in options}
        unknown = set(options) - set(IndexOptions.__dataclass_fields__)
        if unknown:
            raise check.InvalidArgumentError(f"{OWNER}.build_index got unknown options {sorted(unknown)}")
        opts = IndexOptions(**options)
        return build_index_from_preconditioner(self.pretrained_model, self.preconditioner_pt, self.tracked_pt, train_loader, path, opts,
                                self.task, self.dtype, progress=self.progress, **build)

    def _check_index(self, index: "InfluenceIndex") -> None:
        """The index must hold this scorer's pre-training side: same layers, same damping."""
        if index.layer_names != self.layers_used:
            raise ValueError(f"{OWNER}: the index at {index.path} holds layers {index.layer_names}, this scorer uses "
                             f"{self.layers_used}; build it with this scorer's build_index()")
        pt = self.preconditioner_pt
        want = {} if pt.identity else dict(pt.damping)
        have = dict(index.transform.damping)
        if set(want) != set(have) or any(abs(want[n] - have[n]) > 1e-9 * max(1.0, abs(want[n])) for n in want):
            raise ValueError(f"{OWNER}: the index at {index.path} was built with damping {have or 'identity'}, this scorer's "
                             f"pre-training damping is {want or 'identity'}; build it with this scorer's build_index()")

    def _index_queries(self, query_loader: Iterable[Any], index: "InfluenceIndex") -> "QueryVectors":
        """Query vectors of the index's space: ``(G_ft + λ_ft I)⁻¹ ∇m(x, θ_ft)`` per shared layer
        in the standard basis, then the index's rotation, whitening and projection; their norms
        are the exact squared norms in the pre-training inner product."""
        self._check_index(index)
        ft = self.preconditioner_ft
        t0 = time.perf_counter()

        def batches():
            for bid, rotated in self._gradients("ft", query_loader, rotate_with=ft):
                yield bid, {n: ft.unrotate(self.layer_pairs[n], ft.scale(self.layer_pairs[n], rotated.pop(n))).to(self.device)
                            for n in self.layers_used}

        out = index.vectors_of(batches())
        self.query_seconds = time.perf_counter() - t0
        return out

    def _query_pass(self, query_loader: Iterable[Any], ft: Preconditioner, transform: Callable[[str, Tensor], Tensor]) -> tuple[Tensor, LayerGrads]:
        """Ids ``[Q]`` and ``{pt name: transform(name, ft-rotated gradient)}`` over all queries,
        each batch transformed as soon as it exists (raw and transformed copies of all queries
        never coexist)."""
        t0 = time.perf_counter()
        ids, out = [], {n: [] for n in self.layers_used}
        for bid, rotated in self._gradients("ft", query_loader, rotate_with=ft):
            ids.append(bid)
            for n in self.layers_used:
                out[n].append(transform(n, rotated.pop(n)))
        if not ids:
            raise ValueError(f"{OWNER}: the query loader yielded no batch")
        self.query_seconds = time.perf_counter() - t0
        return torch.cat(ids), {n: torch.cat(v) for n, v in out.items()}

    def query_gradients(self, query_loader: Iterable[Any]) -> tuple[Tensor, LayerGrads]:
        """Fine-tuned side: ``(G_ft + λ_ft I)⁻¹ ∇m(x, θ_ft)`` per layer, in the basis of
        :class:`CandidateGradients` (the pre-training eigenbasis), keyed by **pre-trained**
        layer names.

        Returns:
            ``(query ids LongTensor[Q], {pt name: Tensor[Q, d_out·a_dim]})`` in :attr:`dtype`.
        """
        ft = self.preconditioner_ft
        return self._query_pass(query_loader, ft, lambda n, r: self._query_side(n, r, ft))

    def _candidate_chunks(self, train_or_candidates: Iterable[Any] | CandidateGradients) -> Iterator[tuple[Tensor, LayerGrads]]:
        """``(ids[c], {layer: Tensor[c, P]})`` chunks of the pre-training side: slices of stored
        candidates, or one per training batch (formed, scored and dropped)."""
        if isinstance(train_or_candidates, CandidateGradients):
            return stored_chunks(OWNER, train_or_candidates, self.layers_used)
        return self._candidate_batches(train_or_candidates)

    # -- scores -----------------------------------------------------------------------------
    def pairwise(
        self,
        query_loader: Iterable[Any],
        train_or_candidates: "Iterable[Any] | CandidateGradients | InfluenceIndex",
        per_layer: bool = False,
        normalize: Normalize = "raw",
    ) -> InfluenceScores:
        """Multi-stage scores of every query against every pre-training example.

        Memory: the output (preallocated when the number of pre-training examples is known:
        a sized loader, candidates or an index), the query vectors and one chunk of the
        pre-training side.

        Args:
            query_loader: query batches (their measurement is taken at θ_ft).
            train_or_candidates: pre-training batches, :class:`CandidateGradients` from
                :meth:`candidates`, or an :class:`~lightning_influence.index.InfluenceIndex` from
                :meth:`build_index` (both let many query sets reuse one pass over the
                pre-training data; the index lives on disk).
            per_layer: also keep each shared layer's ``[n_query, n_train]`` term, keyed by
                pre-trained layer name (their sum is the total).
            normalize: score variant (:mod:`lightning_influence.normalization`): ``"raw"``,
                ``"cosine"`` (divided by ``‖P_ft ∇m‖`` and ``‖∇ℓ‖``, both in the pre-training
                inner product ``P_pt``) or ``"relative"`` (divided by the pre-training
                self-influence ``∇ℓᵀ P_pt ∇ℓ``). With an index, it must hold self-influence
                (built with ``self_influence=True``, the default).

        Returns:
            :class:`~lightning_influence.scores.InfluenceScores` with ``method="multistage"``,
            ``pairwise: Tensor[n_query, n_train]`` in :attr:`dtype` (positive = the pre-training
            example helps the query), ``query_ids`` and ``train_ids`` (``LongTensor``;
            positions when the batches carry none) and the dampings, their rules and ``normalize``
            in ``options``.
        """
        check.boolean(f"{OWNER}.pairwise", "per_layer", per_layer)
        check_normalize(f"{OWNER}.pairwise", normalize)
        if _is_index(train_or_candidates):
            result = train_or_candidates.scores(self._index_queries(query_loader, train_or_candidates), per_layer, normalize=normalize)
            result.method, result.self_influence = "multistage", None
            result.options = {**self._options(normalize), "index": result.options}
            return result
        q_ids, queries = self.query_gradients(query_loader)
        q_self = query_norms(queries, self.preconditioner_pt) if needs_query_norms(normalize) else None
        hint = len(train_or_candidates) if isinstance(train_or_candidates, CandidateGradients) else size_hint(train_or_candidates)
        n_q = q_ids.shape[0]
        ids = ColumnBuffer(None, hint, torch.long)
        total = ColumnBuffer(n_q, hint, self.dtype, self.device)
        layers = {n: ColumnBuffer(n_q, hint, self.dtype, self.device) for n in self.layers_used} if per_layer else {}
        for bid, chunk in self._candidate_chunks(train_or_candidates):
            block, parts = normalized(chunk_scores(queries, chunk), chunk, normalize, q_self, self.preconditioner_pt)
            del chunk
            ids.append(bid)
            total.append(block)
            for n, col in layers.items():
                col.append(parts[n])
        if not ids.n:
            raise ValueError(f"{OWNER}.pairwise: the pre-training loader yielded no batch")
        return InfluenceScores(
            "multistage", ids.tensor(), query_ids=q_ids, pairwise=total.tensor(),
            per_layer={n: c.tensor() for n, c in layers.items()}, options=self._options(normalize),
        )

    def search(
        self,
        query_loader: Iterable[Any],
        train_or_candidates: "Iterable[Any] | CandidateGradients | InfluenceIndex",
        k: int = 10,
        opponents: bool = False,
        normalize: Normalize = "raw",
    ) -> TopInfluences:
        """The ``k`` most helpful (and, with ``opponents``, most harmful) pre-training examples per
        query, in ``O(n_query · k)`` memory beyond one candidate chunk (streaming top-k over
        training batches, slices of :class:`CandidateGradients`, or the shards of an
        :class:`~lightning_influence.index.InfluenceIndex`), ranked by the ``normalize`` variant
        (as in :meth:`pairwise`).

        Returns:
            :class:`~lightning_influence.ranking.TopInfluences`: ``query_ids [Q]``, ``ids`` and
            ``scores`` ``[Q, min(k, n_train)]`` highest first, and the opponents (lowest first)
            or ``None``; all on the CPU.
        """
        check.positive_int(f"{OWNER}.search", "k", k)
        check.boolean(f"{OWNER}.search", "opponents", opponents)
        check_normalize(f"{OWNER}.search", normalize)
        if _is_index(train_or_candidates):
            return train_or_candidates.search(self._index_queries(query_loader, train_or_candidates), k, opponents, normalize=normalize)
        q_ids, queries = self.query_gradients(query_loader)
        q_self = query_norms(queries, self.preconditioner_pt) if needs_query_norms(normalize) else None
        top = StreamingTopInfluences(q_ids, k, opponents)
        for bid, chunk in self._candidate_chunks(train_or_candidates):
            top.update(normalized(chunk_scores(queries, chunk), chunk, normalize, q_self, self.preconditioner_pt)[0], bid)
        return top.result()

    # -- reporting --------------------------------------------------------------------------
    def _options(self, normalize: str = "raw", pt: Optional[Preconditioner] = None, ft: Optional[Preconditioner] = None) -> dict[str, Any]:
        """JSON-serialisable options of scores made with ``pt`` / ``ft`` (default: this scorer's)."""
        pt, ft = pt or self.preconditioner_pt, ft or self.preconditioner_ft
        return {
            "damping_pt": "identity" if pt.identity else dict(pt.damping),
            "damping_ft": "identity" if ft.identity else dict(ft.damping),
            "damping_rule_pt": pt.damping_rule,
            "damping_rule_ft": ft.damping_rule,
            "normalize": normalize,
            "layers": list(self.layers_used),
            "layer_pairs": dict(self.layer_pairs),
        }

    def describe(self) -> str:
        """A short text report: layers used, layers excluded with reasons, dampings."""
        pt, ft = self.preconditioner_pt, self.preconditioner_ft
        lines = [f"{OWNER}: {len(self.layers_used)} layer(s) used, {len(self.layers_excluded)} excluded"]
        for n, ft_name in self.layer_pairs.items():
            dp = "identity" if pt.identity else f"{pt.damping[n]:.3g}"
            df = "identity" if ft.identity else f"{ft.damping[ft_name]:.3g}"
            lines.append(f"  used     {n}" + (f" -> {ft_name}" if ft_name != n else "") + f"  (λ_pt={dp}, λ_ft={df})")
        for n, r in self.layers_excluded.items():
            lines.append(f"  excluded {n}: {r}")
        return "\n".join(lines)

