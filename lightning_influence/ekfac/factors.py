"""EK-FAC factors of tracked layers: eigenbases, corrected eigenvalues, damping, preconditioning,
and their safetensors + manifest storage.

For a layer with gradient ``G`` (``d_out × a_dim``), the damped inverse curvature applied to
``G`` is ``Q_S [ (Q_S^T G Q_A) / (Λ + λ) ] Q_A^T``, where ``Λ`` (``d_out × a_dim``) is the
mean over examples of the squared gradient in the Kronecker eigenbasis and ``λ`` the damping.
Eigenvectors and ``Λ`` are float32 (float64 when the eigendecomposition ran in float64);
preconditioning runs in the gradients' dtype with the reciprocal ``1/(Λ+λ)`` formed in float64.

Storage (:data:`FACTOR_STORAGE`): :func:`save_factors` writes the tensors as computed
(``"exact"``) or rounds the eigenvectors, and optionally ``Λ``, to 16-bit floats (GPT-2 small's
48 layers: 3.30× the fp32 weights exact, 1.99× with ``"float16"``, 1.65× with
``"float16+bfloat16"``, what :class:`~lightning_influence.EKFACInfluence` writes by default);
:func:`load_factors` upcasts them to float32, so what a scorer computes with is exactly
:meth:`EKFACFactors.as_stored`'s rounding (docs/benchmarks_factor_precision.md measures it).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..layers import TrackedLayer, named_modules
from .damping import DAMPING_RULES, DEFAULT_DAMPING_RULE, MEAN_FACTOR, describe_rule, rule_dampings
from ..storage import ArtifactError, check_tensor, manifest_field, read_artifact, write_artifact
from ..weights import WeightsFingerprint, check_weights, fingerprint_weights
from ..errors import InfluenceError

__all__ = [
    "KroneckerEigen",
    "LayerFactors",
    "EKFACFactors",
    "FactorMismatchError",
    "eigendecompose",
    "save_factors",
    "load_factors",
    "Damping",
    "damping_rule_name",
    "FACTOR_STORAGE",
    "DEFAULT_FACTOR_STORAGE",
    "STORAGE_CHOICES",
    "resolve_storage",
    "stored_itemsizes",
]

FACTOR_STORAGE: dict[str, tuple[Optional[torch.dtype], Optional[torch.dtype]]] = {
    "exact": (None, None),
    "float16": (torch.float16, torch.float32),
    "float16+bfloat16": (torch.float16, torch.bfloat16),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
}
"""How :func:`save_factors` stores the factors: name → ``(eigenvector dtype, Λ dtype)``
(``None``: as computed, float32 or float64). ``"exact"`` keeps them as computed; ``"float16"``
rounds the eigenvectors ``q_a``, ``q_s`` (entries in ``[-1, 1]``: float16's 11-bit significand,
relative rounding ``≤ 2⁻¹¹``) and stores ``Λ`` in float32 (its values span ``1e-12 … 1e2``:
float16's range would flush or overflow them); ``"float16+bfloat16"`` also stores ``Λ`` in
bfloat16 (float32's range, 8-bit significand); ``"bfloat16"`` stores both in bfloat16. The
eigenvalues ``eig_a``, ``eig_s`` (``a + o`` values per layer) are always kept as computed."""
STORAGE_CHOICES = ("auto", *FACTOR_STORAGE)
"""What ``storage=`` accepts: a name of :data:`FACTOR_STORAGE` or ``"auto"``
(:func:`resolve_storage`)."""
DEFAULT_FACTOR_STORAGE = "auto"
"""What :class:`~lightning_influence.EKFACInfluence` writes by default: ``"auto"``, i.e.
``"float16+bfloat16"`` for float32 factors (1.65× GPT-2 small's fp32 weights on disk, 1.80×
Pythia-410M's, against 3.30× and 3.60× exact) and exact for float64 ones. Chosen by
docs/benchmarks_factor_precision.md: against float32 factors, mean LDS and mislabel AP change by at
most 0.0003 on the evaluation matrix's six tasks (seed-to-seed standard errors: 0.014-0.049) and scores keep a
Spearman correlation ≥ 0.9999 with float32's, also at GPT-2's widths. :func:`save_factors` keeps
``"exact"`` unless asked."""


def resolve_storage(storage: str, factors: "EKFACFactors", owner: str = "save_factors") -> str:
    """The name of :data:`FACTOR_STORAGE` that ``storage`` stands for with ``factors``: itself,
    or for ``"auto"`` ``"float16+bfloat16"`` when every eigenvector and ``Λ`` tensor is float32 or
    narrower and ``"exact"`` when one is float64 (float64 factors are asked for: they are kept).

    Raises:
        InvalidArgumentError: ``storage`` is not one of :data:`STORAGE_CHOICES`.
    """
    from .. import validation as check

    check.choice(owner, "storage", storage, STORAGE_CHOICES)
    if storage != "auto":
        return storage
    wide = any(getattr(f, k).dtype == torch.float64 for f in factors.layers.values() for k in ("q_a", "q_s", "lambdas"))
    return _auto_storage(wide)


def _auto_storage(float64: bool) -> str:
    """What ``"auto"`` stands for: float64 factors are kept exact, narrower ones stored 16-bit."""
    return "exact" if float64 else "float16+bfloat16"


def stored_itemsizes(storage: str, itemsize: int = 4) -> tuple[int, int]:
    """Bytes per stored value of ``(eigenvectors, Λ)`` under ``storage`` (one of
    :data:`STORAGE_CHOICES`; ``"auto"`` as :func:`resolve_storage` resolves it) for factors
    computed with ``itemsize``-byte values (4: float32, 8: float64)."""
    if storage == "auto":
        storage = _auto_storage(itemsize == 8)
    q, lam = FACTOR_STORAGE[storage]
    return (itemsize if q is None else q.itemsize, itemsize if lam is None else lam.itemsize)

Damping = Optional[float | Mapping[str, float] | str]
"""A damping: a float for every layer, a mapping layer → float, a rule name of
:data:`~lightning_influence.ekfac.damping.DAMPING_RULES`, or ``None`` for the default rule."""
DEFAULT_DAMPING_FACTOR = MEAN_FACTOR  # the "mean" rule's factor (kept for the adaptive correction sample)


def damping_rule_name(damping: Any) -> Optional[str]:
    """The name of the rule a damping argument stands for (``None`` → the default rule), or
    ``None`` when it gives the values (a float or a mapping)."""
    if damping is None:
        return DEFAULT_DAMPING_RULE
    if isinstance(damping, str) and damping in DAMPING_RULES:
        return damping
    return None


class FactorMismatchError(InfluenceError, ValueError):
    """Factors do not fit the model (missing layers, shape differences)."""


def eigendecompose(cov: Tensor, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Eigendecompose the symmetric ``cov`` in ``dtype``: returns ``(eigenvalues[d] float64,
    eigenvectors[d, d] in dtype)`` (columns; only ``cov``'s lower triangle is read).

    ``torch.float32`` takes about half the time of float64 on CPU. Its eigenvalues are within
    a few ``d · 1.2e-7 · ‖cov‖₂`` of float64's and its eigenvectors orthonormal to about
    ``d · 1.2e-7`` (bounded in ``tests/test_ekfac_precision.py``); eigenvectors of eigenvalues
    closer together than that are mixed, which the eigenvalue correction absorbs: it measures
    the curvature in whatever basis it is given. Covariances accumulated in float32 carry no
    more precision than that in the first place, and eigenvectors computed in float32 are
    returned (and stored) in float32: widening them would add bytes, not precision.
    """
    c = cov if cov.dtype == dtype else cov.to(dtype)
    vals, vecs = torch.linalg.eigh(c)
    # LAPACK returns column-major eigenvectors: made row-major here, one layer at a time, rather
    # than by the artifact writer for every layer at once (a copy of all the factors)
    return vals.double(), vecs.contiguous()


@dataclass
class KroneckerEigen:
    """Eigendecompositions of one layer's Kronecker factors ``A = Q_A diag(eig_a) Q_Aᵀ`` and
    ``S = Q_S diag(eig_s) Q_Sᵀ`` (eigenvector columns in the decomposition's dtype, float32 or
    float64; eigenvalues float64, ascending)."""

    q_a: Tensor
    eig_a: Tensor
    q_s: Tensor
    eig_s: Tensor

    @classmethod
    def from_covariances(cls, a: Tensor, s: Tensor, dtype: torch.dtype = torch.float64) -> "KroneckerEigen":
        """Eigendecompose ``A`` and ``S`` in ``dtype`` (see :func:`eigendecompose`)."""
        eig_a, q_a = eigendecompose(a, dtype)
        eig_s, q_s = eigendecompose(s, dtype)
        return cls(q_a, eig_a, q_s, eig_s)

    def kfac_lambdas(self) -> Tensor:
        """Uncorrected K-FAC eigenvalues ``eig_s ⊗ eig_a`` (clamped at 0), ``[d_out, a_dim]``."""
        return torch.outer(self.eig_s, self.eig_a).clamp_min(0)

    def to(self, device: torch.device | str) -> "KroneckerEigen":
        return KroneckerEigen(self.q_a.to(device), self.eig_a.to(device), self.q_s.to(device), self.eig_s.to(device))


@dataclass
class LayerFactors:
    """Factors of one layer (on CPU or the scoring device). ``q_a``, ``q_s`` and ``lambdas`` are
    float32 or float64 (the precision of the eigendecomposition: float32 for float32, bf16 or
    fp16 training unless float64 was asked); ``eig_a``/``eig_s`` are float64. Computations
    that need it (damping, reciprocals) run in float64.

    Attributes:
        q_a: ``[a_dim, a_dim]`` eigenvectors of the input covariance (columns).
        eig_a: ``[a_dim]`` its eigenvalues.
        q_s: ``[d_out, d_out]`` eigenvectors of the output-gradient covariance.
        eig_s: ``[d_out]`` its eigenvalues.
        lambdas: ``[d_out, a_dim]`` corrected eigenvalues (EK-FAC); ``eig_s ⊗ eig_a`` if uncorrected.
        d_in: input width of one row (see :class:`~lightning_influence.layers.TrackedLayer`).
        d_out: output width of one row.
        has_bias: whether the layer has a bias (a constant-one input column).
        layer_type: the tracked type's name (``"Linear"``, ``"Conv2d"``, ...) when known; loading
            checks it against the model, so factors never apply to a layer of another type that
            happens to have the same geometry.
        calibrated_damping: ``λ`` chosen for this layer by :func:`lightning_influence.calibrate.calibrate`
            and read back by :func:`load_factors` (``None``: not calibrated); the default damping
            of every scorer when all layers have one.
    """

    q_a: Tensor
    eig_a: Tensor
    q_s: Tensor
    eig_s: Tensor
    lambdas: Tensor
    d_in: int
    d_out: int
    has_bias: bool
    layer_type: Optional[str] = None
    calibrated_damping: Optional[float] = None

    @property
    def grad_shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in + int(self.has_bias))

    def damping(self, value: Optional[float | str] = None) -> float:
        """``λ``: ``value`` if it is a number, else the rule it names applied to **this layer
        alone** (``None``: the default rule). The scorers apply the default rule to all their
        layers together (:meth:`EKFACFactors.dampings`), which differs for the ``"spectrum"``
        rule: it pools the layers' eigenvalues (:mod:`lightning_influence.ekfac.damping`)."""
        if value is None and self.calibrated_damping is not None:
            return float(self.calibrated_damping)
        if value is None or isinstance(value, str):
            return rule_dampings({"": self.lambdas}, DEFAULT_DAMPING_RULE if value is None else value)[""]
        return float(value)

    def inverse_scale(self, damping: Optional[float | str] = None, power: float = 1.0) -> Tensor:
        """``1 / (Λ + λ)^power`` in float64, ``[d_out, a_dim]``."""
        return (self.lambdas.double() + self.damping(damping)).pow(-power)

    def rotate(self, g: Tensor) -> Tensor:
        """``Q_S^T G Q_A`` for ``G: [..., d_out, a_dim]``."""
        return self.q_s.T.to(g.dtype) @ g @ self.q_a.to(g.dtype)

    def unrotate(self, r: Tensor) -> Tensor:
        """``Q_S R Q_A^T`` (inverse of :meth:`rotate`)."""
        return self.q_s.to(r.dtype) @ r @ self.q_a.T.to(r.dtype)

    def precondition(self, g: Tensor, damping: Optional[float] = None) -> Tensor:
        """``(G_layer + λI)^{-1} vec(G)`` in matrix form for ``G: [..., d_out, a_dim]``."""
        r = self.rotate(g) * self.inverse_scale(damping).to(g.dtype)
        return self.unrotate(r)

    def to(self, device: torch.device | str) -> "LayerFactors":
        kw = {k: getattr(self, k).to(device) for k in ("q_a", "eig_a", "q_s", "eig_s", "lambdas")}
        return LayerFactors(**kw, d_in=self.d_in, d_out=self.d_out, has_bias=self.has_bias, layer_type=self.layer_type,
                            calibrated_damping=self.calibrated_damping)


@dataclass
class EKFACFactors:
    """Factors of every tracked layer plus how they were made.

    Attributes:
        layers: layer name → :class:`LayerFactors` (model's qualified module names).
        fisher: ``"empirical"`` or ``"true"``.
        n_examples: examples behind the covariances (``A``, ``S``).
        n_lambda_examples: examples behind the eigenvalue correction.
        meta: free-form information (source, step, epoch, options).
        artifact_path: the folder :func:`load_factors` read them from (``None`` for factors made
            in memory); :func:`~lightning_influence.build_index` references that artifact
            instead of copying the factors into the index.
    """

    layers: dict[str, LayerFactors]
    fisher: str = "empirical"
    n_examples: int = 0
    n_lambda_examples: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    artifact_path: Optional[Path] = field(default=None, compare=False)

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def dampings(self, damping: Damping = None) -> dict[str, float]:
        """Per-layer damping: a float for all, a mapping per layer name, a rule's name, or
        ``None`` for the default rule (:mod:`lightning_influence.ekfac.damping`).

        Raises:
            InvalidArgumentError: a value is not a finite float ``>= 0`` (``nan`` and ``inf``
                included), a string names no rule, or a mapping lacks a layer.
        """
        from .. import validation as check

        if damping is None and all(f.calibrated_damping is not None for f in self.layers.values()):
            return {n: float(f.calibrated_damping) for n, f in self.layers.items()}  # saved by calibrate()
        if damping is None or isinstance(damping, str):
            rule = DEFAULT_DAMPING_RULE if damping is None else check.choice("damping", "damping", damping, tuple(DAMPING_RULES))
            return rule_dampings({n: f.lambdas for n, f in self.layers.items()}, rule)
        if isinstance(damping, Mapping):
            missing = [n for n in self.layers if n not in damping]
            if missing:
                raise check.InvalidArgumentError(f"damping mapping lacks layers {missing}")
            return {n: check.finite_float("damping", repr(n), damping[n], minimum=0.0) for n in self.layers}
        value = check.finite_float("damping", "damping", damping, minimum=0.0)
        return {n: float(value) for n in self.layers}

    def as_stored(self, storage: str = "exact", inplace: bool = False) -> "EKFACFactors":
        """These factors as :func:`load_factors` returns them after ``save_factors(...,
        storage=storage)``: eigenvectors and ``Λ`` rounded to the storage dtypes of
        :data:`FACTOR_STORAGE` and upcast to float32 (``"exact"``: unchanged). Scoring with them
        gives what scoring with the saved file gives.

        Args:
            storage: one of :data:`STORAGE_CHOICES` (``"auto"``: :func:`resolve_storage`).
            inplace: replace the entries of ``self.layers`` one layer at a time (each layer's
                :class:`LayerFactors` by a rounded copy, so only one layer's copy is held at
                once) and return ``self``; else return new factors and leave ``self`` as it is.

        Raises:
            InvalidArgumentError: ``storage`` is not one of :data:`STORAGE_CHOICES`.
        """
        q_dtype, lam_dtype = FACTOR_STORAGE[resolve_storage(storage, self, "EKFACFactors.as_stored")]
        out = self if inplace else EKFACFactors(dict(self.layers), self.fisher, self.n_examples, self.n_lambda_examples,
                                                dict(self.meta), None)
        if q_dtype is None:
            return out

        def rounded(t: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
            return t if dtype is None or t.dtype == dtype else t.to(dtype).float()

        for n, f in out.layers.items():
            out.layers[n] = dataclasses.replace(f, q_a=rounded(f.q_a, q_dtype), q_s=rounded(f.q_s, q_dtype),
                                                lambdas=rounded(f.lambdas, lam_dtype))
        return out

    def to(self, device: torch.device | str) -> "EKFACFactors":
        return EKFACFactors({n: f.to(device) for n, f in self.layers.items()}, self.fisher, self.n_examples, self.n_lambda_examples,
                            dict(self.meta), self.artifact_path)

    def check_model(self, model: nn.Module, layers: Optional[Sequence[TrackedLayer]] = None) -> list[TrackedLayer]:
        """Match the factors' layers to ``model``; return the tracked layers in factor order.

        ``model`` may be sharded (FSDP1 or FSDP2, e.g. the model a sharded run trained) or its
        consolidated checkpoint loaded into a plain module: names are compared without wrapper
        segments (:func:`~lightning_influence.layers.unwrapped_name`) and geometry comes from the
        modules' declared sizes, not from their (sharded) parameters.

        Raises:
            FactorMismatchError: listing every layer missing from the model, of unsupported
                type, or whose ``(d_out, d_in, bias)`` differs from the factors'.
        """
        modules = named_modules(model)
        problems, tracked = [], []
        for name, f in self.layers.items():
            m = modules.get(name)
            if m is None:
                problems.append(f"{name}: not in the model")
                continue
            try:
                t = TrackedLayer.from_module(name, m)
            except Exception:
                problems.append(f"{name}: model has unsupported type {type(m).__name__}")
                continue
            if f.layer_type is not None and t.type_name != f.layer_type:
                problems.append(f"{name}: factors are for a {f.layer_type} layer, the model's is a {t.type_name}")
                continue
            if (t.d_out, t.d_in, t.has_bias) != (f.d_out, f.d_in, f.has_bias):
                problems.append(
                    f"{name}: factors are for (d_out={f.d_out}, d_in={f.d_in}, bias={f.has_bias}), "
                    f"model has (d_out={t.d_out}, d_in={t.d_in}, bias={t.has_bias})"
                )
                continue
            tracked.append(t)
        if problems:
            raise FactorMismatchError("factors do not match the model:\n  " + "\n  ".join(problems))
        return tracked


def save_factors(factors: EKFACFactors, directory: str | os.PathLike, extra_manifest: Optional[Mapping[str, Any]] = None,
                 weights: Optional[WeightsFingerprint] = None, model: Optional[nn.Module] = None,
                 storage: str = "exact", in_place: bool = False) -> Path:
    """Write factors atomically as ``tensors.safetensors`` + ``manifest.json`` (kind ``"ekfac"``).

    Args:
        factors: the factors.
        directory: the artifact folder.
        extra_manifest: fields added to the manifest.
        weights: the fingerprint of the weights the factors were made with (see
            :mod:`lightning_influence.weights`), recorded as the manifest's ``"weights"`` so that
            :func:`load_factors` can check a model against it.
        model: when ``weights`` is ``None``, fingerprint this model's factor layers instead
            (without either, nothing is recorded and loading checks no weights).
        storage: one of :data:`STORAGE_CHOICES`: ``"exact"`` (default: as computed, float32 or
            float64), ``"float16"`` (eigenvectors float16, ``Λ`` float32: 60% of the bytes of
            GPT-2 small's exact factors), ``"float16+bfloat16"``, ``"bfloat16"``, or ``"auto"``
            (:func:`resolve_storage`: ``"float16+bfloat16"`` for float32 factors, exact for float64 ones,
            :class:`~lightning_influence.EKFACInfluence`'s default); the name used is recorded
            as the manifest's ``"storage"``. Loading upcasts to float32
            (:meth:`EKFACFactors.as_stored` gives the same factors without a file).
        in_place: with a 16-bit ``storage``, replace each layer's tensors by their stored
            versions while writing (one layer's two versions held at a time, not a 16-bit copy
            of every layer: 0.82 GB for GPT-2 small) and by what :func:`load_factors` returns
            (float32) afterwards, also when the write fails: ``factors`` then hold the file's
            numbers. The :class:`LayerFactors` objects are modified.

    Raises:
        InvalidArgumentError: ``storage`` is not one of :data:`STORAGE_CHOICES`.
    """
    storage = resolve_storage(storage, factors)
    q_dtype, lam_dtype = FACTOR_STORAGE[storage]
    if weights is None and model is not None:
        weights = fingerprint_weights(model, factors.layer_names, "the model given to save_factors")
    heuristic = factors.dampings(None)
    tensors: dict[str, Tensor] = {}
    layers_meta = []
    narrowed: list[tuple[LayerFactors, str, str]] = []  # (layer, attribute, tensor name) replaced by the stored version
    for name, f in factors.layers.items():
        for key in ("q_a", "eig_a", "q_s", "eig_s", "lambdas"):
            t = getattr(f, key)
            dtype = {"q_a": q_dtype, "q_s": q_dtype, "lambdas": lam_dtype}.get(key)
            if dtype is None:
                dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
            tensors[f"{name}::{key}"] = stored = t.to(dtype)
            if in_place and dtype in (torch.float16, torch.bfloat16):
                setattr(f, key, stored)  # the original is released here, not after the write
                narrowed.append((f, key, f"{name}::{key}"))
            del t, stored
        layers_meta.append({"name": name, "type": f.layer_type, "d_out": f.d_out, "d_in": f.d_in, "has_bias": f.has_bias})
    try:
        return write_artifact(directory, "ekfac", tensors, _factor_manifest(factors, layers_meta, storage, heuristic, weights,
                                                                            extra_manifest))
    finally:
        for f, key, tname in narrowed:
            del tensors[tname]  # the 16-bit version is released as its float32 one appears
            setattr(f, key, getattr(f, key).float())


def _factor_manifest(factors: EKFACFactors, layers_meta: list, storage: str, heuristic: dict, weights: Optional[WeightsFingerprint],
                     extra_manifest: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "layers": layers_meta,
        "fisher": factors.fisher,
        "n_examples": factors.n_examples,
        "n_lambda_examples": factors.n_lambda_examples,
        "storage": storage,
        "damping_default": f"{DEFAULT_DAMPING_RULE}: {describe_rule(DEFAULT_DAMPING_RULE)}",
        "heuristic_damping": heuristic,
        "meta": factors.meta,
        **({"weights": weights.as_manifest()} if weights is not None else {}),
        **dict(extra_manifest or {}),
    }


def _upcast(t: Tensor) -> Tensor:
    """A stored 16-bit tensor as float32 (exactly: every float16 and bfloat16 value is a float32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def load_factors(directory: str | os.PathLike, model: Optional[nn.Module] = None, device: str | torch.device = "cpu",
                 allow_other_weights: bool = False) -> EKFACFactors:
    """Load factors written by :func:`save_factors` (or the EKFACInfluence callback).

    Args:
        directory: the artifact directory (e.g. ``<log_dir>/influence/ekfac``).
        model: when given, every layer is checked against it (see :meth:`EKFACFactors.check_model`)
            and so are its weights, against the fingerprint recorded when the factors were written.
        device: where to put the tensors.
        allow_other_weights: use ``model`` although its weights are not the ones the factors
            were made with (a later checkpoint, a fine-tuned model).

    Raises:
        ArtifactError: missing, truncated, corrupt or edited files, another kind of artifact, a
            manifest without the layers' geometry or with an unknown ``"storage"``, tensors
            missing, of the wrong shape or of another dtype than the storage's, or non-finite
            (the message names the file and the problem).

    Eigenvectors and ``Λ`` stored in 16-bit floats (``save_factors(..., storage="float16")``)
    are returned upcast to float32; manifests without ``"storage"`` (older artifacts) are
    ``"exact"``.
        FactorMismatchError: the factors do not fit ``model``.
        WeightsMismatchError: ``model``'s weights are not the ones the factors were made with
            (the message gives both fingerprints); pass ``allow_other_weights=True`` if you mean it.
    """
    tensors, manifest = read_artifact(directory, kind="ekfac")
    layers_meta = manifest_field(directory, manifest, "layers", list)
    if not layers_meta:
        raise ArtifactError(f"{directory}: the manifest lists no layer")
    storage = manifest_field(directory, manifest, "storage", str, "exact")
    if storage not in FACTOR_STORAGE:
        raise ArtifactError(f"{directory}: manifest 'storage' is {storage!r}, expected one of {list(FACTOR_STORAGE)}")
    q_dtype, lam_dtype = FACTOR_STORAGE[storage]
    computed = (torch.float32, torch.float64)
    dtypes = {"q_a": (q_dtype,) if q_dtype else computed, "q_s": (q_dtype,) if q_dtype else computed,
              "lambdas": (lam_dtype,) if lam_dtype else computed, "eig_a": computed, "eig_s": computed}
    layers: dict[str, LayerFactors] = {}
    for i, meta in enumerate(layers_meta):
        where = f"{directory}: manifest layers[{i}]"
        if not isinstance(meta, dict):
            raise ArtifactError(f"{where} is {meta!r}, not an object")
        name = manifest_field(directory, meta, "name", str)
        d_in, d_out = manifest_field(directory, meta, "d_in", int), manifest_field(directory, meta, "d_out", int)
        has_bias = manifest_field(directory, meta, "has_bias", bool)
        if d_in < 1 or d_out < 1 or name in layers:
            raise ArtifactError(f"{where}: layer {name!r} repeats or has d_in={d_in}, d_out={d_out}")
        a_dim = d_in + int(has_bias)
        shapes = {"q_a": (a_dim, a_dim), "eig_a": (a_dim,), "q_s": (d_out, d_out), "eig_s": (d_out,), "lambdas": (d_out, a_dim)}
        parts = {k: _upcast(check_tensor(directory, tensors, f"{name}::{k}", shape, dtypes[k], finite=True)).to(device)
                 for k, shape in shapes.items()}
        layer_type = manifest_field(directory, meta, "type", (str, type(None)), None)
        layers[name] = LayerFactors(**parts, d_in=d_in, d_out=d_out, has_bias=has_bias, layer_type=layer_type)
    unlisted = sorted(k for k in tensors if k.split("::", 1)[0] not in layers)
    if unlisted:
        raise ArtifactError(f"{directory}: tensors {unlisted[:5]} belong to no layer the manifest lists")
    fisher = manifest_field(directory, manifest, "fisher", str, "empirical")
    if fisher not in ("empirical", "true"):
        raise ArtifactError(f"{directory}: manifest 'fisher' is {fisher!r}, expected 'empirical' or 'true'")
    factors = EKFACFactors(
        layers,
        fisher=fisher,
        n_examples=manifest_field(directory, manifest, "n_examples", (int, float), 0),
        n_lambda_examples=manifest_field(directory, manifest, "n_lambda_examples", (int, float), 0),
        meta=manifest_field(directory, manifest, "meta", dict, {}),
    )
    stored = WeightsFingerprint.from_manifest(manifest.get("weights"))
    if stored is not None:
        factors.meta["weights"] = stored.as_manifest()
    factors.artifact_path = Path(directory)  # where they came from: an index built from them references them
    from ..calibrate import apply_saved_calibration

    apply_saved_calibration(directory, manifest, factors)  # a calibration saved next to these factors becomes their default damping
    if model is not None:
        factors.check_model(model)
        check_weights(stored, model, f"factors at {directory}", "the model given to load_factors", allow_other_weights)
    return factors
