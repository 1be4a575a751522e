"""How a gradient becomes an index vector: rotation into the EK-FAC eigenbasis, whitening, projection.

For a tracked layer with EK-FAC factors ``(Q_A, Q_S, Λ)`` and damping ``λ``, write
``W = 1 / (Λ + λ)`` (``[d_out, a_dim]``) and ``R(G) = Q_Sᵀ G Q_A`` (the gradient in the
eigenbasis). The influence score of a query ``x`` on a training example ``z`` is, per layer,

    ``⟨∇m(x), (G + λI)⁻¹ ∇ℓ(z)⟩ = ⟨W ⊙ R(∇m(x)), R(∇ℓ(z))⟩ = ⟨S_q ⊙ R(∇m(x)), S_t ⊙ R(∇ℓ(z))⟩``

for any split ``S_q ⊙ S_t = W``. The index stores ``Π(S_t ⊙ R(∇ℓ(z)))`` for every training
example and a query computes ``Π(S_q ⊙ R(∇m(x)))``: one rotation, one elementwise product and
one projection ``Π`` (:mod:`.projection`), whatever the training set's size. Because ``Π`` is
unbiased for inner products, the score is unbiased for any split, but its variance is lowest
when both sides are balanced, so:

* ``"exact"`` and ``"sjlt"`` use the symmetric split ``S_q = S_t = √W``: stored vectors are
  *whitened* gradients (every coordinate has mean square ``Λ/(Λ+λ) ≤ 1`` over the training
  set, so float16 storage cannot overflow), and a score is a plain inner product;
* ``"kronecker"`` uses ``S_t = u vᵀ``, the rank-one fit of ``√W`` in log space, and
  ``S_q = W ⊘ (u vᵀ)``: the training side is then
  ``P_S diag(u) Q_Sᵀ (Σ_t ds_t a_tᵀ) Q_A diag(v) P_Aᵀ = Σ_t (M_S ds_t)(M_A a_t)ᵀ`` and needs no
  per-example gradient (:meth:`LayerTransform.train_vectors_from_tokens`).

Self-influence ``‖√W ⊙ R(∇ℓ(z))‖²`` is computed exactly during the build, before projection.
Without factors (or with ``damping="identity"``) ``W`` is 1 (the gradient dot product), and
without factors there is no rotation.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..ekfac.capture import per_example_gradients, rotated_per_example_gradients
from ..ekfac.preconditioner import Preconditioner
from ..layers import TrackedLayer
from ..storage import read_artifact, write_artifact
from .projection import COMPRESSIONS, DEFAULT_BUDGET, LayerProjection, layer_dims, make_projection, projection_from_tensors
from .reference import FactorReference
from .shards import InfluenceIndexError

__all__ = ["LayerTransform", "IndexTransform", "TRANSFORM_KIND"]

TRANSFORM_KIND = "index_transform"


@dataclass
class LayerTransform:
    """One layer's map from gradients to index vectors (see the module docstring).

    Attributes:
        name: the layer's qualified module name.
        grad_shape: ``(d_out, a_dim)``.
        q_s: ``Tensor[d_out, d_out]`` eigenvectors of the output-gradient factor, or ``None``
            (no rotation: no factors).
        q_a: ``Tensor[a_dim, a_dim]`` eigenvectors of the input factor, or ``None``.
        whiten: ``√W = (Λ + λ)^{-1/2}``, ``Tensor[d_out, a_dim]``, or ``None`` (identity).
        projection: the layer's :class:`~.projection.LayerProjection`.
        u: ``Tensor[d_out]`` (``"kronecker"`` only) row factor of ``S_t = u vᵀ``.
        v: ``Tensor[a_dim]`` (``"kronecker"`` only) column factor.
    """

    name: str
    grad_shape: tuple[int, int]
    q_s: Optional[Tensor]
    q_a: Optional[Tensor]
    whiten: Optional[Tensor]
    projection: LayerProjection
    u: Optional[Tensor] = None
    v: Optional[Tensor] = None

    def __post_init__(self) -> None:
        self._cache: dict[tuple, Any] = {}

    @property
    def dim(self) -> int:
        return self.projection.dim

    @property
    def factorised(self) -> bool:
        """Whether the training side is ``Σ_t (M_S ds_t)(M_A a_t)ᵀ`` (Kronecker projection)."""
        return self.u is not None

    def _get(self, key: str, dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
        """Tensors cast once per ``(dtype, device)``."""
        k = (key, dtype, device)
        if k not in self._cache:
            self._cache[k] = self._make(key, dtype, device)
        return self._cache[k]

    def _make(self, key: str, dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
        to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        if key in ("q_s", "q_a", "whiten"):
            return to(getattr(self, key))
        if key == "w":  # W = whiten²
            return None if self.whiten is None else to(self.whiten.double().pow(2))
        if key == "train_scale":  # S_t
            if self.u is not None:
                return to(torch.outer(self.u.double(), self.v.double()))
            return to(self.whiten)
        if key == "query_scale":  # S_q = W ⊘ S_t
            if self.u is not None:
                w = self.whiten.double().pow(2) if self.whiten is not None else torch.ones(self.grad_shape, dtype=torch.float64)
                return to(w / torch.outer(self.u.double(), self.v.double()))
            return to(self.whiten)
        if key == "signed_whiten":  # σ ⊙ √W in the sketch's permuted order, flattened
            p = self.projection
            sw = p.signs.double().reshape(self.grad_shape)  # type: ignore[attr-defined]
            if self.whiten is not None:
                sw = sw * self.whiten.double()
            return to(p.permute(sw).reshape(-1))  # type: ignore[attr-defined]
        if key in ("q_s_train", "q_a_train"):  # eigenvectors whose columns follow the sketch's permutations
            q = self.q_s if key == "q_s_train" else self.q_a
            perm = self.projection.perm_s if key == "q_s_train" else self.projection.perm_a  # type: ignore[attr-defined]
            n = self.grad_shape[0] if key == "q_s_train" else self.grad_shape[1]
            q = torch.eye(n, dtype=torch.float64) if q is None else q.double()
            return to(q[:, torch.argsort(perm)])
        if key in ("m_s", "m_a"):  # M_S = P_S diag(u) Q_Sᵀ, M_A = P_A diag(v) Q_Aᵀ
            p = self.projection.p_s if key == "m_s" else self.projection.p_a  # type: ignore[attr-defined]
            scale = self.u if key == "m_s" else self.v
            q = self.q_s if key == "m_s" else self.q_a
            m = p.double() * scale.double()[None, :]
            return to(m if q is None else m @ q.double().T)
        raise KeyError(key)

    # -- gradients in the eigenbasis --------------------------------------------------------
    def rotate(self, g: Tensor) -> Tensor:
        """``Q_Sᵀ G Q_A`` for ``G: Tensor[B, d_out, a_dim]`` (``G`` itself without factors)."""
        if self.q_s is None:
            return g
        return self._get("q_s", g.dtype, g.device).T @ g @ self._get("q_a", g.dtype, g.device)

    def rotated_gradients(self, a: Tensor, ds: Tensor, dtype: torch.dtype) -> Tensor:
        """``R(∇ℓ) = Q_Sᵀ (Σ_t ds_t a_tᵀ) Q_A``, ``Tensor[B, d_out, a_dim]``, from token data
        ``a: [B, T, a_dim]`` and ``ds: [B, T, d_out]`` (cheaper contraction order chosen); for a
        sparse sign projection, in its permuted order (``R'[π_S(i), π_A(j)] = R[i, j]``), which
        costs nothing extra: the columns of ``Q_S`` and ``Q_A`` are permuted once."""
        if self.permuted:
            return rotated_per_example_gradients(a, ds, self._get("q_a_train", dtype, a.device), self._get("q_s_train", dtype, a.device), dtype)
        if self.q_s is None:
            return per_example_gradients(a, ds, dtype)
        return rotated_per_example_gradients(a, ds, self._get("q_a", dtype, a.device), self._get("q_s", dtype, a.device), dtype)

    # -- the two sides ----------------------------------------------------------------------
    @property
    def permuted(self) -> bool:
        """Whether training gradients are rotated straight into the sketch's permuted order."""
        return self.projection.kind == "sjlt"

    def train_vectors(self, rotated: Tensor) -> tuple[Tensor, Tensor]:
        """Index vectors ``Π(S_t ⊙ R)`` (``Tensor[B, dim]``) and exact self-influence
        ``‖√W ⊙ R‖²`` (``Tensor[B]``) of rotated training gradients ``R: [B, d_out, a_dim]``
        (in the sketch's permuted order for ``"sjlt"``: see :meth:`rotated_gradients`)."""
        flat = rotated.reshape(rotated.shape[0], -1)
        if self.permuted:
            # one product with σ ⊙ √W serves both: its squares are W ⊙ R², its bucket sums the sketch
            signed = flat * self._get("signed_whiten", flat.dtype, flat.device)
            return self.projection.sum_permuted(signed), torch.linalg.vector_norm(signed, dim=1).square()  # type: ignore[attr-defined]
        whiten = self._get("whiten", rotated.dtype, rotated.device)
        white = flat if whiten is None else flat * whiten.reshape(-1)
        self_influence = torch.linalg.vector_norm(white, dim=1).square()
        if self.factorised:
            return self.projection.apply(rotated * self._get("train_scale", rotated.dtype, rotated.device)), self_influence
        return self.projection.apply(white.reshape(rotated.shape)), self_influence

    def train_batch(self, a: Tensor, ds: Tensor, dtype: torch.dtype, block_bytes: int = 1 << 20) -> tuple[Tensor, Tensor]:
        """:meth:`train_vectors` of the rotated gradients of token data ``a: [B, T, a_dim]``,
        ``ds: [B, T, d_out]``, a few examples at a time so that each block of per-example
        gradients (about ``block_bytes``) stays in cache through rotation, whitening, the
        self-influence and the projection, instead of streaming ``B × d_out × a_dim`` numbers
        through memory once per step.

        Returns:
            ``(vectors Tensor[B, dim], self_influence Tensor[B])``.
        """
        return self._blocked(a, ds, dtype, block_bytes, lambda aa, dd: self.train_vectors(self.rotated_gradients(aa, dd, dtype)))

    def query_batch(self, a: Tensor, ds: Tensor, dtype: torch.dtype, block_bytes: int = 1 << 20) -> tuple[Tensor, Tensor]:
        """Query vectors ``Π(S_q ⊙ R(∇m))`` straight from token data (the same as
        :meth:`query_vectors` of the formed gradients, without forming them in the standard basis
        first: the rotation takes the cheaper contraction order, and cache-sized blocks as in
        :meth:`train_batch`), and the queries' exact squared norms ``‖√W ⊙ R(∇m)‖²``.

        Returns:
            ``(vectors Tensor[B, dim], squared norms Tensor[B])``.
        """
        if not self.factorised:  # S_q = S_t = √W: the training side's fast path
            return self.train_batch(a, ds, dtype, block_bytes)

        def one(aa: Tensor, dd: Tensor) -> tuple[Tensor, Tensor]:
            r = self.rotated_gradients(aa, dd, dtype)
            return self.projection.apply(r * self._get("query_scale", r.dtype, r.device)), self._white_norms(r)

        return self._blocked(a, ds, dtype, block_bytes, one)

    def _blocked(self, a: Tensor, ds: Tensor, dtype: torch.dtype, block_bytes: int, fn) -> tuple[Tensor, Tensor]:
        """``fn(a[rows], ds[rows]) -> (vectors, values)`` over blocks of about ``block_bytes`` of gradients."""
        b = a.shape[0]
        rows = max(1, block_bytes // (self.grad_shape[0] * self.grad_shape[1] * torch.empty((), dtype=dtype).element_size()))
        if rows >= b:
            return fn(a, ds)
        vec = torch.empty(b, self.dim, dtype=dtype, device=a.device)
        values = torch.empty(b, dtype=dtype, device=a.device)
        for s in range(0, b, rows):
            e = min(b, s + rows)
            vec[s:e], values[s:e] = fn(a[s:e], ds[s:e])
        return vec, values

    def train_vectors_from_tokens(self, a: Tensor, ds: Tensor, dtype: torch.dtype) -> Tensor:
        """Index vectors straight from token data, never forming a per-example gradient:
        ``Σ_t (M_S ds_t)(M_A a_t)ᵀ`` for a Kronecker projection (``Tensor[B, k_s · k_a]``);
        other projections form the rotated gradient first."""
        if not self.factorised:
            return self.train_vectors(self.rotated_gradients(a, ds, dtype))[0]
        m_s, m_a = self._get("m_s", dtype, a.device), self._get("m_a", dtype, a.device)
        return torch.einsum("btk,btl->bkl", ds.to(dtype) @ m_s.T, a.to(dtype) @ m_a.T).reshape(a.shape[0], -1)

    def query_vectors(self, g: Tensor) -> Tensor:
        """Query vectors ``Π(S_q ⊙ R(G))``, ``Tensor[B, dim]``, of gradients ``G: [B, d_out, a_dim]``
        in the standard basis (a query's measurement gradient, or anything to be scored
        against the index as if it were one)."""
        return self.query_vectors_and_norms(g)[0]

    def query_vectors_and_norms(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`query_vectors` and the exact squared norms ``‖√W ⊙ R(G)‖² = Gᵀ (G + λI)⁻¹ G``
        (``Tensor[B]``, before any projection) from one rotation."""
        r = self.rotate(g)
        scale = self._get("query_scale", r.dtype, r.device)
        return self.projection.apply(r if scale is None else r * scale), self._white_norms(r)

    def _white_norms(self, r: Tensor) -> Tensor:
        """``‖√W ⊙ R‖²`` per row of rotated gradients ``R: [B, d_out, a_dim]`` (standard order)."""
        w = self._get("w", r.dtype, r.device)
        return (r.pow(2) if w is None else r.pow(2) * w).sum(dim=(1, 2))

    def whitened_query(self, g: Tensor) -> Tensor:
        """Exact (unprojected) whitened query gradients for re-ranking: ``√W ⊙ R(G)`` flattened,
        ``Tensor[B, d_out · a_dim]``, for gradients ``G`` in the standard basis."""
        r = self.rotate(g)
        w = self._get("whiten", r.dtype, r.device)
        return (r if w is None else r * w).reshape(r.shape[0], -1)

    def whitened_train(self, a: Tensor, ds: Tensor, dtype: torch.dtype) -> Tensor:
        """Exact (unprojected) ``√W ⊙ R(∇ℓ)`` flattened, ``Tensor[B, d_out · a_dim]``, from token
        data: inner products with :meth:`whitened_query` are exact influence scores."""
        if self.q_s is None:
            r = per_example_gradients(a, ds, dtype)
        else:
            r = rotated_per_example_gradients(a, ds, self._get("q_a", dtype, a.device), self._get("q_s", dtype, a.device), dtype)
        w = self._get("whiten", r.dtype, r.device)
        return (r if w is None else r * w).reshape(r.shape[0], -1)

    def preconditioned(self, g: Tensor) -> Tensor:
        """``(G + λI)⁻¹ G = Q_S (W ⊙ R(G)) Q_Aᵀ`` in the standard basis, ``[B, d_out, a_dim]``."""
        r = self.rotate(g)
        w = self._get("w", r.dtype, r.device)
        r = r if w is None else r * w
        if self.q_s is None:
            return r
        return self._get("q_s", r.dtype, r.device) @ r @ self._get("q_a", r.dtype, r.device).T

    # -- storage ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        out = {f"{self.name}::proj::{k}": v for k, v in self.projection.tensors().items()}
        for key in ("q_s", "q_a", "whiten", "u", "v"):
            t = getattr(self, key)
            if t is not None:
                out[f"{self.name}::{key}"] = t
        return out

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "grad_shape": list(self.grad_shape), "projection": self.projection.kind, "dim": self.dim,
                "rotated": self.q_s is not None, "whitened": self.whiten is not None}


def _log_rank_one(whiten: Tensor) -> tuple[Tensor, Tensor]:
    """``(u, v)`` with ``log(u_i v_j)`` the least-squares additive fit of ``log whiten_ij``."""
    log = whiten.double().log()
    m = log.mean()
    return (log.mean(dim=1) - m / 2).exp(), (log.mean(dim=0) - m / 2).exp()


class IndexTransform:
    """The per-layer transforms of an index plus the options that made them.

    Args:
        layers: layer name → :class:`LayerTransform`, in scoring order.
        compression: ``"auto"``, ``"exact"``, ``"sjlt"`` or ``"kronecker"``.
        dim: projected length per layer (``None`` for ``"exact"``; the floor for ``"auto"``).
        seed: seed of the random projections.
        damping: layer → λ used for ``W`` (empty when ``W`` is the identity).
        reference: where the factors live (:class:`~.reference.FactorReference`) when the index
            references a saved factor artifact instead of storing the factor-derived tensors
            (``None``: they are stored with the index).
        budget: numbers per example of ``"auto"`` (:func:`~.projection.layer_dims`; ``None`` otherwise).

    Attributes:
        projection_sha256: layer → SHA-256 of its drawn projection (checked when a referenced
            index draws its projections again from the seeds).
    """

    def __init__(self, layers: dict[str, LayerTransform], compression: str, dim: Optional[int], seed: int, damping: dict[str, float],
                 reference: Optional[FactorReference] = None, budget: Optional[int] = None) -> None:
        self.layers = layers
        self.compression = compression
        self.dim = dim
        self.budget = budget if compression == "auto" else None
        self.seed = seed
        self.damping = damping
        self.reference = reference
        self.projection_sha256 = {n: _projection_digest(t.projection) for n, t in layers.items()}

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    @property
    def dims(self) -> dict[str, int]:
        return {n: t.dim for n, t in self.layers.items()}

    @property
    def layer_choice(self) -> dict[str, Optional[int]]:
        """The resolved rule per layer: ``None`` where the layer is stored exactly, else its
        sketch's length (what :func:`~.projection.layer_dims` gave; saved in the manifests)."""
        return {n: None if t.projection.kind == "exact" else t.dim for n, t in self.layers.items()}

    @classmethod
    def from_preconditioner(
        cls,
        preconditioner: Preconditioner,
        tracked: Sequence[TrackedLayer],
        compression: str = "sjlt",
        dim: Optional[int] = None,
        seed: int = 0,
        reference: Optional[FactorReference] = None,
        budget: Optional[int] = DEFAULT_BUDGET,
        dims: Optional[dict[str, Optional[int]]] = None,
    ) -> "IndexTransform":
        """Draw the projections and take rotation and whitening from ``preconditioner``
        (its layers, in ``tracked`` order; each layer gets the numbers
        :func:`~.projection.layer_dims` gives it for ``compression``, ``dim`` and ``budget``:
        ``None`` means stored exactly). ``reference``: the saved artifact holding
        ``preconditioner``'s factors, when the index is to reference it. ``dims``: explicit
        per-layer lengths instead of the rule's (``None`` per layer: exact; benchmarks).

        The eigenvectors are kept in the factors' dtype (cast once per compute dtype when
        used), never widened to float64 copies."""
        return cls._build(preconditioner, [(t.name, tuple(t.grad_shape)) for t in tracked], compression, dim, seed, reference,
                          budget=budget, dims=dims)

    @classmethod
    def _build(cls, preconditioner: Preconditioner, shapes: Sequence[tuple[str, tuple[int, int]]], compression: str,
               dim: Optional[int], seed: int, reference: Optional[FactorReference],
               uv: Optional[dict[str, tuple[Tensor, Tensor]]] = None, budget: Optional[int] = DEFAULT_BUDGET,
               dims: Optional[dict[str, Optional[int]]] = None) -> "IndexTransform":
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")
        if dims is None:
            dims = layer_dims(shapes, compression, dim, budget)
        missing = [n for n, _ in shapes if n not in dims]
        if missing:
            raise ValueError(f"no dim for layers {missing}")
        layers = {}
        for i, (name, shape) in enumerate(shapes):
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
            f = preconditioner.factors.get(name)
            q_s = q_a = whiten = None
            if f is not None:
                q_s, q_a = f.q_s.cpu(), f.q_a.cpu()
                if tuple(f.grad_shape) != tuple(shape):
                    raise ValueError(f"factors of {name!r} are for gradients {f.grad_shape}, the model's layer has {shape}")
            if not preconditioner.identity:
                whiten = f.inverse_scale(preconditioner.damping[name], power=0.5).double().cpu()
            proj = make_projection(compression, shape, dims[name], gen)
            u = v = None
            if proj.kind == "kronecker":
                if uv is not None and name in uv:
                    u, v = uv[name]
                else:
                    u, v = _log_rank_one(whiten) if whiten is not None else (torch.ones(shape[0], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64))
            layers[name] = LayerTransform(name, shape, q_s, q_a, whiten, proj, u, v)
        damping = {} if preconditioner.identity else {n: float(preconditioner.damping[n]) for n in layers}
        return cls(layers, compression, dim, seed, damping, reference, budget)

    def options(self) -> dict[str, Any]:
        """JSON-serialisable description (saved in manifests). ``"auto"`` adds its ``budget`` and
        the resolved ``layer_dims`` (:attr:`layer_choice`), which a referencing index reads back."""
        out = {"compression": self.compression, "dim": self.dim, "seed": self.seed, "damping": self.damping,
               "layers": [t.meta() for t in self.layers.values()]}
        if self.compression == "auto":
            out.update(budget=self.budget, layer_dims=self.layer_choice)
        return out

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the transform (factor-derived and projections)."""
        out: dict[str, Tensor] = {}
        for t in self.layers.values():
            out.update(t.tensors())
        return out

    def stored_tensors(self) -> dict[str, Tensor]:
        """The tensors an index stores: all of :meth:`tensors` without a reference; with one,
        only what cannot be had from the factors and the seeds (the Kronecker split ``u``, ``v``)."""
        if self.reference is None:
            return self.tensors()
        return {f"{t.name}::{k}": getattr(t, k) for t in self.layers.values() for k in ("u", "v") if getattr(t, k) is not None}

    def fingerprint(self, extra: Optional[dict[str, Any]] = None) -> str:
        """SHA-256 over the transform's options and tensors (and ``extra``): two builds that may
        share shards have equal fingerprints. A referencing transform hashes the factor
        artifact's checksums and the projections' digests instead of gigabytes of tensors."""
        desc = {**self.options(), **(extra or {})}
        if self.reference is not None:
            desc["factors"] = {"tensor_sha256": self.reference.tensor_sha256}
            desc["projection_sha256"] = self.projection_sha256
        h = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode())
        for k, v in sorted((self.stored_tensors() if self.reference is not None else self.tensors()).items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, directory: str | os.PathLike, manifest: Optional[dict[str, Any]] = None) -> Path:
        """Write as an ``"index_transform"`` artifact (with a reference: the reference, the
        projections' digests and the Kronecker split only)."""
        extra: dict[str, Any] = {"identity": not self.damping}
        if self.reference is not None:
            extra.update({"factors": self.reference.as_manifest(), "projection_sha256": self.projection_sha256})
        return write_artifact(directory, TRANSFORM_KIND, self.stored_tensors(), {**self.options(), **extra, **(manifest or {})})

    @classmethod
    def load(cls, directory: str | os.PathLike, index_dir: Optional[str | os.PathLike] = None) -> tuple["IndexTransform", dict[str, Any]]:
        """Read a transform written by :meth:`save`; returns it and its manifest. A referencing
        transform reads its factors (verified against the recorded checksums) and draws its
        projections again (verified against their digests).

        Raises:
            FactorReferenceError: the referenced factors are gone or changed.
            InfluenceIndexError: the projections drawn again differ from the build's.
        """
        tensors, m = read_artifact(directory, kind=TRANSFORM_KIND)
        if m.get("factors") is not None:
            return cls._load_referenced(directory, index_dir, tensors, m), m
        layers = {}
        for meta in m["layers"]:
            n, shape = meta["name"], tuple(meta["grad_shape"])
            get = lambda k: tensors.get(f"{n}::{k}")  # noqa: E731
            proj_t = {k.split("::", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{n}::proj::")}
            proj = projection_from_tensors(meta["projection"], shape, int(meta["dim"]), proj_t)
            layers[n] = LayerTransform(n, shape, get("q_s"), get("q_a"), get("whiten"), proj, get("u"), get("v"))
        return cls(layers, m["compression"], m.get("dim"), int(m.get("seed", 0)), dict(m.get("damping") or {}), None, m.get("budget")), m

    @classmethod
    def _load_referenced(cls, directory: str | os.PathLike, index_dir: Optional[str | os.PathLike], tensors: dict[str, Tensor],
                         m: dict[str, Any]) -> "IndexTransform":
        from ..ekfac.factors import EKFACFactors

        where = f"the index at {index_dir if index_dir is not None else Path(directory).parent}"
        ref = FactorReference.from_manifest(m.get("factors"), str(directory))
        _, factors = ref.load(index_dir, who=where)
        shapes = [(meta["name"], tuple(meta["grad_shape"])) for meta in m["layers"]]
        missing = [n for n, _ in shapes if n not in factors.layers]
        if missing:
            raise InfluenceIndexError(f"{where}: the referenced factors at {ref.path} lack layers {missing}")
        sub = EKFACFactors({n: factors.layers[n] for n, _ in shapes})
        damping: Any = "identity" if m.get("identity") else {n: float(v) for n, v in (m.get("damping") or {}).items()}
        pre = Preconditioner(sub, [n for n, _ in shapes], damping, torch.float64)
        uv = {n: (tensors[f"{n}::u"], tensors[f"{n}::v"]) for n, _ in shapes if f"{n}::u" in tensors}
        dims = m.get("layer_dims")  # "auto": the choice the build resolved (older indexes: the fixed rule from dim)
        out = cls._build(pre, shapes, m["compression"], m.get("dim"), int(m.get("seed", 0)), ref, uv, budget=m.get("budget"),
                         dims=None if dims is None else {n: None if d is None else int(d) for n, d in dims.items()})
        recorded = m.get("projection_sha256") or {}
        bad = [n for n, d in out.projection_sha256.items() if recorded.get(n) != d]
        if bad:
            raise InfluenceIndexError(
                f"{where}: the random projections drawn again from seed {out.seed} differ from the build's for layers {bad[:3]} "
                f"(this torch {torch.__version__} draws other numbers than the build's, {m.get('library_version')!r}); "
                "rebuild the index with this version")
        return out


def _projection_digest(projection: LayerProjection) -> str:
    """SHA-256 of a projection's random draw (its kind and tensors)."""
    h = hashlib.sha256(f"{projection.kind}:{projection.shape}:{projection.dim}".encode())
    for k, v in sorted(projection.tensors().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
