"""Multi-stage influence: attribute a fine-tuned model's predictions to pre-training data.

Implements the multi-stage influence function of Ding et al. (arXiv 2505.05017) on top of the
EK-FAC factors of both stages::

    score(z_pt, x) = ∇m(x, θ_ft)ᵀ (G_ft + λ_ft I)⁻¹ (G_pt + λ_pt I)⁻¹ ∇ℓ_pt(z_pt, θ_pt)

* ``∇m(x, θ_ft)``: gradient of the query measurement at the **fine-tuned** weights;
* ``(G_ft + λ_ft I)⁻¹``: damped EK-FAC inverse curvature of the fine-tuning loss;
* ``(G_pt + λ_pt I)⁻¹``: damped EK-FAC inverse curvature of the pre-training loss;
* ``∇ℓ_pt(z_pt, θ_pt)``: gradient of the pre-training example's (token-summed) loss at the
  **pre-trained** weights.

Each stage's ``(G + λI)⁻¹`` is one :class:`~lightning_influence.ekfac.preconditioner.Preconditioner`
(the one the single-stage :class:`~lightning_influence.InfluenceScorer` uses), and every gradient
comes from :func:`~lightning_influence.ekfac.passes.iter_layer_data`. Both preconditioners are
block-diagonal over layers and symmetric, so the score is ``Σ_layers ⟨P_ft ∇m(x), P_pt ∇ℓ(z)⟩``:
the pre-training side ``P_pt ∇ℓ(z)`` is computed once per candidate
(:meth:`MultiStageScorer.candidates`) and reused by every query.

Only layers present with equal gradient shapes in both models (and in both factor sets) take
part; a replaced head is left out, and :attr:`MultiStageScorer.layers_excluded` says why each
other layer was left out. Either model may be sharded (FSDP1 or FSDP2, e.g. the model a sharded
run trained, scored on every rank alike) or a consolidated checkpoint in a plain module: layers
are matched by their names in the unwrapped model and their declared sizes
(:func:`~lightning_influence.layers.named_modules`).

**Sign:** a positive score means up-weighting the pre-training example ``z`` *lowers* the
fine-tuned model's measurement on ``x`` (``z`` helps ``x``), as everywhere in this library.
Scores are not normalised by dataset size.

Candidate narrowing (the paper's §4.3): :meth:`MultiStageScorer.narrowed` first keeps, for
each query, its ``k`` nearest pre-training examples in an embedding space (a user function, by
default :class:`~lightning_influence.retrieval.MeanPooledHiddenStates` of the pre-trained model)
and computes pre-training gradients only for the union of those candidates.

For question answering, the measurement is the loss of the answer tokens given the prompt:
:func:`lightning_influence.data.qa_collate` builds causal-LM batches whose ``labels`` are
``-100`` on the prompt, so the default measurement is exactly ``-log p(answer | prompt)``.

No Lightning import: the scorer works on plain ``nn.Module`` models as well as LightningModules.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import validation as check
from .ekfac.capture import per_example_gradients, rotated_per_example_gradients
from .ekfac.damping import DAMPING_RULES
from .ekfac.factors import EKFACFactors, FactorMismatchError
from .ekfac.passes import iter_layer_data
from .ekfac.preconditioner import Preconditioner, StageDamping
from .ekfac.scorer import ColumnBuffer, size_hint
from .layers import LayerSelectionError, TrackedLayer, named_modules, select_layers
from .patterns import select_names
from .ranking import StreamingTopInfluences, TopInfluences
from .retrieval import METRICS, EmbedFn, MeanPooledHiddenStates, Metric, knn_indices
from .scores import InfluenceScores
from .task import TaskLike, resolve_task
from .variants import Normalize, check_normalize, needs_query_norms, needs_train_norms, normalize_scores
from .weights import WeightsFingerprint, check_weights

if TYPE_CHECKING:  # pragma: no cover
    from .index.search import InfluenceIndex

__all__ = [
    "MultiStageScorer",
    "NoSharedLayersError",
    "CandidateGradients",
    "NarrowedScores",
    "StageDamping",
]

OWNER = "MultiStageScorer"
CANDIDATE_CHUNK = 4096
"""Candidates scored per matrix product when scoring stored :class:`CandidateGradients`."""

LayerGrads = dict[str, Tensor]


class NoSharedLayersError(FactorMismatchError):
    """The pre-trained and fine-tuned models (and factors) share no layer of equal shape."""


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
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


def _is_index(x: Any) -> bool:
    from .index.search import InfluenceIndex

    return isinstance(x, InfluenceIndex)


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------
def _check_damping(arg: str, value: Any, has_factors: bool, owner: str = OWNER) -> StageDamping:
    """A stage damping: a finite float ``≥ 0``, a mapping layer → such a float, ``"identity"``, a
    rule name or ``None``; anything but ``None`` / ``"identity"`` is refused for a stage without factors."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            check.finite_float(owner, f"{arg}[{k!r}]", v, minimum=0.0)
    elif value is not None and value != "identity" and not (isinstance(value, str) and value in DAMPING_RULES):
        try:
            check.finite_float(owner, arg, value, minimum=0.0)
        except check.InvalidArgumentError:
            raise check.InvalidArgumentError(
                f"{owner}({arg}=...) must be a finite float >= 0, a mapping layer → float, 'identity', "
                f"a rule name {sorted(DAMPING_RULES)} or None (the default rule, per layer), got {value!r}"
            ) from None
    if not has_factors and value not in (None, "identity"):
        stage = "pretrained_factors" if arg.endswith("_pt") else "finetuned_factors"
        raise check.InvalidArgumentError(
            f"{owner}({arg}={value!r}) has no effect: {stage} is None (identity preconditioner); pass {arg}=None or the factors"
        )
    return value


def _check_module(arg: str, value: Any) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise check.InvalidArgumentError(f"{OWNER}({arg}=...) must be an nn.Module, got {type(value).__name__}")
    return value


def _check_factors(arg: str, value: Any) -> Optional[EKFACFactors]:
    if value is not None and not isinstance(value, EKFACFactors):
        raise check.InvalidArgumentError(
            f"{OWNER}({arg}=...) must be EKFACFactors (see load_factors) or None for the identity, got {type(value).__name__}"
        )
    return value


def _check_dataset(owner: str, arg: str, value: Any) -> Any:
    """A map-style dataset (``__len__`` and ``__getitem__``; not a DataLoader)."""
    if isinstance(value, DataLoader) or isinstance(value, (str, bytes)) or not (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        raise check.InvalidArgumentError(f"{owner}({arg}=...) must be a map-style dataset (with __len__ and __getitem__), got {type(value).__name__}")
    return value


def _damping_key(value: StageDamping) -> Any:
    """Hashable form of a damping for :meth:`MultiStageScorer.damping_sweep` keys."""
    return repr(sorted(value.items())) if isinstance(value, Mapping) else value


# ----------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------
class MultiStageScorer:
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
        layer_map: Optional[Mapping[str, str] | Callable[[str], str]] = None,
        finetuned_task: Optional[TaskLike] = None,
        dtype: Optional[torch.dtype] = None,
        progress: Optional[bool] = None,
        allow_other_weights: bool = False,
    ) -> None:
        _check_module("pretrained_model", pretrained_model)
        _check_module("finetuned_model", finetuned_model)
        _check_factors("pretrained_factors", pretrained_factors)
        _check_factors("finetuned_factors", finetuned_factors)
        check.boolean(OWNER, "allow_other_weights", allow_other_weights)
        for stage, factors, model in (("pretrained", pretrained_factors, pretrained_model),
                                      ("finetuned", finetuned_factors, finetuned_model)):
            if factors is not None:
                check_weights(WeightsFingerprint.from_manifest(factors.meta.get("weights")), model,
                              f"{stage}_factors", f"the {stage}_model given to {OWNER}", allow_other_weights)
        _check_damping("damping_pt", damping_pt, pretrained_factors is not None)
        _check_damping("damping_ft", damping_ft, finetuned_factors is not None)
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

        self.layer_pairs: dict[str, str] = {}
        self.layers_excluded: dict[str, str] = {}
        # names of the unwrapped models: an FSDP-trained model and its consolidated checkpoint match alike
        pt_modules, ft_modules = named_modules(pretrained_model), named_modules(finetuned_model)
        for name in self._candidate_names(pretrained_model, pretrained_factors, patterns):
            ft_name = name if layer_map is None else (layer_map.get(name, name) if isinstance(layer_map, Mapping) else layer_map(name))
            reason = self._exclusion(name, ft_name, pt_modules, ft_modules, pretrained_factors, finetuned_factors)
            if reason is None:
                self.layer_pairs[name] = ft_name
            else:
                self.layers_excluded[name] = reason
        if not self.layer_pairs:
            detail = "\n  ".join(f"{n}: {r}" for n, r in self.layers_excluded.items()) or "(no layer considered)"
            raise NoSharedLayersError(
                f"{OWNER}: the pre-trained and fine-tuned models share no layer with equal shapes "
                "in both models and both factor sets; pass layer_map= if module names differ, or check that "
                "both factor sets track the same layers. Considered:\n  " + detail
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

    # -- layer matching ---------------------------------------------------------------------
    @staticmethod
    def _candidate_names(model: nn.Module, pt_factors: Optional[EKFACFactors], patterns: Optional[list[str]]) -> list[str]:
        """Pre-trained layer names to consider: the factors' layers (or the model's supported
        layers without factors) selected by ``patterns`` with the one glob rule."""
        if pt_factors is None:
            return [t.name for t in select_layers(model, patterns, owner=OWNER)]
        return select_names(pt_factors.layer_names, patterns, what="layer of the pre-training factors", owner=OWNER)

    @staticmethod
    def _exclusion(
        name: str,
        ft_name: str,
        pt_modules: Mapping[str, nn.Module],
        ft_modules: Mapping[str, nn.Module],
        pt_factors: Optional[EKFACFactors],
        ft_factors: Optional[EKFACFactors],
    ) -> Optional[str]:
        """Why the layer pair cannot take part, or ``None`` when it can."""
        geo = {}
        for stage, modules, n in (("pre-trained", pt_modules, name), ("fine-tuned", ft_modules, ft_name)):
            m = modules.get(n)
            if m is None:
                return f"not in the {stage} model (as {n!r})"
            try:
                t = TrackedLayer.from_module(n, m)
            except LayerSelectionError:
                return f"unsupported type {type(m).__name__} in the {stage} model"
            geo[stage] = (t.d_out, t.d_in, t.has_bias)
        if geo["pre-trained"] != geo["fine-tuned"]:
            (o1, i1, b1), (o2, i2, b2) = geo["pre-trained"], geo["fine-tuned"]
            return f"shape mismatch: pre-trained (d_out={o1}, d_in={i1}, bias={b1}) vs fine-tuned (d_out={o2}, d_in={i2}, bias={b2})"
        for stage, factors, n in (("pre-training", pt_factors, name), ("fine-tuning", ft_factors, ft_name)):
            if factors is None:
                continue
            f = factors.layers.get(n)
            if f is None:
                return f"not in the {stage} factors (as {n!r})"
            if (f.d_out, f.d_in, f.has_bias) != geo["pre-trained"]:
                return f"{stage} factors are for (d_out={f.d_out}, d_in={f.d_in}, bias={f.has_bias}), the models have {geo['pre-trained']}"
        return None

    # -- preconditioners --------------------------------------------------------------------
    def _ft_damping(self, damping: StageDamping) -> StageDamping:
        """A fine-tuning damping with pre-trained names of a mapping translated to fine-tuned names."""
        if isinstance(damping, Mapping):
            return {self.layer_pairs.get(k, k): v for k, v in damping.items()}
        return damping

    def _preconditioner(
        self, arg: str, factors: Optional[EKFACFactors], names: list[str], damping: StageDamping, device: torch.device
    ) -> Preconditioner:
        if arg == "damping_ft":
            damping = self._ft_damping(damping)
        try:
            return Preconditioner(factors, names, damping, self.dtype, device)
        except ValueError as e:
            raise check.InvalidArgumentError(f"{OWNER}({arg}={damping!r}): {e}") from e

    def _with_damping(self, arg: str, base: Preconditioner, damping: StageDamping) -> Preconditioner:
        """``base`` with another damping (a new preconditioner; ``base`` is unchanged)."""
        if arg == "damping_ft":
            damping = self._ft_damping(damping)
        try:
            return base.with_damping(damping)
        except ValueError as e:
            raise check.InvalidArgumentError(f"{OWNER}.damping_sweep({arg}={damping!r}): {e}") from e

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
        from .index.builder import IndexOptions, build_index_with

        build_keys = ("if_exists", "rank", "world_size", "barrier")
        build = {k: options.pop(k) for k in build_keys if k in options}
        unknown = set(options) - set(IndexOptions.__dataclass_fields__)
        if unknown:
            raise check.InvalidArgumentError(f"{OWNER}.build_index got unknown options {sorted(unknown)}")
        opts = IndexOptions(**options).validate(f"{OWNER}.build_index")
        return build_index_with(self.pretrained_model, self.preconditioner_pt, self.tracked_pt, train_loader, path, opts,
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

    def _index_queries(self, query_loader: Iterable[Any], index: "InfluenceIndex") -> tuple[Tensor, LayerGrads, Tensor]:
        """Query vectors of the index's space: ``(G_ft + λ_ft I)⁻¹ ∇m(x, θ_ft)`` per shared layer
        in the standard basis, then the index's rotation, whitening and projection; and their
        exact squared norms in the pre-training inner product (``Tensor[Q]``)."""
        self._check_index(index)
        ft = self.preconditioner_ft
        t0 = time.perf_counter()

        def batches():
            for bid, rotated in self._gradients("ft", query_loader, rotate_with=ft):
                yield bid, {n: ft.unrotate(self.layer_pairs[n], ft.scale(self.layer_pairs[n], rotated.pop(n))).to(self.device)
                            for n in self.layers_used}

        out = index.vectors_and_norms_of(batches())
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
        if not isinstance(train_or_candidates, CandidateGradients):
            yield from self._candidate_batches(train_or_candidates)
            return
        cand = train_or_candidates
        if list(cand.grads) != self.layers_used:
            raise ValueError(
                f"{OWNER}: these CandidateGradients are for layers {list(cand.grads)}, this scorer uses {self.layers_used}; "
                "compute them with this scorer's candidates()"
            )
        for s in range(0, len(cand), CANDIDATE_CHUNK):
            yield cand.ids[s : s + CANDIDATE_CHUNK], {n: g[s : s + CANDIDATE_CHUNK] for n, g in cand.grads.items()}

    @staticmethod
    def _chunk_scores(queries: LayerGrads, chunk: LayerGrads) -> LayerGrads:
        """Per-layer scores ``{layer: Tensor[Q, c]}`` of one candidate chunk."""
        return {n: q @ chunk[n].to(q.device).T for n, q in queries.items()}

    def _pt_weight(self, name: str, power: float) -> Optional[Tensor]:
        """``(1/(Λ_pt+λ_pt))^power`` of a layer, flattened ``[d_out·a_dim]`` (``None``: identity)."""
        pt = self.preconditioner_pt
        return None if pt.identity else pt.inverse_scale(name).reshape(-1).pow(power)

    def _query_norms(self, queries: LayerGrads) -> Tensor:
        """``‖P_ft ∇m‖²`` in the pre-training inner product, ``(P_ft ∇m)ᵀ P_pt (P_ft ∇m)``, of
        query vectors (:meth:`query_gradients`), ``Tensor[Q]``."""
        out = 0.0
        for n, q in queries.items():
            w = self._pt_weight(n, 1.0)
            out = out + (q.pow(2) if w is None else q.pow(2) * w.to(q.device)).sum(1)
        return out

    def _candidate_norms(self, chunk: LayerGrads) -> Tensor:
        """Pre-training self-influence ``∇ℓᵀ P_pt ∇ℓ`` of candidate vectors ``c = P_pt ∇ℓ`` (in the
        eigenbasis ``c = W ⊙ R(∇ℓ)``, so ``Σ c² / W``), ``Tensor[c]``."""
        out = 0.0
        for n, c in chunk.items():
            w = self._pt_weight(n, -1.0)
            out = out + (c.pow(2) if w is None else c.pow(2) * w.to(c.device)).sum(1)
        return out

    def _variant(self, parts: LayerGrads, chunk: LayerGrads, normalize: str, q_self: Optional[Tensor]) -> tuple[Tensor, LayerGrads]:
        """Total and per-layer scores of one candidate chunk under ``normalize`` (per-layer terms
        share the total's denominators)."""
        total = sum(parts.values())
        if not needs_train_norms(normalize):
            return total, parts
        t_self = self._candidate_norms(chunk)
        return (normalize_scores(total, normalize, q_self, t_self),
                {n: normalize_scores(p, normalize, q_self, t_self) for n, p in parts.items()})

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
            normalize: score variant (:mod:`lightning_influence.variants`): ``"raw"``,
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
            q_ids, q, q_self = self._index_queries(query_loader, train_or_candidates)
            result = train_or_candidates.scores_vectors(q_ids, q, per_layer, method="multistage", normalize=normalize, query_self=q_self)
            result.self_influence = None
            result.options = {**self._options(normalize), "index": result.options}
            return result
        q_ids, queries = self.query_gradients(query_loader)
        q_self = self._query_norms(queries) if needs_query_norms(normalize) else None
        hint = len(train_or_candidates) if isinstance(train_or_candidates, CandidateGradients) else size_hint(train_or_candidates)
        n_q = q_ids.shape[0]
        ids = ColumnBuffer(None, hint, torch.long)
        total = ColumnBuffer(n_q, hint, self.dtype, self.device)
        layers = {n: ColumnBuffer(n_q, hint, self.dtype, self.device) for n in self.layers_used} if per_layer else {}
        for bid, chunk in self._candidate_chunks(train_or_candidates):
            block, parts = self._variant(self._chunk_scores(queries, chunk), chunk, normalize, q_self)
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
            q_ids, q, q_self = self._index_queries(query_loader, train_or_candidates)
            return train_or_candidates.search_vectors(q_ids, q, k, opponents, normalize=normalize, query_self=q_self)
        q_ids, queries = self.query_gradients(query_loader)
        q_self = self._query_norms(queries) if needs_query_norms(normalize) else None
        top = StreamingTopInfluences(q_ids, k, opponents)
        for bid, chunk in self._candidate_chunks(train_or_candidates):
            top.update(self._variant(self._chunk_scores(queries, chunk), chunk, normalize, q_self)[0], bid)
        return top.result()

    def damping_sweep(
        self,
        query_loader: Iterable[Any],
        train_loader: Iterable[Any],
        dampings: Sequence[tuple[StageDamping, StageDamping]],
    ) -> dict[tuple[Any, Any], InfluenceScores]:
        """Scores for several ``(damping_pt, damping_ft)`` pairs from one gradient pass per side.

        The per-example gradients of both sides are computed once and kept, rotated into each
        stage's eigenbasis (memory: ``(n_query + n_train) × Σ_layers d_out·a_dim`` values in
        :attr:`dtype`); per pair, only the eigenvalue scaling and the queries' change of basis
        are repeated, with preconditioners built by
        :meth:`~lightning_influence.ekfac.preconditioner.Preconditioner.with_damping` (this
        scorer's own preconditioners are never changed).

        Args:
            dampings: ``(damping_pt, damping_ft)`` pairs, each as accepted by the constructor.

        Returns:
            ``{(damping_pt, damping_ft): InfluenceScores}``, each equal to :meth:`pairwise` of a
            scorer built with those dampings (a mapping damping is keyed by
            ``repr(sorted(mapping.items()))``).
        """
        pairs = []
        for pair in dampings:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise check.InvalidArgumentError(f"{OWNER}.damping_sweep(dampings=...) must hold (damping_pt, damping_ft) pairs, got {pair!r}")
            dp = _check_damping("damping_pt", pair[0], self.preconditioner_pt.has_factors, f"{OWNER}.damping_sweep")
            df = _check_damping("damping_ft", pair[1], self.preconditioner_ft.has_factors, f"{OWNER}.damping_sweep")
            pairs.append((self._with_damping("damping_pt", self.preconditioner_pt, dp), self._with_damping("damping_ft", self.preconditioner_ft, df),
                          (_damping_key(dp), _damping_key(df))))
        base_pt = self.preconditioner_pt
        t_ids, t_rot = [], {n: [] for n in self.layers_used}
        for bid, rotated in self._gradients("pt", train_loader, rotate_with=base_pt):
            t_ids.append(bid)
            for n, r in rotated.items():
                t_rot[n].append(r)
        if not t_ids:
            raise ValueError(f"{OWNER}.damping_sweep: the pre-training loader yielded no batch")
        train_ids, train_rot = torch.cat(t_ids), {n: torch.cat(v) for n, v in t_rot.items()}
        q_ids, q_rot = self._query_pass(query_loader, self.preconditioner_ft, lambda n, r: r)
        out: dict[tuple[Any, Any], InfluenceScores] = {}
        for pt, ft, key in pairs:
            total = sum(self._query_side(n, q_rot[n], ft) @ self._candidate_side(n, train_rot[n], pt).T for n in self.layers_used)
            out[key] = InfluenceScores("multistage", train_ids, query_ids=q_ids, pairwise=total, options=self._options("raw", pt, ft))
        return out

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
        owner = f"{OWNER}.narrowed"
        _check_dataset(owner, "query_dataset", query_dataset)
        _check_dataset(owner, "train_dataset", train_dataset)
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
        union_scores = sum(self._chunk_scores(q, cand.grads).values())
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
