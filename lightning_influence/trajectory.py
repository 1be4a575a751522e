"""Trajectory-aware influence: EK-FAC influence summed over segments of the training run.

``EKFACInfluence(segments=S)`` cuts training into ``S`` segments of whole epochs and writes, for
each, ``<folder>/segment=KK/factors`` (the EK-FAC factors of that segment's training batches
only, eigenvalue-corrected at the segment's end weights) and ``<folder>/segment=KK/weights``
(the tracked modules' parameters at the segment's end, with the segment's optimizer steps and
mean learning rate in the manifest). :class:`TrajectoryScorer` combines them:

``score(x, z) = Σ_k w_k · ∇m(x; θ_k)ᵀ (G_k + λ_k I)⁻¹ ∇ℓ(z; θ_k)``

where ``θ_k`` are segment ``k``'s end weights (tracked modules; the other parameters stay as in
the model given), ``G_k`` its EK-FAC curvature and ``w_k ∝ η̄_k · K_k`` (mean learning rate ×
optimizer steps, normalised to sum to 1): an ensemble of EK-FAC influence over checkpoints along
the trajectory, weighted as the segments are in the segmented unrolling of SOURCE (Bae et al.
2024, "Training Data Attribution via Approximate Unrolled Differentiation"). Each term is
:class:`~lightning_influence.ekfac.scorer.InfluenceScorer`'s score, so the sign convention is
the same: positive = the training example lowers the query's loss; self-influence ``≥ 0``.

With ``curvature="unrolled"`` each segment's inverse curvature is replaced by its unrolled
response, as in SOURCE's stationary segments: ``(G_k + λ)⁻¹ → (I − exp(−η̄_k K_k G_k)) G_k⁻¹``,
i.e. ``(1 − exp(−η̄_k K_k Λ)) / Λ`` per EK-FAC eigenvalue ``Λ`` (``→ 1/Λ`` for large
``η̄_k K_k Λ``, ``→ η̄_k K_k`` for small ones: no damping is needed), and the terms are summed with
uniform weights (the horizon ``η̄_k K_k`` already scales each one). SOURCE's propagation of each
segment's term through the later segments' curvature is not applied.

No Lightning import; see docs/trajectory.md.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from . import validation as check
from .ekfac.factors import Damping, EKFACFactors, load_factors
from .ekfac.scorer import InfluenceScorer
from .ranking import StreamingTopInfluences, TopInfluences
from .scores import InfluenceScores
from .storage import ArtifactError, list_artifacts, read_artifact, read_manifest
from .task import TaskLike
from .weights import WeightsFingerprint, check_weights

__all__ = ["TrajectoryScorer", "TrajectorySegment", "load_segments", "segment_dirname", "unrolled_factors", "SEGMENT_WEIGHTS_KIND"]

SEGMENT_WEIGHTS_KIND = "segment_weights"
OWNER = "TrajectoryScorer"
Weighting = Literal["lr_steps", "uniform"] | Sequence[float]
CURVATURES = ("inverse", "unrolled")


def segment_dirname(index: int) -> str:
    """Folder of trajectory segment ``index`` (0-based): ``segment=02``."""
    return f"segment={index:02d}"


@dataclass
class TrajectorySegment:
    """One segment of a run, as :func:`load_segments` reads it.

    Attributes:
        index: 0-based segment index.
        path: the segment's folder (``<folder>/segment=KK``).
        factors: its :class:`EKFACFactors`.
        weights: ``"<module>.<parameter>"`` → the tracked modules' parameters at its end.
        meta: the record the callback wrote: ``first_epoch``, ``last_epoch``, ``global_step``,
            ``steps`` (optimizer steps), ``mean_lr``, ``weight`` (= ``mean_lr · steps``), ``run_id``.
    """

    index: int
    path: Path
    factors: EKFACFactors
    weights: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


def load_segments(source: str | os.PathLike | Sequence[str | os.PathLike], device: str | torch.device = "cpu") -> list[TrajectorySegment]:
    """Read the segments of a run, in index order.

    Args:
        source: the callback's folder (every ``segment=KK`` below it, found through their
            ``segment_weights`` artifacts), or a list of segment folders.
        device: where to put the tensors.

    Returns:
        The segments, sorted by index.

    Raises:
        ArtifactError: no segment found, an incomplete or damaged segment (missing factors or
            weights), or segments of different runs.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        folders = [a.path.parent for a in list_artifacts(root) if a.kind == SEGMENT_WEIGHTS_KIND]
        if not folders:
            raise ArtifactError(f"{OWNER}: no trajectory segment under {root} (written by EKFACInfluence(segments=S) with "
                                "S >= 2, as segment=KK/weights)")
    else:
        folders = [Path(p) for p in source]
        if not folders:
            raise check.InvalidArgumentError(f"{OWNER}(segments=[]) needs at least one segment folder")
    out = []
    for folder in folders:
        tensors, manifest = read_artifact(folder / "weights", kind=SEGMENT_WEIGHTS_KIND)
        meta = manifest.get("meta") if isinstance(manifest.get("meta"), dict) else {}
        if not isinstance(meta.get("segment"), int):
            raise ArtifactError(f"{folder / 'weights'}: the manifest has no segment index")
        factors = load_factors(folder / "factors", device=device)
        out.append(TrajectorySegment(meta["segment"], folder, factors, {k: v.to(device) for k, v in tensors.items()}, meta))
    out.sort(key=lambda s: s.index)
    runs = {s.meta.get("run_id") for s in out}
    if len(runs) > 1:
        raise ArtifactError(f"{OWNER}: the segments come from different runs ({sorted(map(str, runs))}); "
                            "give the folders of one run")
    if len({s.index for s in out}) != len(out):
        raise ArtifactError(f"{OWNER}: segment indices repeat: {[s.index for s in out]}")
    if isinstance(source, (str, os.PathLike)):
        missing = sorted(set(range(out[-1].index + 1)) - {s.index for s in out})
        if missing:
            raise ArtifactError(f"{OWNER}: {Path(source)} lacks segments {missing} (an interrupted write leaves no "
                                f"'{SEGMENT_WEIGHTS_KIND}' artifact; resume the run from its last checkpoint to rewrite them)")
    return out


def segment_weights(segments: Sequence[TrajectorySegment], weighting: Weighting) -> list[float]:
    """Each segment's weight in the sum, normalised to sum to 1: ``"lr_steps"`` (the segment's
    mean learning rate × optimizer steps), ``"uniform"``, or one non-negative number per segment."""
    if isinstance(weighting, str):
        check.choice(OWNER, "weighting", weighting, ("lr_steps", "uniform"))
        raw = [1.0] * len(segments) if weighting == "uniform" else [float(s.meta.get("weight", float("nan"))) for s in segments]
    else:
        raw = [check.finite_float(OWNER, "weighting", float(w), minimum=0.0) for w in weighting]
        if len(raw) != len(segments):
            raise check.InvalidArgumentError(f"{OWNER}(weighting=...) gives {len(raw)} weights for {len(segments)} segments")
    total = sum(raw)
    if not all(w == w and w >= 0 for w in raw) or not total > 0:
        raise check.InvalidArgumentError(
            f"{OWNER}(weighting={weighting!r}): segment weights {raw} must be non-negative with a positive sum "
            "(a segment with learning rate 0 or no optimizer step weighs 0)"
        )
    return [w / total for w in raw]


def unrolled_factors(factors: EKFACFactors, horizon: float) -> EKFACFactors:
    """Factors whose inverse scale at damping 0 is the unrolled response ``(1 − exp(−h·Λ)) / Λ``
    of ``h = horizon`` (learning rate × steps) of gradient descent on a loss of curvature
    eigenvalue ``Λ`` (SOURCE's stationary segment): their ``lambdas`` become
    ``Λ / (1 − exp(−h·Λ))`` (``1/h`` where ``Λ = 0``; negative ``Λ`` are clamped to 0).

    Args:
        factors: EK-FAC factors (``lambdas``: eigenvalues of the mean training loss's curvature).
        horizon: ``h > 0``, the segment's mean learning rate × optimizer steps.

    Returns:
        New :class:`EKFACFactors` (score them with ``damping=0``).
    """
    h = check.finite_float("unrolled_factors", "horizon", horizon, minimum=0.0, strict_minimum=True)
    layers = {}
    for name, f in factors.layers.items():
        lam = f.lambdas.double().clamp_min(0.0)
        x = h * lam
        small = x < 1e-8
        response = torch.where(small, h * (1.0 - 0.5 * x), -torch.expm1(-x) / torch.where(small, torch.ones_like(lam), lam))
        layers[name] = dataclasses.replace(f, lambdas=1.0 / response)
    return EKFACFactors(layers, factors.fisher, factors.n_examples, factors.n_lambda_examples,
                        {**factors.meta, "unrolled_horizon": h})


class TrajectoryScorer:
    """Influence summed over a run's trajectory segments (see the module docstring).

    Each segment is scored by an :class:`~lightning_influence.ekfac.scorer.InfluenceScorer` on a
    copy of ``model`` with the segment's tracked-module weights loaded; terms are weighted and
    summed. Memory: :meth:`pairwise` and :meth:`self_influence` score one segment at a time (one
    model copy, the output and one segment's term); :meth:`search` needs every segment's model
    copy and preconditioned queries at once and keeps ``O(n_query · k)`` per query beyond them.

    Args:
        model: the model whose architecture (and untracked parameters) the segments share,
            e.g. the final model; it is copied, never changed.
        segments: the callback's folder, a list of segment folders, or
            :class:`TrajectorySegment` objects (see :func:`load_segments`).
        task: how to read batches; default from the module / batch layout.
        damping: float for all layers, mapping per layer, or ``None`` for each segment's and
            layer's default.
        layers: glob pattern(s) selecting a subset of the factors' layers (default: all).
        weighting: ``"lr_steps"``, ``"uniform"``, or one weight per segment; normalised to sum
            to 1. ``None`` (default): ``"lr_steps"`` with ``curvature="inverse"``, ``"uniform"``
            with ``"unrolled"``.
        curvature: ``"inverse"`` (each segment's ``(G_k + λ)⁻¹``, as ``InfluenceScorer``) or
            ``"unrolled"`` (``(1 − exp(−η̄_k K_k G_k)) G_k⁻¹``, see :func:`unrolled_factors`;
            ``damping`` must then be ``None``: it is 0).
        dtype: compute dtype (default: float32, or float64 for a float64 model).
        progress: show progress bars (``None``: only on a terminal).
        allow_other_weights: accept a ``model`` whose tracked weights are not the run's final
            ones; by default they are checked against the fingerprint the callback recorded with
            the whole run's factors beside the segments (else with the last segment given), since
            ``model`` also supplies the untracked parameters.

    Raises:
        ArtifactError: see :func:`load_segments`.
        InvalidArgumentError: bad weights, or segment weights that do not fit ``model``.
        WeightsMismatchError: ``model``'s tracked weights are not the run's final ones (the
            message gives both fingerprints); pass ``allow_other_weights=True`` if you mean it.
    """

    def __init__(
        self,
        model: nn.Module,
        segments: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[TrajectorySegment],
        task: Optional[TaskLike] = None,
        damping: Damping = None,
        layers: Optional[str | Sequence[str]] = None,
        weighting: Optional[Weighting] = None,
        dtype: Optional[torch.dtype] = None,
        progress: Optional[bool] = None,
        curvature: Literal["inverse", "unrolled"] = "inverse",
        allow_other_weights: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise check.InvalidArgumentError(f"{OWNER}(model=...) must be an nn.Module, got {type(model).__name__}")
        device = next(model.parameters()).device
        if isinstance(segments, (list, tuple)) and segments and all(isinstance(s, TrajectorySegment) for s in segments):
            self.segments = list(segments)
        else:
            self.segments = load_segments(segments, device=device)
        self.curvature = check.choice(OWNER, "curvature", curvature, CURVATURES)
        if curvature == "unrolled":
            if damping is not None:
                raise check.InvalidArgumentError(f"{OWNER}(curvature='unrolled') needs no damping (the unrolled response is "
                                                 f"bounded by the horizon); got damping={damping!r}")
            self.segments = [dataclasses.replace(s, factors=unrolled_factors(s.factors, float(s.meta.get("weight", 0.0))))
                             for s in self.segments]
            damping = 0.0
        if weighting is None:
            weighting = "lr_steps" if curvature == "inverse" else "uniform"
        self.weights = segment_weights(self.segments, weighting)
        self.model, self.task, self.damping, self.layers = model, task, damping, layers
        self.dtype, self.progress = dtype, progress
        self._check_weights()
        stored, where = self._final_fingerprint()
        check_weights(stored, model, where, "the model given to TrajectoryScorer",
                      check.boolean(OWNER, "allow_other_weights", allow_other_weights))

    def _final_fingerprint(self) -> tuple[Optional[WeightsFingerprint], str]:
        """The fingerprint of the run's final weights: the whole-run factors' (``<folder>/factors``
        beside the segments, same run) when there are any, else the last segment's."""
        last = max(self.segments, key=lambda s: s.index)
        whole = Path(last.path).parent / "factors"
        m = read_manifest(whole)
        if m is not None and m.get("kind") == "ekfac" and isinstance(m.get("meta"), dict) \
                and m["meta"].get("run_id") == last.meta.get("run_id"):
            fp = WeightsFingerprint.from_manifest(m.get("weights"))
            if fp is not None:
                return fp, f"run's final factors at {whole}"
        return (WeightsFingerprint.from_manifest(last.factors.meta.get("weights")),
                f"last trajectory segment (segment {last.index}, {last.path})")

    def _check_weights(self) -> None:
        params = dict(self.model.named_parameters())
        for s in self.segments:
            for name, t in s.weights.items():
                if name not in params or params[name].shape != t.shape:
                    found = "missing" if name not in params else f"of shape {tuple(params[name].shape)}"
                    raise check.InvalidArgumentError(
                        f"{OWNER}: segment {s.index} ({s.path}) holds {name!r} of shape {tuple(t.shape)}, but the model's is "
                        f"{found}; give the model the run trained"
                    )

    # -- per segment ----------------------------------------------------------------------------
    def segment_model(self, k: int, into: Optional[nn.Module] = None) -> nn.Module:
        """A copy of ``model`` (or ``into``, overwritten) with segment ``k``'s weights loaded."""
        m = copy.deepcopy(self.model) if into is None else into
        params = dict(m.named_parameters())
        with torch.no_grad():
            for name, t in self.segments[k].weights.items():
                params[name].copy_(t)
        return m

    def segment_scorer(self, k: int, into: Optional[nn.Module] = None) -> InfluenceScorer:
        """The :class:`InfluenceScorer` of segment ``k`` (on :meth:`segment_model`)."""
        return InfluenceScorer(self.segment_model(k, into), self.segments[k].factors, task=self.task, damping=self.damping,
                               layers=self.layers, dtype=self.dtype, progress=self.progress)

    def _combine(self, kind: str, run, per_segment: bool) -> InfluenceScores:
        """Score every segment with ``run(scorer) -> InfluenceScores`` one at a time and sum."""
        model, total, parts, first, dampings = None, None, {}, None, []
        for k, w in enumerate(self.weights):
            scorer = self.segment_scorer(k, model)
            model = scorer.model
            res = run(scorer)
            term = (res.pairwise if kind == "pairwise" else res.self_influence).mul_(w)
            if first is None:
                first = (res.train_ids, res.query_ids, res.options)  # ids and options only: no score matrix kept
            elif not (torch.equal(res.train_ids, first[0]) and (kind != "pairwise" or torch.equal(res.query_ids, first[1]))):
                raise ValueError(f"{OWNER}: the loaders yielded examples in another order for segment {k}; "
                                 "use loaders that yield the same order on every pass (shuffle=False)")
            if per_segment:
                parts[segment_dirname(self.segments[k].index)] = term
                total = term.clone() if total is None else total.add_(term)
            else:
                total = term if total is None else total.add_(term)
            dampings.append(res.options.get("damping"))
            del res
        meta = {"segments": [{"index": s.index, "path": str(s.path), "weight": w, "raw_weight": s.meta.get("weight"), "damping": dmp,
                              **{key: s.meta.get(key) for key in ("first_epoch", "last_epoch", "global_step", "steps", "mean_lr")}}
                             for s, w, dmp in zip(self.segments, self.weights, dampings)]}
        options = {**first[2], "weighting": self.weights, "curvature": self.curvature}
        kw = {"pairwise": total, "query_ids": first[1]} if kind == "pairwise" else {"self_influence": total}
        return InfluenceScores("trajectory", first[0], per_layer=parts, options=options, meta=meta, **kw)

    # -- scores -------------------------------------------------------------------------------
    def pairwise(self, query_loader: Iterable[Any], train_loader: Iterable[Any], per_segment: bool = True) -> InfluenceScores:
        """Pairwise scores ``Σ_k w_k · score_k`` of every query against every training example.

        Args:
            query_loader: query batches (their ``measurement`` is differentiated); iterated once
                per segment, so it must yield the same examples in the same order each time.
            train_loader: training batches; iterated once per segment (same order each time).
            per_segment: keep each segment's weighted term ``[n_query, n_train]`` in
                ``per_layer["segment=KK"]`` (the terms sum to the total).

        Returns:
            :class:`InfluenceScores` (method ``"trajectory"``) with ``pairwise:
            Tensor[n_query, n_train]`` (positive = the training example helps the query) and
            the segments' weights and records in ``meta["segments"]``.
        """
        return self._combine("pairwise", lambda s: s.pairwise(query_loader, train_loader), per_segment)

    def self_influence(self, train_loader: Iterable[Any], per_segment: bool = True) -> InfluenceScores:
        """Self-influence ``Σ_k w_k ∇ℓ(z; θ_k)ᵀ (G_k + λ_k I)⁻¹ ∇ℓ(z; θ_k) ≥ 0`` of every example.

        Args:
            train_loader: the examples; iterated once per segment (same order each time).
            per_segment: keep each segment's weighted term ``[n]`` in ``per_layer["segment=KK"]``.

        Returns:
            :class:`InfluenceScores` (method ``"trajectory"``) with ``self_influence: Tensor[n]``.
        """
        return self._combine("self", lambda s: s.self_influence(train_loader), per_segment)

    def search(self, query_loader: Iterable[Any], train_loader: Iterable[Any], k: int = 10, opponents: bool = False) -> TopInfluences:
        """The ``k`` training examples with the highest combined score per query (and, with
        ``opponents``, the lowest), in one pass over ``train_loader`` per segment, side by side.

        Memory: one model copy and the preconditioned query gradients per segment, one training
        batch per segment and the running top-``k`` (``O(n_query · k)``), whatever the number of
        training examples.

        Args:
            query_loader: query batches; iterated once per segment.
            train_loader: training batches; iterated once per segment, in step (each must yield
                the same examples in the same order).
            k: how many examples per query.
            opponents: also keep the ``k`` most harmful.

        Returns:
            :class:`~lightning_influence.ranking.TopInfluences` (ids and scores ``[n_query, k]``).
        """
        check.positive_int(f"{OWNER}.search", "k", k)
        scorers = [self.segment_scorer(j) for j in range(len(self.segments))]
        queries = [s.prepare_queries(query_loader) for s in scorers]
        q_ids = queries[0].ids
        if any(not torch.equal(q.ids, q_ids) for q in queries):
            raise ValueError(f"{OWNER}.search: the query loader yielded examples in another order on another pass")
        top = StreamingTopInfluences(q_ids, k, opponents)
        streams = [s.batch_scores(q, train_loader) for s, q in zip(scorers, queries)]
        for items in zip(*streams, strict=True):
            ids = items[0][0]
            total = None
            for w, (bid, block, _) in zip(self.weights, items):
                if not torch.equal(bid, ids):
                    raise ValueError(f"{OWNER}.search: the training loader yielded examples in another order on another "
                                     "pass; use shuffle=False")
                total = block * w if total is None else total + block * w
            top.update(total, ids)
        return top.result()
