"""Random projections of one layer's gradient matrix that keep inner products unbiased.

A projection ``Π`` maps a layer's ``[d_out, a_dim]`` matrix ``X`` to a vector of ``dim`` numbers
with ``E[⟨Π(X), Π(Y)⟩] = ⟨X, Y⟩`` (Frobenius inner product) over the random draw, and a
variance that falls like ``1 / dim``. Three kinds:

* :class:`Flatten` (``"exact"``): ``vec(X)`` row-major, no randomness, ``dim = d_out · a_dim``.
* :class:`SparseSign` (``"sjlt"``): a sparse Johnson-Lindenstrauss transform with one non-zero
  per input coordinate (a CountSketch): coordinate ``j`` is added, with a random sign
  ``σ_j = ±1``, to one of ``dim`` buckets. Unbiased because ``E[σ_i σ_j] = 1{i = j}``; with
  uniformly spread buckets ``Var⟨Πx, Πy⟩ ≈ (‖x‖²‖y‖² + ⟨x, y⟩² − 2 Σ_j x_j² y_j²) / dim``.
  Costs one pass over ``X`` and stores ``d_out · a_dim`` signs and two permutations.
* :class:`Kronecker` (``"kronecker"``): ``P_S X P_Aᵀ`` with independent Rademacher matrices
  ``P_S: [k_s, d_out]`` and ``P_A: [k_a, a_dim]`` scaled by ``1/√k_s`` and ``1/√k_a``, so
  ``E[(P_S ⊗ P_A)ᵀ (P_S ⊗ P_A)] = I``. Because ``P_S (Σ_t ds_t a_tᵀ) P_Aᵀ = Σ_t (P_S ds_t)(P_A a_t)ᵀ``,
  a per-example gradient can be projected from the layer's token vectors without ever being
  formed (the LoGra construction). Stores only ``k_s · d_out + k_a · a_dim`` numbers; its
  variance is higher than a dense projection of the same ``dim`` (see docs/benchmarks_index.md).

Which layers are projected, and to how many numbers, is :func:`layer_dims`'s choice: the default
``"auto"`` stores layers exactly while the example fits a budget (49,152 numbers) and sketches the
rest by SJLT to an equal share of what is left, at least ``dim`` each.

Every projection is drawn from a seeded CPU :class:`torch.Generator` and saved with the index
(:meth:`LayerProjection.tensors`), so an index never depends on a random stream being
reproduced by a later torch version.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Compression", "COMPRESSIONS", "DEFAULT_BUDGET", "LayerProjection", "Flatten", "SparseSign", "Kronecker", "layer_dims",
           "make_projection", "projection_from_tensors"]

Compression = Literal["auto", "exact", "sjlt", "kronecker"]
COMPRESSIONS: tuple[str, ...] = ("auto", "exact", "sjlt", "kronecker")
DEFAULT_BUDGET = 49_152
"""Numbers per example that ``compression="auto"`` may spend before it sketches (GPT-2 small's
48 tracked layers × 1,024: 98,304 bytes per example in float16)."""


def layer_dims(shapes: Sequence[tuple[str, tuple[int, int]]], compression: str, dim: Optional[int],
               budget: Optional[int] = DEFAULT_BUDGET) -> dict[str, Optional[int]]:
    """How many numbers each layer stores: ``None`` for a layer stored exactly (all of its
    ``d_out · a_dim`` entries), else the length of its sketch.

    * ``"exact"``: every layer ``None``.
    * ``"sjlt"`` / ``"kronecker"``: ``dim`` for a layer with more than ``dim`` entries, else ``None``.
    * ``"auto"``: water-filling of ``budget`` numbers per example. Layers are taken from the
      fewest entries up; a layer is stored exactly while its entries fit an equal share of what
      is left (``remaining budget / layers left``); every larger layer is sketched (SJLT) to
      that share ``w`` (the same for all of them), but never to fewer than ``dim`` numbers:
      ``min(entries, max(dim, w))``, ``None`` where that is all its entries. So a model whose
      layers hold at most ``budget`` entries in all is stored exactly, and a model with many
      large layers gets ``dim`` per layer, as ``"sjlt"`` does (GPT-2 small: ``w = 1,024``).
      ``dim=None`` sets no floor.

    Args:
        shapes: ``(name, (d_out, a_dim))`` per layer.
        compression: one of :data:`COMPRESSIONS`.
        dim: numbers per sketched layer (the floor under ``"auto"``).
        budget: numbers per example for ``"auto"`` (ignored otherwise).

    Returns:
        ``{name: None | int}`` in the order of ``shapes``.
    """
    sizes = {name: int(s[0]) * int(s[1]) for name, s in shapes}
    if compression == "exact" or (compression != "auto" and dim is None):
        return {n: None for n in sizes}
    if compression in ("sjlt", "kronecker"):
        return {n: (None if k <= dim else int(dim)) for n, k in sizes.items()}
    if compression != "auto":
        raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")
    if budget is None or budget < 1:
        raise ValueError(f"compression='auto' needs a positive budget, got {budget!r}")
    left, count = int(budget), len(sizes)
    share = None
    for n, k in sorted(sizes.items(), key=lambda nk: nk[1]):
        if k * count <= left:  # fits an equal share of what is left: exact
            left, count = left - k, count - 1
            continue
        share = left // count
        break
    floor = 1 if dim is None else int(dim)
    out: dict[str, Optional[int]] = {}
    for n, k in sizes.items():
        d = k if share is None else min(k, max(floor, share))
        out[n] = None if d >= k else d
    return out


class LayerProjection:
    """Base class: ``apply(X: Tensor[B, d_out, a_dim]) -> Tensor[B, dim]``.

    Attributes:
        kind: ``"exact"``, ``"sjlt"`` or ``"kronecker"``.
        shape: ``(d_out, a_dim)`` of the matrices it projects.
        dim: length of the projected vectors.
    """

    kind: str = ""

    def __init__(self, shape: tuple[int, int], dim: int) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.dim = int(dim)

    def apply(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Project ``x: Tensor[B, d_out, a_dim]`` to ``Tensor[B, dim]`` (same dtype)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """The random draw, for storage (empty for :class:`Flatten`)."""
        return {}

    def to(self, device: torch.device | str) -> "LayerProjection":
        """A copy whose tensors live on ``device``."""
        return projection_from_tensors(self.kind, self.shape, self.dim, {k: v.to(device) for k, v in self.tensors().items()})


class Flatten(LayerProjection):
    """``vec(X)``, row-major: the exact (uncompressed) index."""

    kind = "exact"

    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__(shape, shape[0] * shape[1])

    def apply(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)


class SparseSign(LayerProjection):
    """Sparse sign projection (a CountSketch): ``out[h(i, j)] += σ_ij · X_ij``.

    The signs ``σ_ij = ±1`` are independent and uniform, so the sketch is unbiased for inner
    products whatever the buckets. The buckets come from two random permutations ``π_S`` (of the
    ``d_out`` rows) and ``π_A`` (of the ``a_dim`` columns): ``h(i, j) = (π_S(i) · a_dim + π_A(j)) mod dim``,
    which fills every bucket with ``d_out · a_dim / dim`` coordinates (±1) and puts two coordinates
    of one row in one bucket only when ``a_dim > dim``. The structure is what makes the training
    side fast: permuting the columns of the eigenvector matrices ``Q_S``, ``Q_A`` (free, once)
    yields the rotated gradient already in permuted order, whose buckets are then consecutive
    residues, summed by one reshape instead of a scatter (:meth:`sum_permuted`; 5× faster than
    ``index_add_`` on the benchmark's MLP).

    Args:
        shape: ``(d_out, a_dim)``.
        perm_s: ``LongTensor[d_out]``, ``π_S``.
        perm_a: ``LongTensor[a_dim]``, ``π_A``.
        signs: ``Tensor[d_out · a_dim]`` of ``±1``, row-major over the *unpermuted* coordinates.
        dim: number of buckets.
    """

    kind = "sjlt"

    def __init__(self, shape: tuple[int, int], perm_s: Tensor, perm_a: Tensor, signs: Tensor, dim: int) -> None:
        super().__init__(shape, dim)
        o, a = self.shape
        if perm_s.shape != (o,) or perm_a.shape != (a,) or signs.shape != (o * a,):
            raise ValueError(f"SparseSign for shape {self.shape} needs perm_s[{o}], perm_a[{a}] and signs[{o * a}]")
        self.perm_s, self.perm_a = perm_s.long(), perm_a.long()
        self.signs = signs.to(torch.int8)
        self._cache: dict[tuple, Tensor] = {}

    @property
    def buckets(self) -> Tensor:
        """``LongTensor[d_out · a_dim]``: the bucket of each (unpermuted, row-major) coordinate;
        formed when first used (only :meth:`apply` needs it: 8 bytes per gradient entry)."""
        if "buckets" not in self._cache:
            a = self.shape[1]
            self._cache["buckets"] = ((self.perm_s[:, None] * a + self.perm_a[None, :]) % self.dim).reshape(-1)
        return self._cache["buckets"]

    @classmethod
    def draw(cls, shape: tuple[int, int], dim: int, generator: torch.Generator) -> "SparseSign":
        o, a = shape
        perm_s = torch.randperm(o, generator=generator)
        perm_a = torch.randperm(a, generator=generator)
        signs = torch.randint(0, 2, (o * a,), generator=generator).to(torch.int8) * 2 - 1
        return cls(shape, perm_s, perm_a, signs, dim)

    def _as(self, key: str, dtype: torch.dtype, device: torch.device) -> Tensor:
        k = (key, dtype, device)
        if k not in self._cache:
            t = self.signs if key == "signs" else self.buckets
            self._cache[k] = t.to(device=device, dtype=dtype)
        return self._cache[k]

    def apply(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        signed = flat * self._as("signs", flat.dtype, flat.device)
        out = torch.zeros(flat.shape[0], self.dim, dtype=flat.dtype, device=flat.device)
        return out.index_add_(1, self._as("buckets", torch.long, flat.device), signed)

    def permute(self, m: Tensor) -> Tensor:
        """``M'`` with ``M'[π_S(i), π_A(j)] = M[i, j]`` for ``M: [..., d_out, a_dim]``."""
        inv_s, inv_a = torch.argsort(self.perm_s), torch.argsort(self.perm_a)
        return m[..., inv_s.to(m.device), :][..., inv_a.to(m.device)]

    def sum_permuted(self, signed: Tensor) -> Tensor:
        """Bucket sums of ``signed: Tensor[B, d_out · a_dim]``, a signed vector already in permuted
        row-major order (entry ``f = π_S(i) · a_dim + π_A(j)`` goes to bucket ``f mod dim``)."""
        b, n = signed.shape
        full = (n // self.dim) * self.dim
        out = signed[:, :full].reshape(b, -1, self.dim).sum(1) if full else torch.zeros(b, self.dim, dtype=signed.dtype, device=signed.device)
        rest = n - full
        if rest:
            out[:, :rest] += signed[:, full:]
        return out

    def tensors(self) -> dict[str, Tensor]:
        return {"perm_s": self.perm_s.to(torch.int32), "perm_a": self.perm_a.to(torch.int32), "signs": self.signs}


class Kronecker(LayerProjection):
    """``vec(P_S X P_Aᵀ)`` with Rademacher ``P_S: [k_s, d_out] / √k_s`` and ``P_A: [k_a, a_dim] / √k_a``.

    Args:
        p_s: ``Tensor[k_s, d_out]``.
        p_a: ``Tensor[k_a, a_dim]``.
    """

    kind = "kronecker"

    def __init__(self, p_s: Tensor, p_a: Tensor) -> None:
        super().__init__((p_s.shape[1], p_a.shape[1]), p_s.shape[0] * p_a.shape[0])
        self.p_s, self.p_a = p_s, p_a

    @staticmethod
    def split(shape: tuple[int, int], dim: int) -> tuple[int, int]:
        """``(k_s, k_a)`` with ``k_s · k_a ≤ dim``, ``k_s ≤ d_out``, ``k_a ≤ a_dim``, in proportion to the layer's sides."""
        o, a = shape
        k_s = max(1, min(o, int(round(math.sqrt(dim * o / a)))))
        k_a = max(1, min(a, dim // k_s))
        k_s = max(1, min(o, dim // k_a))
        return k_s, k_a

    @classmethod
    def draw(cls, shape: tuple[int, int], dim: int, generator: torch.Generator) -> "Kronecker":
        k_s, k_a = cls.split(shape, dim)
        rad = lambda r, c: (torch.randint(0, 2, (r, c), generator=generator).double() * 2 - 1) / math.sqrt(r)  # noqa: E731
        return cls(rad(k_s, shape[0]), rad(k_a, shape[1]))

    def apply(self, x: Tensor) -> Tensor:
        p_s, p_a = self.p_s.to(x.device, x.dtype), self.p_a.to(x.device, x.dtype)
        return (p_s @ x @ p_a.T).reshape(x.shape[0], -1)

    def tensors(self) -> dict[str, Tensor]:
        return {"p_s": self.p_s, "p_a": self.p_a}


def make_projection(kind: str, shape: tuple[int, int], dim: Optional[int], generator: torch.Generator) -> LayerProjection:
    """Draw a projection of ``kind`` for ``[d_out, a_dim]`` matrices into ``dim`` numbers.

    A layer whose ``d_out · a_dim ≤ dim`` (or ``kind="exact"``) is stored exactly: projecting
    would only add noise.
    """
    n = shape[0] * shape[1]
    if kind == "exact" or dim is None or n <= dim:
        return Flatten(shape)
    if kind in ("sjlt", "auto"):  # "auto": the dim of one layer (:func:`layer_dims`), sketched by SJLT
        return SparseSign.draw(shape, dim, generator)
    if kind == "kronecker":
        return Kronecker.draw(shape, dim, generator)
    raise ValueError(f"unknown compression {kind!r}; expected one of {COMPRESSIONS}")


def projection_from_tensors(kind: str, shape: tuple[int, int], dim: int, tensors: dict[str, Tensor]) -> LayerProjection:
    """Rebuild a projection saved with :meth:`LayerProjection.tensors`."""
    if kind == "exact":
        return Flatten(shape)
    if kind == "sjlt":
        return SparseSign(shape, tensors["perm_s"], tensors["perm_a"], tensors["signs"], dim)
    if kind == "kronecker":
        return Kronecker(tensors["p_s"], tensors["p_a"])
    raise ValueError(f"unknown projection kind {kind!r}")
