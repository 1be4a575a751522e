"""Z0-Inf estimators from the Gram matrix and the loss tables (no Lightning, no gradients).

Inputs (``E`` recorded checkpoints):
    * ``gram``: ``Tensor[E, E]``, ``G[i, j] = <θ_i, θ_j>`` over the selected parameters (float64).
    * loss tables: ``Tensor[E, n]``, row ``i`` = per-example losses (summed over tokens) at θ_i.

Every estimator here is a bilinear form in the examples' loss trajectories. For checkpoint ``i``
with neighbours ``J`` (see :func:`~lightning_influence.z0.neighbours.select_neighbours`), let
``D_i`` be the matrix with rows ``θ_j − θ_i`` (``j ∈ J``), ``K_i = D_i D_iᵀ`` its Gram matrix
(``K_i[j, k] = G_ii − G_ij − G_ik + G_jk``) and ``ΔL_i(x) = (L_j(x) − L_i(x))_{j ∈ J}``. The
directional gradient of example ``x`` at θ_i is ``g_i(x) = D_iᵀ c_i(x)`` with, by the method of
:class:`DirectionalFit`,

    * ``"least_squares"`` (default): ``c_i = K_i⁺ ΔL_i``, the minimum-norm ``g`` with
      ``D_i g = ΔL_i`` (exact first-order fit); ``g_i(z)·g_i(x) = ΔL_i(z)ᵀ K_i⁺ ΔL_i(x)``.
    * ``"finite_difference"``: ``c_ij = ΔL_ij / (|J| N_ij)``, the average of the secant
      directions ``ΔL_ij (θ_j − θ_i) / ‖θ_j − θ_i‖²``; ``g_i(z)·g_i(x) = c_i(z)ᵀ K_i c_i(x)``.

and the score sums over checkpoints: ``I(x, z) = Σ_i g_i(x)·g_i(z) = L(x)ᵀ Q L(z)`` for one
``E × E`` matrix ``Q`` (:func:`z0_quadratic_form`). So a pairwise table is ``L_qᵀ Q L_tr``,
computed in chunks of training examples, and self-influence is its diagonal.

Sign and units: ``g_i`` estimates the loss gradient, so ``g_i(x)·g_i(z) > 0`` means a gradient
step on ``z`` lowers ``x``'s loss: positive = helps, as for the EK-FAC scorer. Scores are sums
over checkpoints (the released code divides by ``E``; that does not change rankings) in units
of loss² / parameter-distance²; they are not normalised by the dataset size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import validation as check
from .neighbours import squared_distances

__all__ = [
    "GradientFit",
    "GRADIENT_FITS",
    "DirectionalFit",
    "FitLike",
    "z0_quadratic_form",
    "directional_coefficients",
    "self_influence_variance",
    "self_influence_mean_loss",
    "self_influence_directional",
    "train_test_influence",
    "spearman_matrix",
    "centre_losses",
]

GradientFit = Literal["least_squares", "finite_difference"]
GRADIENT_FITS = ("least_squares", "finite_difference")


@dataclass(frozen=True)
class DirectionalFit:
    """How each checkpoint's directional gradient ``g_i`` is fitted from its neighbours
    (validated on construction; every estimator takes one, or just the ``method`` name).

    Attributes:
        method: ``"least_squares"`` (``c_i = K_i⁺ ΔL_i``) or ``"finite_difference"`` (mean of
            the secants); see the module docstring.
        rcond: least squares only: eigenvalues of ``K_i`` below ``rcond × max eigenvalue`` are
            treated as zero (pseudo-inverse), so collinear neighbour moves do not blow up; ``>= 0``.
        damping: least squares only: ``λ >= 0`` added to ``K_i``'s diagonal, ``(K_i + λ I)⁻¹``
            (ridge fit); ``0`` gives the pseudo-inverse.

    Raises:
        InvalidArgumentError: an unknown method, or a negative / non-finite ``rcond`` or ``damping``.
    """

    method: GradientFit = "least_squares"
    rcond: float = 1e-10
    damping: float = 0.0

    def __post_init__(self) -> None:
        check.choice("DirectionalFit", "method", self.method, GRADIENT_FITS)
        check.finite_float("DirectionalFit", "rcond", self.rcond, minimum=0.0)
        check.finite_float("DirectionalFit", "damping", self.damping, minimum=0.0)

    @classmethod
    def of(cls, fit: FitLike) -> "DirectionalFit":
        """``fit`` itself, or ``DirectionalFit(fit)`` for a method name."""
        return fit if isinstance(fit, DirectionalFit) else cls(fit)


FitLike = Union[GradientFit, DirectionalFit]
"""A :class:`DirectionalFit`, or a method name for one with the default ``rcond`` and ``damping``."""


def _table(name: str, t: Tensor, e: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 2:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a loss table Tensor[E, n], got {shape}")
    if e is not None and t.shape[0] != e:
        raise ValueError(f"{name} has {t.shape[0]} checkpoint rows but the Gram matrix has {e}")
    return t


def centre_losses(losses: Tensor) -> Tensor:
    """Subtract each checkpoint's mean loss over examples (``Tensor[E, n]`` → same shape, float64).

    This removes the loss drift shared by all examples (the released code's ``center_losses``);
    the train and query tables are each centred by their own mean, as there.
    """
    losses = losses.to(torch.float64)
    return losses - losses.mean(dim=1, keepdim=True)


def _checkpoint_fit(g: Tensor, n2: Tensor, i: int, nb: Tensor, fit: DirectionalFit) -> tuple[Tensor, Tensor]:
    """``(K_i, A_i)``: neighbour-difference Gram matrix and the map ``c_i = A_i ΔL_i``."""
    m = nb.numel()
    k = g[i, i] - g[i, nb][:, None] - g[i, nb][None, :] + g[nb][:, nb]
    k = 0.5 * (k + k.T)
    if fit.method == "least_squares":
        evals, evecs = torch.linalg.eigh(k + fit.damping * torch.eye(m, dtype=torch.float64))
        cutoff = fit.rcond * float(evals.abs().max()) if fit.damping == 0 else 0.0
        keep = evals > max(cutoff, 0.0)
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
        a = (evecs * inv) @ evecs.T
    else:
        a = torch.diag(1.0 / (m * n2[i, nb]))
    return k, a


def _neighbour_list(gram: Tensor, neighbours: Sequence[Tensor]) -> list[Tensor]:
    if len(neighbours) != gram.shape[0]:
        raise ValueError(f"neighbours has {len(neighbours)} entries but the Gram matrix has {gram.shape[0]} checkpoints")
    return [torch.as_tensor(nb, dtype=torch.long).reshape(-1) for nb in neighbours]


def directional_coefficients(
    gram: Tensor,
    losses: Tensor,
    neighbours: Sequence[Tensor],
    fit: FitLike = "least_squares",
) -> list[Tensor]:
    """Coefficients of the directional gradients in the neighbour differences.

    ``g_i(x) = Σ_{j ∈ J_i} C_i[j, x] (θ_j − θ_i)``: this is how to materialise ``g_i`` when
    the snapshots are at hand (small models, tests); the estimators never need it.

    Args:
        gram: ``Tensor[E, E]``; losses: ``Tensor[E, n]``; neighbours: per checkpoint neighbour
            indices; fit: see :class:`DirectionalFit`.

    Returns:
        Per checkpoint ``i``, ``float64 Tensor[|J_i|, n]`` (rows follow ``neighbours[i]``).
    """
    fit = DirectionalFit.of(fit)
    g = gram.to(torch.float64)
    losses = _table("losses", losses, g.shape[0]).to(torch.float64)
    n2 = squared_distances(g)
    out = []
    for i, nb in enumerate(_neighbour_list(g, neighbours)):
        if nb.numel() == 0:
            out.append(torch.zeros(0, losses.shape[1], dtype=torch.float64))
            continue
        _, a = _checkpoint_fit(g, n2, i, nb, fit)
        out.append(a @ (losses[nb] - losses[i]))
    return out


def z0_quadratic_form(gram: Tensor, neighbours: Sequence[Tensor], fit: FitLike = "least_squares") -> Tensor:
    """The ``E × E`` matrix ``Q`` with ``Σ_i g_i(x)·g_i(z) = L(x)ᵀ Q L(z)``.

    With ``c_i = A_i ΔL_i`` and ``ΔL_i = R_i L`` (``R_i`` subtracts row ``i`` from the
    neighbour rows), ``g_i(x)·g_i(z) = ΔL_i(x)ᵀ A_iᵀ K_i A_i ΔL_i(z)``, so
    ``Q = Σ_i R_iᵀ A_iᵀ K_i A_i R_i``: ``A_i = K_i⁺`` (``"least_squares"``, giving ``K_i⁺``) or
    ``diag(1/(|J| N_ij))`` (``"finite_difference"``).

    Args:
        gram: ``Tensor[E, E]`` Gram matrix of the snapshots.
        neighbours: per checkpoint, a ``LongTensor`` of neighbour indices.
        fit: a :class:`DirectionalFit` or its method name (``"least_squares"`` or
            ``"finite_difference"``; see the module docstring).

    Returns:
        ``float64 Tensor[E, E]``, symmetric positive semi-definite.
    """
    fit = DirectionalFit.of(fit)
    g = gram.to(torch.float64)
    e = g.shape[0]
    n2 = squared_distances(g)
    q = torch.zeros(e, e, dtype=torch.float64)
    for i, nb in enumerate(_neighbour_list(g, neighbours)):
        m = nb.numel()
        if m == 0:
            continue
        k, a = _checkpoint_fit(g, n2, i, nb, fit)
        r = torch.zeros(m, e, dtype=torch.float64)
        r[torch.arange(m), nb] = 1.0
        r[:, i] -= 1.0
        ar = a @ r
        q += ar.T @ k @ ar
    return 0.5 * (q + q.T)


def self_influence_variance(losses: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of each example's loss across checkpoints (Z0-Inf's simplest self-influence).

    Args:
        losses: ``Tensor[E, n]`` loss table.
        unbiased: divide by ``E − 1`` instead of ``E``.

    Returns:
        ``float64 Tensor[n]``, ``>= 0``.
    """
    losses = _table("losses", losses).to(torch.float64)
    return losses.var(dim=0, unbiased=unbiased)


def self_influence_mean_loss(losses: Tensor) -> Tensor:
    """Mean loss across checkpoints, ``float64 Tensor[n]`` (``>= 0`` for non-negative losses)."""
    return _table("losses", losses).to(torch.float64).mean(dim=0)


def self_influence_directional(
    gram: Tensor,
    losses: Tensor,
    neighbours: Sequence[Tensor],
    fit: FitLike = "finite_difference",
    centre: bool = False,
    chunk_size: int = 65536,
) -> Tensor:
    """``SI(x) = Σ_i ‖g_i(x)‖²`` from the Gram matrix (default: the finite-difference form).

    Args:
        gram: ``Tensor[E, E]``; losses: ``Tensor[E, n]``; neighbours: see
            :func:`~lightning_influence.z0.neighbours.select_neighbours`; fit: see
            :class:`DirectionalFit`; centre: :func:`centre_losses` first; chunk_size: examples
            per chunk.

    Returns:
        ``float64 Tensor[n]``, ``>= 0`` (up to round-off, clamped).
    """
    losses = _table("losses", losses, gram.shape[0])
    q = z0_quadratic_form(gram, neighbours, fit)
    base = centre_losses(losses) if centre else losses
    out = torch.empty(losses.shape[1], dtype=torch.float64)
    for s in range(0, losses.shape[1], chunk_size):
        l = base[:, s : s + chunk_size].to(torch.float64)
        out[s : s + chunk_size] = ((q @ l) * l).sum(dim=0)
    return out.clamp_min_(0.0)


def _ranks(t: Tensor) -> Tensor:
    """Average ranks (1-based, ties share their mean rank, like ``scipy.stats.rankdata``) along dim 0."""
    t = t.to(torch.float64)
    out = torch.empty_like(t)
    step = max(1, (1 << 24) // max(1, t.shape[0] ** 2))  # bounds the E × E × step comparison tensors
    for s in range(0, t.shape[1], step):
        c = t[:, s : s + step]
        less = (c[None, :, :] < c[:, None, :]).sum(dim=1)
        equal = (c[None, :, :] == c[:, None, :]).sum(dim=1)
        out[:, s : s + step] = less.to(torch.float64) + (equal.to(torch.float64) + 1.0) / 2.0
    return out


def _standardised_ranks(t: Tensor) -> Tensor:
    r = _ranks(t)
    r = r - r.mean(dim=0, keepdim=True)
    norm = r.norm(dim=0, keepdim=True)
    return torch.where(norm > 0, r / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(r))


def spearman_matrix(a: Tensor, b: Tensor, chunk_size: int = 8192) -> Tensor:
    """All-pairs Spearman correlation of loss trajectories.

    torchmetrics' ``spearman_corrcoef`` pairs columns one-to-one; here every column of ``a``
    meets every column of ``b``, so we rank each trajectory once (average ranks for ties) and
    take Pearson correlations of the ranks by one matrix product.

    Args:
        a: ``Tensor[E, n_a]``; b: ``Tensor[E, n_b]`` (same ``E``).

    Returns:
        ``float64 Tensor[n_a, n_b]`` in ``[−1, 1]``; 0 where a trajectory is constant.
    """
    ra = _standardised_ranks(a)
    out = torch.empty(a.shape[1], b.shape[1], dtype=torch.float64)
    for s in range(0, b.shape[1], chunk_size):
        out[:, s : s + chunk_size] = ra.T @ _standardised_ranks(b[:, s : s + chunk_size])
    return out


def train_test_influence(
    gram: Tensor,
    train_losses: Tensor,
    query_losses: Tensor,
    neighbours: Sequence[Tensor],
    fit: FitLike = "least_squares",
    centre: bool = False,
    spearman_weight: bool = False,
    chunk_size: int = 16384,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Pairwise Z0-Inf scores ``I(x, z) = Σ_i g_i(x)·g_i(z)``.

    ``fit="finite_difference", centre=True, spearman_weight=True`` is the form of the authors'
    released code (with correct neighbour selection and one ``1/N_ij`` per secant);
    ``fit="least_squares"`` is ``Σ_i ΔL_i(z)ᵀ K_i⁺ ΔL_i(x)``.

    Args:
        gram: ``Tensor[E, E]`` Gram matrix of the snapshots.
        train_losses: ``Tensor[E, n_train]``; query_losses: ``Tensor[E, n_query]``.
        neighbours: per checkpoint neighbour indices (:func:`select_neighbours`).
        fit: see :class:`DirectionalFit`.
        centre: centre each table per checkpoint (:func:`centre_losses`) before the fit.
        spearman_weight: multiply each score by the Spearman correlation of the two examples'
            raw (uncentred) loss trajectories (:func:`spearman_matrix`).
        chunk_size: training examples per chunk; peak extra memory is about
            ``8 × (n_query + 2E) × chunk_size`` bytes besides the ``n_query × n_train`` result
            (100,000 × 1,000 in float32: 400 MB result + ~140 MB per 16,384-chunk).
        out_dtype: dtype of the result (computed in float64).

    Returns:
        ``Tensor[n_query, n_train]`` of ``out_dtype``; positive = the training example lowers
        the query's loss (helps it).
    """
    e = gram.shape[0]
    train_losses = _table("train_losses", train_losses, e)
    query_losses = _table("query_losses", query_losses, e)
    q = z0_quadratic_form(gram, neighbours, fit)
    lq = centre_losses(query_losses) if centre else query_losses.to(torch.float64)
    left = (q @ lq).T  # [n_query, E]
    ltr = centre_losses(train_losses) if centre else train_losses
    rq = _standardised_ranks(query_losses) if spearman_weight else None
    n_train = train_losses.shape[1]
    out = torch.empty(query_losses.shape[1], n_train, dtype=out_dtype)
    for s in range(0, n_train, chunk_size):
        block = left @ ltr[:, s : s + chunk_size].to(torch.float64)
        if rq is not None:
            block *= rq.T @ _standardised_ranks(train_losses[:, s : s + chunk_size])
        out[:, s : s + chunk_size] = block.to(out_dtype)
    return out
