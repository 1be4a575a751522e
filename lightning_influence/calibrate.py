"""Calibrate EK-FAC damping on a small labelled check of your own, and save the choice with the
factors so that every scorer uses it.

A damping rule chosen on the project's benchmark tasks is a good first guess, not a guarantee
for your data (``docs/benchmarks_matrix.md``). :func:`calibrate` scores a set of candidate
dampings (every rule of :data:`~lightning_influence.ekfac.damping.DAMPING_RULES`, and the
default rule's ``λ`` times a few factors) on the checks you can provide:

* **known flipped labels** (``flipped=``): average precision of self-influence at finding them;
* **retrained subsets** (``queries=`` + ``subsets=``, from
  :func:`lightning_influence.evaluate.retrain_subsets`): the linear datamodeling score of the
  pairwise scores, for each score variant of ``normalize=`` (``"raw"``, ``"cosine"``,
  ``"relative"``: cheap, the same gradients).

The candidate with the smallest worst regret over the checks you gave is chosen
(:func:`lightning_influence.evaluate.select`, criterion ``"regret"``); candidates within
``tolerance`` (0.01) of the best are ties, and ties keep the first candidate (the default rule). With ``save_to=<factors folder>``, the choice is written next to the factors as a small
artifact of kind ``"calibration"`` (``<factors folder>.calibration/manifest.json``, atomically
with :func:`lightning_influence.storage.write_artifact`). :func:`~lightning_influence.load_factors`
reads it back and makes its per-layer ``λ`` the factors' default damping, so
:class:`~lightning_influence.InfluenceScorer`, :class:`~lightning_influence.MultiStageScorer`,
:func:`~lightning_influence.build_index` and every other scorer that is given no ``damping=`` use
it; an explicit ``damping=`` still wins. A calibration records the checksum of the factors it was
made for and is ignored, with a warning, once the factors are refitted.

The chosen score variant is recorded (``Calibration.normalize``) but not applied automatically:
pass it as ``normalize=`` to ``pairwise``/``search``.

No Lightning import: works with any ``nn.Module`` the scorers accept.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .ekfac.damping import DAMPING_RULES, DEFAULT_DAMPING_RULE
from .ekfac.factors import Damping, EKFACFactors
from .storage import ArtifactError, read_artifact, write_artifact

__all__ = ["Calibration", "CALIBRATION_KIND", "calibrate", "candidate_dampings", "calibration_path", "save_calibration",
           "load_calibration", "apply_saved_calibration", "DEFAULT_MULTIPLIERS"]

CALIBRATION_KIND = "calibration"
DEFAULT_MULTIPLIERS: tuple[float, ...] = (0.01, 0.1, 10.0, 100.0)
"""Multiples of the default rule's ``λ`` tried besides the rules themselves."""


@dataclass
class Calibration:
    """A damping (and score variant) chosen on a user's check.

    Attributes:
        damping: layer → ``λ`` chosen (what scorers use by default once saved and reloaded).
        choice: the chosen candidate's name (a rule name, or ``"<rule>×<m>"``).
        normalize: the score variant chosen by the LDS check (``"raw"`` without one).
        results: ``"<check>/<metric>"`` (``"mislabel/AP"``, ``"retrained subsets/LDS"``) → candidate →
            value (higher is better); LDS candidates are named ``"<damping>|<normalize>"``.
        candidates: candidate name → its per-layer ``λ``.
        factors_sha256: checksum of the factors' tensors it was made for (``None`` if unknown).
    """

    damping: dict[str, float]
    choice: str
    normalize: str = "raw"
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)
    factors_sha256: Optional[str] = None


def candidate_dampings(factors: EKFACFactors, rules: Optional[Sequence[str]] = None,
                       multipliers: Sequence[float] = DEFAULT_MULTIPLIERS) -> dict[str, dict[str, float]]:
    """Candidate name → per-layer ``λ``: every rule (default: all of
    :data:`~lightning_influence.ekfac.damping.DAMPING_RULES`, the default rule first) and the
    default rule's ``λ`` times each multiplier (``"spectrum×10"``).

    Raises:
        InvalidArgumentError: an unknown rule; ValueError: a multiplier that is not finite and > 0.
    """
    names = list(rules) if rules is not None else [DEFAULT_DAMPING_RULE] + [r for r in DAMPING_RULES if r != DEFAULT_DAMPING_RULE]
    out = {r: factors.dampings(r) for r in names}
    base = factors.dampings(DEFAULT_DAMPING_RULE)
    for m in multipliers:
        if not (math.isfinite(m) and m > 0):
            raise ValueError(f"multipliers must be finite and > 0, got {m!r}")
        out[f"{DEFAULT_DAMPING_RULE}×{m:g}"] = {n: v * float(m) for n, v in base.items()}
    return out


def _by_position(ids: Tensor, values: Tensor, n: int) -> Tensor:
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    out[ids.long().cpu()] = values.detach().double().cpu()
    return out


def calibrate(
    model: nn.Module,
    factors: EKFACFactors,
    train_loader: Iterable[Any],
    flipped: Optional[Tensor] = None,
    queries: Optional[Iterable[Any]] = None,
    subsets: Any = None,
    candidates: Optional[Mapping[str, Damping]] = None,
    normalize: Sequence[str] = ("raw", "cosine", "relative"),
    task: Any = None,
    save_to: Optional[str | os.PathLike] = None,
    tolerance: float = 0.01,
) -> Calibration:
    """Choose the damping (and, with an LDS check, the score variant) that does best on your check.

    Args:
        model: the model at the factors' weights.
        factors: its factors (e.g. :func:`~lightning_influence.load_factors`).
        train_loader: the training examples; ids (or positions, for batches without ids) index
            ``flipped`` and the columns of ``subsets.masks``.
        flipped: ``BoolTensor[N]``: training examples whose label you know is wrong.
        queries: the LDS check's query loader (rows of ``subsets.losses``).
        subsets: :class:`~lightning_influence.evaluate.SubsetLosses` of models retrained on
            subsets of the training set.
        candidates: name → damping (a float, a mapping or a rule name); default
            :func:`candidate_dampings` (``factors``). Put the one to keep on a tie first.
        normalize: score variants tried by the LDS check.
        task: how to read batches (default: the model's).
        save_to: the factors' folder: write the calibration next to it (:func:`save_calibration`).
        tolerance: a candidate must beat the first candidate (the default rule, ``raw`` scores) by
            more than this on its worst check to be chosen: a small check measures AP and LDS
            only to a few hundredths, and on the benchmark matrix choices within that noise did
            no better on held-out subsets than the default (``docs/benchmarks_matrix.md``).

    Returns:
        :class:`Calibration`.

    Raises:
        ValueError: no check given (neither ``flipped`` nor ``queries`` + ``subsets``), or a
            check's sizes do not match the training set.
    """
    from .ekfac.scorer import InfluenceScorer
    from .evaluate import ResultMatrix, linear_datamodeling_score, mislabel_detection, select

    if flipped is None and (queries is None or subsets is None):
        raise ValueError("calibrate needs a check: flipped= (known flipped labels) and/or queries= with subsets= (retrained subsets)")
    resolved = {k: factors.dampings(v) for k, v in (candidates or candidate_dampings(factors)).items()}
    matrix = ResultMatrix(metric="check")
    variants = list(normalize) if queries is not None and subsets is not None else ["raw"]
    for name, damping in resolved.items():
        scorer = InfluenceScorer(model, factors, task=task, damping=damping, progress=False)
        if flipped is not None:
            res = scorer.self_influence(train_loader)
            n = int(flipped.numel())
            if int(res.train_ids.max()) >= n:
                raise ValueError(f"flipped has {n} entries but the training loader yields id {int(res.train_ids.max())}")
            ap = mislabel_detection(_by_position(res.train_ids, res.self_influence, n), flipped).average_precision
            matrix.add("mislabel/AP", 0, f"{name}|raw", ap)
        if queries is not None and subsets is not None:
            for v in variants:
                lds = linear_datamodeling_score(scorer.pairwise(queries, train_loader, normalize=v), subsets.masks, subsets.losses).lds
                matrix.add("retrained subsets/LDS", 0, f"{name}|{v}", lds)
    if flipped is not None and len(variants) > 1:  # self-influence has no variant: the same AP for each
        for name in resolved:
            for v in variants[1:]:
                matrix.add("mislabel/AP", 0, f"{name}|{v}", matrix.values[("mislabel/AP", 0, f"{name}|raw")])
    units = matrix.tasks
    chosen = select(matrix, "regret", choose_tasks=units, report_tasks=[], tolerance=tolerance).chosen
    name, variant = chosen.split("|", 1)
    results: dict[str, dict[str, float]] = {u: {} for u in units}
    for (u, _, c), v in matrix.values.items():
        results[u][c if u.endswith("LDS") else c.split("|", 1)[0]] = v
    cal = Calibration(damping=dict(resolved[name]), choice=name, normalize=variant, results=results,
                      candidates={k: dict(v) for k, v in resolved.items()})
    if save_to is not None:
        save_calibration(cal, save_to)
    return cal


def calibration_path(factors_dir: str | os.PathLike) -> Path:
    """Where the calibration of the factors at ``factors_dir`` lives: ``<factors_dir>.calibration``
    (a sibling folder, so the factors artifact itself is never rewritten)."""
    p = Path(factors_dir)
    return p.with_name(p.name + ".calibration")


def save_calibration(cal: Calibration, factors_dir: str | os.PathLike) -> Path:
    """Write ``cal`` next to the factors at ``factors_dir`` (atomically; replaces an earlier
    calibration) and record the factors' checksum in it.

    Raises:
        ArtifactError: ``factors_dir`` holds no readable factors, or the calibration's layers
            are not the factors' layers.
    """
    _, manifest = read_artifact(factors_dir, kind="ekfac")
    layers = [m["name"] for m in manifest.get("layers", [])]
    if sorted(layers) != sorted(cal.damping):
        raise ArtifactError(f"calibration layers {sorted(cal.damping)} are not the layers of the factors at {factors_dir}: {sorted(layers)}")
    cal.factors_sha256 = manifest["tensor_sha256"]
    body = {"damping": cal.damping, "choice": cal.choice, "normalize": cal.normalize, "results": cal.results,
            "candidates": cal.candidates, "factors_sha256": cal.factors_sha256}
    return write_artifact(calibration_path(factors_dir), CALIBRATION_KIND, {}, body)


def load_calibration(factors_dir: str | os.PathLike) -> Optional[Calibration]:
    """The calibration saved next to the factors at ``factors_dir``, or ``None`` if there is none.

    Raises:
        ArtifactError: it exists but is damaged (checksums) or malformed.
    """
    path = calibration_path(factors_dir)
    if not path.exists():
        return None
    _, m = read_artifact(path, kind=CALIBRATION_KIND)
    damping = m.get("damping")
    if not isinstance(damping, dict) or not damping or not all(
            isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in damping.values()):
        raise ArtifactError(f"{path}: 'damping' must map layer names to finite floats >= 0, got {damping!r}")
    return Calibration(damping={k: float(v) for k, v in damping.items()}, choice=str(m.get("choice", "")),
                       normalize=str(m.get("normalize", "raw")), results=dict(m.get("results", {})),
                       candidates=dict(m.get("candidates", {})), factors_sha256=m.get("factors_sha256"))


def apply_saved_calibration(factors_dir: str | os.PathLike, manifest: Mapping[str, Any], factors: EKFACFactors) -> Optional[Calibration]:
    """The loading hook of :func:`~lightning_influence.load_factors`: if a calibration made for
    these factors (same tensor checksum) is saved next to them, set every layer's
    ``calibrated_damping`` to its ``λ`` (the factors' default damping from then on) and record it
    in ``factors.meta["calibration"]``.

    A calibration of other factors (refitted since) or of other layers is ignored with a
    warning; a damaged one raises :class:`ArtifactError`.
    """
    cal = load_calibration(factors_dir)
    if cal is None:
        return None
    if cal.factors_sha256 != manifest.get("tensor_sha256"):
        warnings.warn(f"{calibration_path(factors_dir)} was made for other factors (they were refitted since); it is ignored. "
                      "Run lightning_influence.calibrate.calibrate(..., save_to=...) again", stacklevel=3)
        return None
    if sorted(cal.damping) != sorted(factors.layers):
        warnings.warn(f"{calibration_path(factors_dir)} is for layers {sorted(cal.damping)}, not the factors' {sorted(factors.layers)}; "
                      "it is ignored", stacklevel=3)
        return None
    for n, f in factors.layers.items():
        f.calibrated_damping = cal.damping[n]
    factors.meta["calibration"] = {"choice": cal.choice, "damping": dict(cal.damping), "normalize": cal.normalize}
    return cal
