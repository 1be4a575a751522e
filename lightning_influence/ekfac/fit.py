"""Offline EK-FAC fitting at fixed weights: a covariance pass, eigendecomposition, and an
eigenvalue-correction pass. This is the reference the training callback must match, and
:func:`fit_lambdas` is also the callback's end-of-fit correction pass.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Iterable, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..distributed import Ranks, assign_by_cost
from ..layers import TrackedLayer, select_layers
from ..task import TaskLike, resolve_task
from .. import validation as check
from .covariance import CovarianceAccumulator, LambdaAccumulator, n_real_examples
from ..progress import progress_bar
from .factors import EKFACFactors, KroneckerEigen, LayerFactors
from .layer_data import iter_layer_data

__all__ = [
    "fit_factors",
    "fit_covariances",
    "fit_lambdas",
    "eigen_from_covariances",
    "eigendecomposition_ranks",
    "factors_from_parts",
    "resolve_layers",
    "FISHERS",
]

Fisher = Literal["empirical", "true"]
FISHERS = ("empirical", "true")


def resolve_layers(model: nn.Module, layers: Optional[str | Sequence[str] | Sequence[TrackedLayer]]) -> list[TrackedLayer]:
    """Tracked layers from patterns, from a list of :class:`TrackedLayer`, or all supported ones."""
    if layers is not None and not isinstance(layers, str) and len(layers) and isinstance(layers[0], TrackedLayer):
        return list(layers)
    return select_layers(model, layers)


def _which(fisher: str) -> Literal["loss", "sampled"]:
    return "sampled" if fisher == "true" else "loss"


def fit_covariances(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[TrackedLayer],
    task: TaskLike,
    fisher: Fisher = "empirical",
    max_batches: Optional[int] = None,
    seed: int = 0,
    progress: Optional[bool] = False,
) -> dict[str, CovarianceAccumulator]:
    """Covariance pass: accumulate ``A`` and ``S`` for every layer over ``loader``."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    accs = {l.name: CovarianceAccumulator.for_layer(l) for l in layers}
    batches = iter_layer_data(model, loader, layers, task, _which(fisher), generator=gen, max_batches=max_batches,
                              progress=progress, desc="EK-FAC covariances")
    for _, data in batches:
        for l in layers:
            a, ds, mask = data.pop(l.name)
            accs[l.name].update_activations(a, mask)
            accs[l.name].update_gradients(ds, mask, n_examples=n_real_examples(a, mask))
            del a, ds, mask
    return accs


def fit_lambdas(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[TrackedLayer],
    eigen: Mapping[str, KroneckerEigen],
    task: TaskLike,
    fisher: Fisher = "empirical",
    max_batches: Optional[int] = None,
    seed: int = 0,
    progress: Optional[bool] = False,
    max_examples: Optional[int] = None,
    forward_context: Optional[Callable[[], ContextManager]] = None,
    tol: Optional[float] = None,
    min_examples: int = 0,
) -> dict[str, LambdaAccumulator]:
    """Eigenvalue-correction pass: ``Λ = mean_z (Q_Sᵀ DW_z Q_A)²`` over per-example gradients.

    Args:
        model: the model (put in eval mode during the pass).
        loader: batches of examples.
        layers: the tracked layers (those of ``eigen``).
        eigen: layer name → :class:`KroneckerEigen` (the basis the correction is taken in).
        task: how to read batches.
        fisher: ``"empirical"`` (true labels) or ``"true"`` (labels sampled from the model).
        max_batches: cap on the pass, in batches.
        seed: seed for sampled labels.
        progress: show a progress bar.
        max_examples: cap on the pass, in examples (see :func:`~.layer_data.iter_layer_data`).
        forward_context: context-manager factory around each forward (e.g. autocast).
        tol: adaptive sample: stop after the first batch at which at least ``min_examples``
            examples were seen and every layer's
            :meth:`~.covariance.LambdaAccumulator.relative_error` is at most ``tol``
            (``None``: run to the caps).
        min_examples: see ``tol``.

    Returns:
        Layer name → :class:`LambdaAccumulator` (its ``examples`` says how many were used).
    """
    check.finite_float("fit_lambdas", "tol", tol, minimum=0.0, strict_minimum=True, allow_none=True)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    accs = {l.name: LambdaAccumulator(eigen[l.name].q_a.to(device), eigen[l.name].q_s.to(device), spread=tol is not None)
            for l in layers}
    batches = iter_layer_data(model, loader, layers, task, _which(fisher), generator=gen, max_batches=max_batches,
                              max_examples=max_examples, forward_context=forward_context, progress=progress,
                              desc="EK-FAC eigenvalue correction")
    for _, data in batches:
        for l in layers:  # each layer's data is released once used: none is held during the next batch's pass
            a, ds, mask = data.pop(l.name)
            accs[l.name].update(a, ds, n_examples=n_real_examples(a, mask))
            del a, ds, mask
        if tol is not None and _precise_enough(accs, tol, min_examples):
            break
    return accs


def _precise_enough(accs: Mapping[str, LambdaAccumulator], tol: float, min_examples: int) -> bool:
    seen = min(acc.examples + acc.nonfinite for acc in accs.values())
    return seen >= min_examples and all(acc.relative_error() <= tol for acc in accs.values())


def eigendecomposition_ranks(covs: Mapping[str, CovarianceAccumulator], world: int) -> dict[str, int]:
    """Layer name → the rank that eigendecomposes it when ``world`` ranks share the work: balanced
    by the decompositions' cost ``a³ + o³`` (:func:`~lightning_influence.distributed.assign_by_cost`)."""
    return assign_by_cost({n: float(acc.a_dim) ** 3 + float(acc.d_out) ** 3 for n, acc in covs.items()}, world)


def eigen_from_covariances(covs: Mapping[str, CovarianceAccumulator], dtype: Optional[torch.dtype] = torch.float64,
                           release: bool = False, progress: Optional[bool] = False,
                           ranks: Optional[Ranks] = None) -> dict[str, KroneckerEigen]:
    """Layer name → :class:`KroneckerEigen` of the token-averaged covariances, one layer at a time.

    Args:
        covs: layer name → accumulated covariances (with ``ranks``: the sums over ranks, the
            same on every rank).
        dtype: the precision of the eigendecomposition (see
            :func:`~.factors.eigendecompose`); ``None``: the dtype the sums were accumulated in
            (float32 for float32/bf16/fp16 training, float64 for float64).
        release: hold each layer's sums as their eigendecompositions once these exist
            (:meth:`~.covariance.CovarianceAccumulator.release_`), so that peak memory is the
            eigenvectors plus one layer's workspace rather than the covariances *and* the
            eigenvectors of every layer.
        progress: a progress bar over layers (``None``: only on a terminal).
        ranks: the ranks of a distributed run (:class:`~lightning_influence.distributed.Ranks`;
            every rank calls): each layer is decomposed by one rank only
            (:func:`eigendecomposition_ranks`), then every layer's decomposition is broadcast from its rank. The work per rank is
            about ``1/world`` of the whole, and every rank ends with the same tensors (those of
            the rank that computed them). ``None`` or one rank: every layer here.

    Returns:
        The decompositions in the order of ``covs``; with ``ranks``, identical on every rank.
    """
    names = list(covs)
    sharded = ranks is not None and ranks.world > 1
    owners = eigendecomposition_ranks(covs, ranks.world) if sharded else {}
    out: dict[str, KroneckerEigen] = {}

    def decompose(mine: list[str]) -> None:
        for n in progress_bar(mine, "EK-FAC eigendecomposition", progress):
            acc = covs[n]
            d = dtype or acc.dtype
            e = out[n] = KroneckerEigen.from_covariances(*acc.covariances(d), dtype=d)
            if release:
                acc.release_((e.eig_a, e.q_a), (e.eig_s, e.q_s))

    if not sharded:
        decompose(names)
        return out
    # a failure on one rank (e.g. eigh not converging) raises on every rank, so none waits in a broadcast
    ranks.all(lambda: decompose([n for n in names if owners[n] == ranks.rank]))
    for n in names:  # every rank, in the same order: each layer's decomposition from its rank
        acc, src = covs[n], owners[n]
        if src == ranks.rank:
            e = out[n]
            parts = [t.to(ranks.device) for t in (e.q_a, e.eig_a, e.q_s, e.eig_s)]
        else:
            d = dtype or acc.dtype
            a, o = acc.a_dim, acc.d_out
            parts = [torch.empty(a, a, dtype=d, device=ranks.device), torch.empty(a, dtype=torch.float64, device=ranks.device),
                     torch.empty(o, o, dtype=d, device=ranks.device), torch.empty(o, dtype=torch.float64, device=ranks.device)]
        e = KroneckerEigen(*(ranks.broadcast_tensor(t, src) for t in parts))
        if src != ranks.rank:
            out[n] = e
            if release:
                acc.release_((e.eig_a, e.q_a), (e.eig_s, e.q_s))
    return {n: out[n] for n in names}


def factors_from_parts(
    layers: Sequence[TrackedLayer],
    eigen: Mapping[str, KroneckerEigen],
    lambdas: Mapping[str, Tensor],
    fisher: str,
    n_examples: int | float,
    n_lambda_examples: int | float,
    meta: Optional[dict] = None,
) -> EKFACFactors:
    """Assemble :class:`EKFACFactors` (on CPU) from eigenbases and corrected eigenvalues
    (``lambdas``: layer name → ``Tensor[d_out, a_dim]``, stored in the eigenvectors' dtype)."""
    out = {}
    for l in layers:
        e = eigen[l.name]
        out[l.name] = LayerFactors(e.q_a.cpu(), e.eig_a.cpu(), e.q_s.cpu(), e.eig_s.cpu(), lambdas[l.name].to(e.q_a.dtype).cpu(),
                                   l.d_in, l.d_out, l.has_bias, l.type_name)
    return EKFACFactors(out, fisher=fisher, n_examples=int(n_examples), n_lambda_examples=int(n_lambda_examples), meta=dict(meta or {}))


def fit_factors(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Optional[str | Sequence[str] | Sequence[TrackedLayer]] = None,
    task: Optional[TaskLike] = None,
    fisher: Fisher = "empirical",
    max_batches: Optional[int] = None,
    lambda_loader: Optional[Iterable[Any]] = None,
    lambda_max_batches: Optional[int] = None,
    seed: int = 0,
    progress: Optional[bool] = None,
) -> EKFACFactors:
    """Fit EK-FAC factors at the model's current weights (model in eval mode during the fit).

    Args:
        model: the model (LightningModule or ``nn.Module``).
        loader: batches for the covariance pass (and the correction pass unless
            ``lambda_loader`` is given).
        layers: glob pattern(s), a list of :class:`TrackedLayer`, or ``None`` for all supported.
        task: how to read batches; default from the module's methods / batch layout.
        fisher: ``"empirical"`` (true labels) or ``"true"`` (labels sampled from the model).
        max_batches: cap on the covariance pass (and the correction pass when it reuses ``loader``).
        lambda_loader: batches for the correction pass (default: ``loader``).
        lambda_max_batches: cap on the correction pass.
        seed: seed for sampled labels.
        progress: progress bars (``None``: only on a terminal).

    Returns:
        :class:`EKFACFactors` with float64 eigenbases and corrected eigenvalues.
    """
    check.choice("fit_factors", "fisher", fisher, FISHERS)
    task = resolve_task(model, task, needs=("sampled_loss",) if fisher == "true" else ())
    tracked = resolve_layers(model, layers)
    covs = fit_covariances(model, loader, tracked, task, fisher, max_batches, seed, progress)
    eigen = eigen_from_covariances(covs)
    lambda_cap = lambda_max_batches if lambda_loader else (lambda_max_batches or max_batches)
    lambdas = fit_lambdas(model, lambda_loader or loader, tracked, eigen, task, fisher, lambda_cap, seed, progress)
    n_examples = next(iter(covs.values())).examples
    n_lambda = next(iter(lambdas.values())).examples
    return factors_from_parts(tracked, eigen, {n: acc.mean() for n, acc in lambdas.items()}, fisher, n_examples, n_lambda,
                              meta={"source": "fit_factors"})
