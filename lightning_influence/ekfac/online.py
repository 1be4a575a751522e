"""EK-FAC factors accumulated on the fly from training passes (the state machine behind
:class:`~lightning_influence.EKFACInfluence`, with no Lightning import).

A trainer (or any loop) drives an :class:`OnlineFactors` object:

1. ``begin_epoch(epoch, max_epochs)`` at the start of each epoch;
2. ``begin_batch(batch, task, epoch, max_epochs, grad_factor, drop)`` before each training
   batch: it decides whether the batch contributes (every ``update_every_n_steps``-th training
   batch counted over the whole run, in contributing epochs) and returns the mask to apply
   (``drop`` leaves examples out, e.g. a distributed sampler's padding);
3. ``observe(layer, a, ds, mask)`` from the layer hooks during the training backward (or
   ``observe_sampled`` for the true Fisher, which runs its own forward and backward): the
   batch's sums go to a per-batch scratch;
4. ``end_batch()`` after the backward: when every layer's batch sums are finite they are added
   to the epoch's; otherwise the whole batch (all layers) is left out and counted in
   :attr:`~OnlineFactors.nonfinite_batches`; non-finite values never enter the factors;
5. ``end_epoch(epoch, max_epochs, reduce)`` at the end of each epoch: the epoch's sums are
   reduced over ranks and folded into the running factors (sum, last ``k`` epochs, or an
   exponential moving average);
6. ``factors(correction_pass, reduce)`` at the end: eigendecomposition and eigenvalue
   correction (``"pass"``: a pass at the final weights that the caller runs with
   :func:`~.fit.fit_lambdas`; ``"online"``: gathered during the last epoch in the eigenbasis of
   the earlier ones; ``"none"``: K-FAC eigenvalues). Layers that accumulated nothing (e.g.
   frozen ones) are left out with a warning; only when every layer is empty does it raise.

Trajectory segments (``track_segment=True``): beside the running factors, every contributing
epoch's sums are also added to :attr:`~OnlineFactors.segment`, plain sums over the epochs since
the last :meth:`~OnlineFactors.segment_factors` call, which turns them into factors (with a
correction pass at the current weights) and starts the next segment.

``state_dict`` / ``load_state_dict`` hold everything as tensors and plain values, so a resumed
run continues without loss or double counting.
"""

from __future__ import annotations

import time
from dataclasses import InitVar, asdict, dataclass
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import validation as check
from ..distributed import Ranks
from ..layers import TrackedLayer
from ..task import TaskLike, example_count
from .capture import LayerCapture
from .covariance import CovarianceAccumulator, LambdaAccumulator, Reduce, accumulation_dtype, n_real_examples
from .factors import EKFACFactors, KroneckerEigen
from .fit import eigen_from_covariances, eigendecomposition_ranks, factors_from_parts, fit_lambdas
from .layer_data import layer_batch_data

__all__ = ["AccumulationOptions", "OnlineFactors", "CORRECTIONS"]

CORRECTIONS = ("pass", "online", "none")
EIGH_DTYPES = ("auto", "float32", "float64")
CorrectionPass = Callable[[Mapping[str, KroneckerEigen]], Mapping[str, LambdaAccumulator]]


@dataclass(frozen=True)
class AccumulationOptions:
    """How factors are accumulated during training: frozen, plain values (YAML- and
    LightningCLI-friendly), validated on construction, saved in the factors' manifest (``options``).
    ``EKFACInfluence`` takes these as keyword arguments (``update_every_n_steps="auto"`` is
    resolved by the callback at ``fit`` start: ``dataclasses.replace`` gives the options used).

    Attributes:
        fisher: ``"empirical"`` (the training backward as is) or ``"true"`` (an extra forward and
            backward per update with labels sampled from the model).
        update_every_n_steps: accumulate on every n-th training batch, counted over the
            contributing epochs of the run (the first batch of the first contributing epoch always
            contributes, so a short run is never left without updates).
        max_examples_per_update: use at most this many examples of a batch.
        epochs: ``"all"`` or ``k``: only the last ``k`` epochs contribute (needs ``max_epochs``).
        ema_decay: running sums are multiplied by this before each new epoch is added.
        correction: ``"pass"``, ``"online"`` or ``"none"`` (see the module docstring).
        correction_max_batches: cap on the correction pass, in batches.
        correction_max_examples: cap on the correction pass, in examples per rank.
        seed: seed for sampled labels.
        correction_tol: adaptive correction sample: the pass stops once every layer's
            estimated relative standard error of ``Λ + λ`` is at most this (see
            :meth:`~.covariance.LambdaAccumulator.relative_error`), after at least
            ``correction_min_examples`` examples; ``None``: run to the caps.
        correction_min_examples: the fewest examples (per rank) the adaptive correction uses.
        eigh_dtype: precision of the eigendecompositions: ``"auto"`` (the accumulation dtype:
            float32 for float32/bf16/fp16 training, float64 for float64), ``"float32"`` or
            ``"float64"``.
    """

    fisher: Literal["empirical", "true"] = "empirical"
    update_every_n_steps: int = 16
    max_examples_per_update: Optional[int] = None
    epochs: Literal["all"] | int = "all"
    ema_decay: Optional[float] = None
    correction: Literal["pass", "online", "none"] = "pass"
    correction_max_batches: Optional[int] = None
    correction_max_examples: Optional[int] = 4096
    seed: int = 0
    correction_tol: Optional[float] = 0.2
    correction_min_examples: int = 64
    eigh_dtype: Literal["auto", "float32", "float64"] = "auto"
    owner: InitVar[str] = "AccumulationOptions"
    """Who is given the values, for messages (not a field: not saved)."""

    def __post_init__(self, owner: str) -> None:
        check.choice(owner, "fisher", self.fisher, ("empirical", "true"))
        check.positive_int(owner, "update_every_n_steps", self.update_every_n_steps)
        check.positive_int(owner, "max_examples_per_update", self.max_examples_per_update, allow_none=True)
        if self.epochs != "all":
            check.positive_int(owner, "epochs", self.epochs)
        check.finite_float(owner, "ema_decay", self.ema_decay, minimum=0.0, maximum=1.0, strict_minimum=True,
                           strict_maximum=True, allow_none=True)
        check.choice(owner, "correction", self.correction, CORRECTIONS)
        check.positive_int(owner, "correction_max_batches", self.correction_max_batches, allow_none=True)
        check.positive_int(owner, "correction_max_examples", self.correction_max_examples, allow_none=True)
        check.integer(owner, "seed", self.seed)
        check.finite_float(owner, "correction_tol", self.correction_tol, minimum=0.0, strict_minimum=True, allow_none=True)
        check.positive_int(owner, "correction_min_examples", self.correction_min_examples)
        check.choice(owner, "eigh_dtype", self.eigh_dtype, EIGH_DTYPES)
        if self.correction == "online" and self.epochs == 1:
            raise check.InvalidArgumentError(
                f"{owner}(correction='online') needs an eigenbasis from epochs before the last, but epochs=1 "
                "accumulates only the last epoch; use correction='pass' or epochs >= 2"
            )

    @property
    def task_needs(self) -> tuple[str, ...]:
        """Task methods beyond every task's that these options use (``resolve_task(needs=...)``)."""
        return ("sampled_loss",) if self.fisher == "true" else ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def eigh_torch_dtype(self) -> Optional[torch.dtype]:
        """``eigh_dtype`` as a torch dtype (``None`` for ``"auto"``: the accumulation dtype)."""
        return None if self.eigh_dtype == "auto" else getattr(torch, self.eigh_dtype)

    def correction_pass(self, model: nn.Module, loader: Any, layers: Sequence[TrackedLayer], task: TaskLike,
                        seed_offset: int = 999, forward_context: Optional[Callable[[], Any]] = None) -> "CorrectionPass":
        """The correction pass these options describe, as :meth:`OnlineFactors.factors` calls
        it: :func:`~.fit.fit_lambdas` over ``loader`` with the caps, the adaptive tolerance and
        the seed ``seed + seed_offset``, on the layers of the eigenbases it is given."""

        def run(eigen: Mapping[str, KroneckerEigen]) -> Mapping[str, LambdaAccumulator]:
            return fit_lambdas(model, loader, [l for l in layers if l.name in eigen], eigen, task, self.fisher,
                               self.correction_max_batches, seed=self.seed + seed_offset,
                               max_examples=self.correction_max_examples, forward_context=forward_context,
                               tol=self.correction_tol, min_examples=self.correction_min_examples, progress=None)

        return run


class OnlineFactors:
    """Running EK-FAC covariances of ``layers`` fed from training passes.

    Args:
        layers: the tracked layers.
        options: :class:`AccumulationOptions`.
        track_segment: also keep :attr:`segment`, the sums of the current trajectory segment.
        owner: who accumulates, for messages (e.g. the callback's class name).
        ranks: see :attr:`ranks`.

    Attributes:
        running: layer name → :class:`CovarianceAccumulator` of the folded epochs.
        segment: layer name → plain sums of the contributing epochs folded since the last
            :meth:`segment_factors` (``None`` without ``track_segment``).
        segment_epochs: epochs folded into :attr:`segment`.
        epoch_accs: layer name → the current epoch's (this rank's) sums.
        epochs_accumulated: epochs folded into ``running``.
        batches_seen: training batches of contributing epochs offered to :meth:`begin_batch`
            (update gating).
        nonfinite_batches: batches left out for non-finite sums, over all ranks, up to the last
            :meth:`end_epoch`.
        nonfinite_pending: this rank's batches left out since the last :meth:`end_epoch`.
        nonfinite_correction: examples left out of the last :meth:`factors`' correction.
        seconds: wall time spent in eigendecompositions (``"eigh"``, including the online
            correction's at the start of the last epoch) and in correction passes
            (``"correction"``), summed over calls.
        correction_used: the correction that produced the last :meth:`factors` (``None`` before).
        layers_used: the layers the last :meth:`factors` holds (``None`` before).
        ranks: the ranks of a distributed run (:class:`~lightning_influence.distributed.Ranks`;
            ``None``: one process). With several, each eigendecomposition is
            done by one rank and broadcast (:func:`~.fit.eigen_from_covariances`), so the ranks
            share the end-of-fit decompositions instead of each repeating all of them; the
            factors' ``meta["eigendecomposition_ranks"]`` says which rank did which layer.
    """

    def __init__(self, layers: Sequence[TrackedLayer], options: AccumulationOptions, track_segment: bool = False,
                 owner: str = "OnlineFactors", ranks: Optional[Ranks] = None) -> None:
        self.owner = owner
        self.layers = list(layers)
        self.options = options
        self.running = {l.name: CovarianceAccumulator.for_layer(l) for l in self.layers}
        self.segment: Optional[dict[str, CovarianceAccumulator]] = None
        self.segment_epochs = 0
        if track_segment:
            self.reset_segment()
        self.epoch_accs: dict[str, CovarianceAccumulator] = {}
        self._batch_bad = False
        self.batch_lambdas: dict[str, LambdaAccumulator] = {}
        self.online_eigen: Optional[dict[str, KroneckerEigen]] = None
        self.online_lambdas: Optional[dict[str, LambdaAccumulator]] = None
        self.epochs_accumulated = 0
        self.batches_seen = 0
        self.nonfinite_batches = 0
        self.nonfinite_pending = 0
        self.nonfinite_correction = 0
        self.correction_used: Optional[str] = None
        self.layers_used: Optional[list[str]] = None
        self.seconds: dict[str, float] = {"eigh": 0.0, "correction": 0.0}
        self.grad_factor = 1.0
        self.acc_dtype = torch.float32
        self.ranks = ranks
        self._batch_open = False
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self.epoch_accs = {l.name: CovarianceAccumulator.for_layer(l) for l in self.layers}

    def reset_segment(self) -> None:
        """Start a new trajectory segment: :attr:`segment` holds nothing."""
        self.segment = {l.name: CovarianceAccumulator.for_layer(l) for l in self.layers}
        self.segment_epochs = 0

    # -- gating ------------------------------------------------------------------------------
    def epoch_contributes(self, epoch: int, max_epochs: Optional[int]) -> bool:
        """Whether 0-based ``epoch`` is among the epochs that contribute (see ``epochs``)."""
        k = self.options.epochs
        if k == "all" or max_epochs is None or max_epochs < 0:
            return True
        return epoch >= max_epochs - k

    @staticmethod
    def is_last_epoch(epoch: int, max_epochs: Optional[int]) -> bool:
        return max_epochs is not None and max_epochs > 0 and epoch == max_epochs - 1

    @property
    def examples(self) -> int | float:
        """Examples behind the running covariances (the first layer's count)."""
        return next(iter(self.running.values())).examples

    # -- training-time hooks -----------------------------------------------------------------
    def begin_epoch(self, epoch: int, max_epochs: Optional[int], device: torch.device | str = "cpu") -> None:
        """Start an epoch; with ``correction="online"``, the last epoch gathers the correction in
        the eigenbasis of the epochs before it."""
        self._reset_epoch()
        self.online_lambdas = None
        used = [n for n in self.running if n not in self.empty_layers()]
        if self.options.correction == "online" and self.is_last_epoch(epoch, max_epochs) and used:
            t0 = time.perf_counter()
            self.online_eigen = eigen_from_covariances({n: self.running[n] for n in used}, self.options.eigh_torch_dtype,
                                                       ranks=self.ranks)
            self.seconds["eigh"] += time.perf_counter() - t0
            self.online_lambdas = {n: LambdaAccumulator(e.q_a.to(device), e.q_s.to(device)) for n, e in self.online_eigen.items()}

    def begin_batch(self, batch: Any, task: TaskLike, epoch: int, max_epochs: Optional[int], grad_factor: float = 1.0,
                    drop: Sequence[int] = ()) -> tuple[bool, Optional[Tensor]]:
        """Decide whether this training batch contributes; returns ``(active, mask)``.

        ``grad_factor`` turns the output gradients the training backward produces into those of
        the summed per-example loss (it undoes batch-mean reductions, gradient accumulation and
        loss scaling). ``drop`` lists positions in the batch of examples to leave out (e.g. the
        duplicates a distributed sampler pads with). ``mask`` (``BoolTensor[B, T]`` or ``None``)
        marks the tokens to use: the task's padding mask, with dropped examples and examples
        beyond ``max_examples_per_update`` masked out.
        """
        self.end_batch()  # a batch left open (no end_batch call) is settled first
        if not self.epoch_contributes(epoch, max_epochs):
            return False, None
        counted = self.batches_seen
        self.batches_seen += 1
        if counted % self.options.update_every_n_steps:
            return False, None
        self.grad_factor = float(grad_factor)
        mask = task.padding_mask(batch)
        cap = self.options.max_examples_per_update
        n = example_count(task, batch)
        if n == 0:
            return False, None
        if (cap is not None and n > cap) or drop:
            if mask is None:
                from ..batches import first_tensor

                mask = torch.ones(n, 1, dtype=torch.bool, device=first_tensor(batch).device)
            mask = mask.clone()
            if drop:
                mask[torch.as_tensor(list(drop), dtype=torch.long, device=mask.device)] = False
            if cap is not None:
                kept = torch.nonzero(mask.any(dim=1)).reshape(-1)
                mask[kept[cap:]] = False
        self._batch_open = True
        return True, mask

    def observe(self, layer: TrackedLayer, a: Tensor, ds: Tensor, mask: Optional[Tensor]) -> None:
        """Add one layer's inputs ``a[B, T, a_dim]`` and output gradients ``ds[B, T, d_out]``
        (padding rows zeroed; ``ds`` as the training backward produced it, scaled here by the
        batch's ``grad_factor``) to the epoch's sums, in place, when they keep the sums finite
        (:meth:`~.covariance.CovarianceAccumulator.add_batch_if_finite`); otherwise this layer
        leaves the batch out and the batch is counted as non-finite by :meth:`end_batch`.

        No per-batch copy of a factor is made: the layers' sums are the only factor-sized
        tensors held during training.
        """
        acc = self.epoch_accs[layer.name]
        if not acc.add_batch_if_finite(a, ds, mask, n_examples=n_real_examples(a, mask), scale=self.grad_factor):
            self._batch_bad = True
        if self.online_lambdas is not None and layer.name in self.online_lambdas:
            lam = self.batch_lambdas.get(layer.name)
            if lam is None:
                base = self.online_lambdas[layer.name]
                lam = self.batch_lambdas[layer.name] = LambdaAccumulator(base.q_a, base.q_s)
            lam.update(a, ds, scale=self.grad_factor, n_examples=n_real_examples(a, mask))

    def end_batch(self) -> Optional[bool]:
        """Settle the open batch: ``True`` when every layer added it, ``False`` when a layer
        left it out for non-finite sums (the batch is counted in :attr:`nonfinite_pending`; the
        layers whose sums were finite keep it); ``None`` when no batch was open. The online
        correction's batch sums are added only when all of them are finite."""
        if not self._batch_open:
            return None
        self._batch_open = False
        lambdas_ok = all(lam.is_finite() and not lam.nonfinite for lam in self.batch_lambdas.values())
        if lambdas_ok and self.online_lambdas is not None:
            for name, lam in self.batch_lambdas.items():
                self.online_lambdas[name].merge_(lam)
        ok = lambdas_ok and not self._batch_bad
        if not ok:
            self.nonfinite_pending += 1
        self._batch_bad = False
        self.batch_lambdas = {}
        return ok

    def observe_sampled(self, model: nn.Module, batch: Any, capture: LayerCapture, task: TaskLike,
                        mask: Optional[Tensor], generator: Optional[torch.Generator] = None) -> None:
        """True Fisher: one extra forward and backward of the loss for labels sampled from the
        model (gradients w.r.t. layer outputs only), added with ``grad_factor = 1``."""
        capture.enabled = True
        try:
            data, _ = layer_batch_data(model, batch, capture, task, "sampled", generator)
        finally:
            capture.enabled = False
        factor, self.grad_factor = self.grad_factor, 1.0
        try:
            for l in self.layers:
                if l.name not in data:
                    continue
                a, ds, m = data[l.name]
                if mask is not None and mask.shape == a.shape[:2]:
                    keep = mask[..., None]
                    a, ds, m = a * keep.to(a.dtype), ds * keep.to(ds.dtype), mask
                self.observe(l, a, ds.to(accumulation_dtype(ds.dtype)), m)
        finally:
            self.grad_factor = factor

    def end_epoch(self, epoch: int, max_epochs: Optional[int], reduce: Reduce, device: torch.device | str = "cpu") -> None:
        """Reduce this epoch's sums over ranks (every rank calls) and fold them into the running
        factors when the epoch contributes."""
        self.end_batch()
        for l in self.layers:
            self.epoch_accs[l.name].all_reduce_(reduce, self.acc_dtype, device)
        skipped = reduce(torch.tensor([float(self.nonfinite_pending)], dtype=torch.float64, device=device))
        self.nonfinite_batches += int(skipped.item())
        self.nonfinite_pending = 0
        if self.epoch_contributes(epoch, max_epochs):
            for name, acc in self.epoch_accs.items():
                run = self.running[name]
                if self.options.ema_decay is not None and self.epochs_accumulated > 0:
                    run.scale_(self.options.ema_decay)
                # without segments the running sums adopt the epoch's tensors at the first fold
                # (no copy: the next epoch starts new ones)
                run.merge_(acc, take=self.segment is None)
                if self.segment is not None:
                    self.segment[name].merge_(acc)
            self.epochs_accumulated += 1
            if self.segment is not None:
                self.segment_epochs += 1
        self._reset_epoch()

    # -- results -----------------------------------------------------------------------------
    def empty_layers(self, covariances: Optional[Mapping[str, CovarianceAccumulator]] = None) -> list[str]:
        """Layers whose covariances (default: the running ones) hold nothing yet."""
        covs = self.running if covariances is None else covariances
        return [n for n, acc in covs.items() if acc.examples <= 0 or acc.a_sum is None or acc.s_sum is None]

    def factors(self, correction_pass: Optional[CorrectionPass], reduce: Reduce, device: torch.device | str = "cpu",
                warn: Optional[Callable[[str], None]] = None, release: bool = False) -> EKFACFactors:
        """Eigendecompose the running covariances and correct the eigenvalues.

        Args:
            correction_pass: with ``correction="pass"`` (or ``"online"`` without an earlier
                eigenbasis), called with the eigenbases of the layers that accumulated
                something; returns this rank's :class:`LambdaAccumulator` per layer (they are
                reduced here).
            reduce: sum over ranks.
            device: where reductions run.
            warn: called with a message when ``"online"`` falls back to a pass, and when layers
                that accumulated nothing are left out.
            release: hold each layer's running sums as their eigendecomposition as soon as it
                exists (the end of the run: peak memory is then the eigenvectors plus one layer's
                workspace, not the sums and the eigenvectors together); reading a sum (or the
                state) afterwards rebuilds it (see
                :meth:`~.covariance.CovarianceAccumulator.release_`).

        Raises:
            RuntimeError: no layer accumulated anything.
        """
        return self._factors_of(self.running, self.options.correction, correction_pass, reduce, device, warn, release)

    def segment_factors(self, correction_pass: Optional[CorrectionPass], reduce: Reduce, device: torch.device | str = "cpu",
                        warn: Optional[Callable[[str], None]] = None) -> EKFACFactors:
        """Factors of the current trajectory segment (the epochs folded since the last call),
        then start the next segment.

        The eigenvalue correction is a pass at the current weights (``correction_pass``) unless
        ``correction="none"`` (K-FAC eigenvalues): ``"online"`` gathers its correction during
        the run's last epoch only, which is no segment's. Arguments as for :meth:`factors`.

        Raises:
            RuntimeError: segments are not tracked (``track_segment=False``), or no layer
                accumulated anything in this segment.
        """
        if self.segment is None:
            raise RuntimeError("OnlineFactors(track_segment=False) keeps no segment sums")
        correction = "none" if self.options.correction == "none" else "pass"
        factors = self._factors_of(self.segment, correction, correction_pass, reduce, device, warn)
        factors.meta["segment_epochs"] = self.segment_epochs
        self.reset_segment()
        return factors

    def _factors_of(self, covariances: Mapping[str, CovarianceAccumulator], correction: str,
                    correction_pass: Optional[CorrectionPass], reduce: Reduce, device: torch.device | str,
                    warn: Optional[Callable[[str], None]], release: bool = False) -> EKFACFactors:
        empty = self.empty_layers(covariances)
        used = [l for l in self.layers if l.name not in empty]
        why = (f"no training step contributed to them (epochs={self.options.epochs!r}, update_every_n_steps="
               f"{self.options.update_every_n_steps}, {self.nonfinite_batches} batches left out for non-finite values); "
               "are the layers used in training_step, and do they have trainable parameters?")
        if not used:
            raise RuntimeError(f"{self.owner} accumulated nothing for any of the layers {empty}: {why}")
        if empty and warn is not None:
            warn(f"{self.owner} accumulated nothing for layers {empty}; the factors hold the other "
                 f"{len(used)} layers. {why}")
        names = [l.name for l in used]
        if (correction == "online" and self.online_lambdas is not None and self.online_eigen is not None
                and sorted(self.online_eigen) == sorted(names)):
            eigen, accs = self.online_eigen, self.online_lambdas
        else:
            if correction == "online" and warn is not None:
                warn(f"{self.owner}(correction='online') had no eigenbasis from an earlier epoch (the last epoch was "
                     "the first to contribute, or training stopped before max_epochs); running a correction pass instead")
                correction = "pass"
            t0 = time.perf_counter()
            eigen = eigen_from_covariances({n: covariances[n] for n in names}, self.options.eigh_torch_dtype,
                                           release=release, progress=None, ranks=self.ranks)
            self.seconds["eigh"] += time.perf_counter() - t0
            accs = None
            if correction == "pass":
                if correction_pass is None:
                    raise RuntimeError(f"{self.owner}(correction='pass') needs a correction pass at the end of fit")
                t0 = time.perf_counter()
                accs = correction_pass(eigen)
                self.seconds["correction"] += time.perf_counter() - t0
        self.nonfinite_correction = 0
        if accs is None:
            lambdas, n_lambda = {n: e.kfac_lambdas() for n, e in eigen.items()}, 0
        else:
            for acc in accs.values():
                acc.all_reduce_(reduce, self.acc_dtype, device)
            n_lambda = next(iter(accs.values())).examples
            self.nonfinite_correction = max(int(acc.nonfinite) for acc in accs.values())
            # one layer at a time: each accumulator is released as its mean (float64) is narrowed
            # to the factors' dtype, so no float64 copy of every layer's Λ is held at once
            accs = dict(accs)
            lambdas = {n: accs.pop(n).mean().to(eigen[n].q_a.dtype) for n in list(accs)}
        self.correction_used = correction
        self.layers_used = names
        meta = {}
        if self.ranks is not None and self.ranks.world > 1:
            meta["eigendecomposition_ranks"] = eigendecomposition_ranks({n: covariances[n] for n in names}, self.ranks.world)
        return factors_from_parts(used, eigen, lambdas, self.options.fisher, covariances[names[0]].examples, n_lambda, meta=meta)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self, reduce: Optional[Reduce] = None, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Everything as tensors and plain values. With ``reduce`` (every rank calls), the current
        epoch's per-rank sums and non-finite count are summed over ranks (``epoch_reduced``), for
        a checkpoint that keeps one rank's state: load it with ``primary=True`` on one rank only."""
        state = {
            "layers": [{"name": l.name, "type": l.type_name, "d_in": l.d_in, "d_out": l.d_out, "has_bias": l.has_bias}
                       for l in self.layers],
            "running": {n: a.state_dict() for n, a in self.running.items()},
            "epoch": {n: a.state_dict() for n, a in self.epoch_accs.items()},
            "online_lambdas": None if self.online_lambdas is None else {n: a.state_dict() for n, a in self.online_lambdas.items()},
            "online_eigen": None if self.online_eigen is None else {n: vars(e) for n, e in self.online_eigen.items()},
            "epochs_accumulated": self.epochs_accumulated,
            "segment": None if self.segment is None else {n: a.state_dict() for n, a in self.segment.items()},
            "segment_epochs": self.segment_epochs,
            "batches_seen": self.batches_seen,
            "nonfinite_batches": self.nonfinite_batches,
            "nonfinite_pending": self.nonfinite_pending,
            "options": self.options.as_dict(),
        }
        if reduce is not None:
            epoch = {}
            for name, acc in self.epoch_accs.items():
                copy = type(acc)(acc.a_dim, acc.d_out).merge_(acc)
                epoch[name] = copy.all_reduce_(reduce, self.acc_dtype, device).state_dict()
            pending = reduce(torch.tensor([float(self.nonfinite_pending)], dtype=torch.float64, device=device))
            state.update(epoch=epoch, nonfinite_pending=int(pending.item()), epoch_reduced=True)
        return state

    def load_state_dict(self, state: Mapping[str, Any], primary: bool = True) -> None:
        """Restore :meth:`state_dict`; with ``epoch_reduced`` the epoch's sums over ranks go to the
        ``primary`` rank only (the others start the epoch empty)."""
        if state.get("epoch_reduced") and not primary:
            state = {**state, "epoch": {}, "nonfinite_pending": 0}
        names = {l.name for l in self.layers}
        saved = set(state["running"])
        if saved != names:
            raise RuntimeError(
                f"{self.owner} checkpoint tracks layers {sorted(saved)} but this run tracks {sorted(names)}; "
                "use the same `layers`/`exclude` as the run that wrote the checkpoint"
            )
        for n, s in state["running"].items():
            self.running[n].load_state_dict(s)
        for n, s in state["epoch"].items():
            self.epoch_accs[n].load_state_dict(s)
        self.online_lambdas = None
        if state.get("online_lambdas") is not None:
            self.online_lambdas = {}
            for n, s in state["online_lambdas"].items():
                acc = LambdaAccumulator(s["q_a"], s["q_s"])
                acc.load_state_dict(s)
                self.online_lambdas[n] = acc
        eigen = state.get("online_eigen")
        self.online_eigen = None if eigen is None else {n: KroneckerEigen(**e) for n, e in eigen.items()}
        self.epochs_accumulated = state["epochs_accumulated"]
        if self.segment is not None:
            self.reset_segment()
            for n, s in (state.get("segment") or {}).items():
                self.segment[n].load_state_dict(s)
            self.segment_epochs = state.get("segment_epochs", 0)
        self.batches_seen = state.get("batches_seen", 0)
        self.nonfinite_batches = state.get("nonfinite_batches", 0)
        self.nonfinite_pending = state.get("nonfinite_pending", 0)
