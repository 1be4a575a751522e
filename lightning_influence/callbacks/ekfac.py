"""``EKFACInfluence``: Kronecker factors accumulated on the fly from Lightning training passes.

A thin adapter over :class:`~lightning_influence.ekfac.online.OnlineFactors`: hooks on the tracked
layers feed it during training backward passes; epoch ends reduce through the strategy; the end
of fit runs the eigenvalue correction (:func:`~lightning_influence.ekfac.fit.fit_lambdas` over
the training loader), writes ``<folder>/factors`` and, with a ``probe``, ``<folder>/self_influence``.

A run interrupted during that end-of-fit work (a kill, a full disk) keeps everything in its last
checkpoint: resuming from it (``trainer.fit(..., ckpt_path=...)``, which skips training when
``max_epochs`` is reached) writes the factors in ``on_fit_end``, and
:func:`lightning_influence.ekfac.finish.finish_factors` (or ``lightning-influence finish-factors``)
writes them without a Trainer.

With ``segments=S > 1`` the run is cut into ``S`` trajectory segments of whole epochs; at the end
of each, ``<folder>/segment=KK/factors`` (that segment's sums only, corrected at the segment's
end weights) and ``<folder>/segment=KK/weights`` (the tracked modules' parameters then, with the
segment's steps and mean learning rate) are written; :class:`~lightning_influence.trajectory.TrajectoryScorer`
combines them (docs/trajectory.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import warnings
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from .. import validation as check
from ..ekfac.budget import FactorMemory, check_factor_memory
from ..ekfac.capture import LayerCapture
from ..ekfac.covariance import accumulation_dtype
from ..ekfac.factors import EKFACFactors, save_factors
from ..ekfac.finish import correction_batches
from ..ekfac.online import AccumulationOptions, OnlineFactors
from ..ekfac.scorer import InfluenceScorer
from ..faults import fault_point
from ..randomness import randomness_kept
from ..report.collect import remember_written_factors
from ..storage import write_artifact
from ..layers import LayerSelectionError, select_layers
from ..task import TaskLike, example_count
from ..trajectory import SEGMENT_WEIGHTS_KIND, segment_dirname
from ..weights import fingerprint_sharded
from .base import InfluenceCallback, UnsupportedStrategyError

__all__ = ["EKFACInfluence", "UnsupportedStrategyError", "resolve_update_every", "AUTO_OVERHEAD", "AUTO_MIN_UPDATES"]

log = logging.getLogger("lightning_influence")

AUTO_OVERHEAD = 0.10
"""``update_every_n_steps="auto"``: the covariance updates' share of training compute to aim for."""
AUTO_MIN_UPDATES = 8
"""``update_every_n_steps="auto"``: the fewest updates a run of known length gets."""


def resolve_update_every(layers, n_params: int, total_steps: Optional[int]) -> int:
    """``update_every_n_steps`` for ``"auto"``: ``⌈Σ(a² + o²) / (6·P·AUTO_OVERHEAD)⌉`` (the
    updates' multiply-adds per token over a training step's ``6·P``), lowered to
    ``total_steps // AUTO_MIN_UPDATES`` so a short run still gets enough updates; at least 1."""
    work = sum(l.a_dim ** 2 + l.d_out ** 2 for l in layers)
    n = max(1, math.ceil(work / (6 * max(1, n_params) * AUTO_OVERHEAD)))
    if total_steps is not None and total_steps > 0:
        n = min(n, max(1, total_steps // AUTO_MIN_UPDATES))
    return n


def _estimated_steps(trainer) -> Optional[int]:
    """``trainer.estimated_stepping_batches`` in training batches (``None`` when unknown or infinite)."""
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # no dataloader length (iterable datasets), or not computable yet
        return None
    if steps is None or not math.isfinite(float(steps)):
        return None
    return int(steps) * max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))


class EKFACInfluence(InfluenceCallback):
    """Accumulate EK-FAC factors from training passes and save them at the end of ``fit``.

    Writes ``<folder>/factors`` (load with :func:`~lightning_influence.load_factors`), with a
    ``probe`` also ``<folder>/self_influence`` (:func:`~lightning_influence.load_scores`), and
    every ``every_n_epochs`` epochs ``<folder>/epoch=NNNN/factors``; ``<folder>`` is
    ``<log dir>/influence/<name>`` unless ``dirpath`` is given. Metrics (prefix
    ``influence/<name>/``): ``examples``, ``tokens``, ``hook_seconds``, ``nonfinite_batches`` per
    epoch; at the end ``fit_seconds``, ``<layer>/lambda_max``, ``<layer>/lambda_mean`` and, with a
    probe, ``self_mean``, ``self_max``, ``nonfinite``, ``top1_id`` … ``top{k}_id``.

    A training batch whose layer inputs or output gradients would make a layer's sums non-finite
    (NaN, inf, or an overflow) is left out of that layer's factors (checked before anything is
    added, with no scratch copy of the factors), with a warning naming the step; the count is
    the ``nonfinite_batches`` metric and manifest entry. Under DDP, the duplicates a
    ``DistributedSampler`` pads the last batch with are left out (by position), so the factors
    count every example once.

    Strategies: one process, DDP, ``FSDPStrategy`` (FSDP1, ``use_orig_params=True`` and every
    module with parameters in an FSDP unit of its own below the LightningModule) and
    ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2, data parallel). Under FSDP only the
    weights are sharded: layer hooks see each rank's whole activations and output gradients, so
    the sums are those of DDP; layers are chosen at ``on_fit_start`` (after ``configure_model``
    and the wrapping), named as in the unwrapped model, with their geometry from the modules'
    declared sizes. DeepSpeed, XLA FSDP and tensor parallelism are refused at ``setup``
    (:class:`UnsupportedStrategyError`). See ``docs/distributed.md``.

    Args:
        layers: glob pattern(s) of module names to track (``None``: every supported layer that
            has trainable parameters; frozen ones are skipped with a warning).
        exclude: glob pattern(s) to leave out, e.g. ``"*lm_head"`` (each must match a layer).
        fisher: ``"empirical"`` (the training backward pass as is: costs only the covariance
            updates) or ``"true"`` (one extra forward+backward per update with labels sampled
            from the model).
        update_every_n_steps: accumulate on every n-th training batch, counted over the
            contributing epochs of the run (1 = all; the window's first batch always contributes).
            Updating A and S costs about ``Σ (a² + o²)`` multiply-adds per token over the tracked
            layers, against ``6·P`` for a training step of a model with ``P`` parameters.
            ``"auto"`` (default) picks, at ``fit`` start, the smallest ``n`` whose updates cost at
            most :data:`AUTO_OVERHEAD` of training (``n = ⌈Σ(a² + o²) / (6·P·AUTO_OVERHEAD)⌉``),
            lowered so that a run of ``trainer.estimated_stepping_batches`` steps still gets at least
            :data:`AUTO_MIN_UPDATES` updates; the choice is logged and saved in the factors'
            options.
        max_examples_per_update: use at most this many examples of a batch.
        epochs: ``"all"`` or ``k``: only the last ``k`` epochs (needs ``max_epochs``) contribute.
        ema_decay: running sums are multiplied by this before each new epoch is added.
        correction: ``"pass"`` (eigenvalue correction from a pass over the training loader at
            the final weights, model in eval mode), ``"online"`` (during the last epoch, in the
            eigenbasis of the earlier ones: no extra pass) or ``"none"`` (K-FAC eigenvalues).
        correction_max_batches: cap on the correction pass, in batches.
        correction_max_examples: cap on the correction pass, in examples per rank (the default
            1024 estimates Λ within 0.01 LDS on the benchmarks; ``None``: the whole loader).
        correction_tol: adaptive correction sample: stop the pass once every layer's estimated
            relative standard error of the damped corrected eigenvalues is at most this (see
            :meth:`~lightning_influence.ekfac.covariance.LambdaAccumulator.relative_error`);
            ``None``: run to the caps.
        correction_min_examples: the fewest examples (per rank) an adaptive correction uses.
        eigh_dtype: precision of the eigendecompositions: ``"auto"`` (the accumulation dtype:
            float32 unless the model trains in float64; half the time of float64, error bounded
            in ``tests/test_ekfac_precision.py``), ``"float32"`` or ``"float64"``.
        every_n_epochs: also save factors under ``<folder>/epoch=NNNN/`` every n epochs.
        probe: examples (a ``Dataset`` with ids or a ``DataLoader``) whose self-influence is
            computed with the final factors.
        damping: damping for the probe scores (``None``: each layer's default).
        name: names the state, the folder and the metric prefix (see :class:`InfluenceCallback`).
        dirpath: the output folder (default ``<log dir>/influence/<name>``).
        probe_batch_size: batch size when ``probe`` is a ``Dataset``.
        top_k: how many top ids to log.
        task: how to read batches (default: the LightningModule's methods, else by layout).
        seed: seed for sampled labels (``fisher="true"``).
        segments: cut training into this many trajectory segments of whole epochs (segment ``k``
            of ``S`` ends after 0-based epoch ``(k+1)·max_epochs // S - 1``) and write each
            one's factors and end weights under ``<folder>/segment=KK/`` (see
            :class:`~lightning_influence.trajectory.TrajectoryScorer`); 1 (default): none.
            Needs ``max_epochs >= segments`` and ``epochs="all"``; one process or DDP.
        memory_budget: bytes the factors may use on each process (``None``: 90% of the memory
            available at ``fit`` start, shared by the processes on one device). The estimate
            (:class:`~lightning_influence.ekfac.budget.FactorMemory`: the covariance sums, their
            copies, the eigendecomposition and the correction) is checked at ``fit`` start, before
            step 0; a run that cannot fit is refused with the numbers and the knobs
            (:class:`~lightning_influence.memory.InsufficientMemoryError`).
    """

    method = "ekfac"
    sharded_support = ("fsdp", "fsdp2")
    sharded_refusal = ("the library reads neither DeepSpeed's engine (it runs the backward and scales the loss itself) "
                       "nor XLA's parameter sharding, and neither is tested. Use strategy='ddp', FSDPStrategy or "
                       "ModelParallelStrategy (FSDP2), or fit factors after training with lightning_influence.fit_factors "
                       "on the consolidated model.")

    def __init__(
        self,
        layers: Optional[str | list[str]] = None,
        exclude: Optional[str | list[str]] = None,
        fisher: Literal["empirical", "true"] = "empirical",
        update_every_n_steps: int | Literal["auto"] = "auto",
        max_examples_per_update: Optional[int] = None,
        epochs: Literal["all"] | int = "all",
        ema_decay: Optional[float] = None,
        correction: Literal["pass", "online", "none"] = "pass",
        correction_max_batches: Optional[int] = None,
        correction_max_examples: Optional[int] = 4096,
        correction_tol: Optional[float] = 0.2,
        correction_min_examples: int = 64,
        eigh_dtype: Literal["auto", "float32", "float64"] = "auto",
        every_n_epochs: Optional[int] = None,
        probe: Optional[Any] = None,
        damping: Optional[float] = None,
        name: str = "ekfac",
        dirpath: Optional[str] = None,
        probe_batch_size: int = 64,
        top_k: int = 10,
        task: Optional[TaskLike] = None,
        seed: int = 0,
        segments: int = 1,
        memory_budget: Optional[int] = None,
    ) -> None:
        super().__init__(name=name, dirpath=dirpath, every_n_epochs=every_n_epochs, probe_batch_size=probe_batch_size,
                         top_k=top_k, task=task)
        self.layer_patterns = check.patterns("EKFACInfluence", "layers", layers)
        self.auto_update = update_every_n_steps == "auto"
        if self.auto_update:
            update_every_n_steps = 1  # resolved at fit start (see resolve_update_every)
        self.memory_budget = check.positive_int("EKFACInfluence", "memory_budget", memory_budget, allow_none=True)
        self.exclude = check.patterns("EKFACInfluence", "exclude", exclude)
        self.options = AccumulationOptions(
            fisher=fisher, update_every_n_steps=update_every_n_steps, max_examples_per_update=max_examples_per_update,
            epochs=epochs, ema_decay=ema_decay, correction=correction, correction_max_batches=correction_max_batches,
            correction_max_examples=correction_max_examples, seed=seed, correction_tol=correction_tol,
            correction_min_examples=correction_min_examples, eigh_dtype=eigh_dtype,
        )
        self.probe = check.data_source("EKFACInfluence", "probe", probe)
        self.damping = check.finite_float("EKFACInfluence", "damping", damping, minimum=0.0, allow_none=True)
        self.segments = check.positive_int("EKFACInfluence", "segments", segments)
        if self.segments > 1 and epochs != "all":
            raise check.InvalidArgumentError(
                f"EKFACInfluence(segments={segments}) cuts the whole run into segments, but epochs={epochs!r} keeps only "
                "the last epochs' sums; use epochs='all' with segments"
            )
        self._segment = SegmentClock()
        self.state: Optional[OnlineFactors] = None
        self.factors: Optional[EKFACFactors] = None
        self.probe_scores = None
        self.hook_seconds = 0.0
        self.fit_seconds = 0.0
        self._capture: Optional[LayerCapture] = None
        self._sampled_capture: Optional[LayerCapture] = None
        self._pending_state: Optional[dict] = None
        self._step = 0

    @property
    def factors_path(self):
        """Where the end-of-fit factors are written (known after ``setup``)."""
        return self.artifact_path("factors")

    # -- set-up -------------------------------------------------------------------------------
    def prepare_fit(self, trainer, pl_module) -> None:
        if self.probe is not None:
            self.check_example_ids(trainer, self.probe)

    def start_fit(self, trainer, pl_module) -> None:
        """Choose the layers and hook them, once ``configure_model`` has run and the strategy has
        wrapped the model (FSDP): the modules training will call, named as in the unwrapped model."""
        layers = select_layers(pl_module, self.layer_patterns, exclude=self.exclude, owner="EKFACInfluence")
        if self.layer_patterns is None:
            layers = self._trainable(layers)
        if self.segments > 1:
            self._check_segments(trainer)
        if self.auto_update:
            steps = _estimated_steps(trainer)
            n = resolve_update_every(layers, sum(p.numel() for p in pl_module.parameters()), steps)
            self.options = dataclasses.replace(self.options, update_every_n_steps=n)
            log.info("EKFACInfluence(update_every_n_steps='auto'): updating the covariances every %d training step(s) "
                     "(%s estimated steps)", n, steps if steps is not None else "unknown")
        itemsize = 8 if "64" in str(trainer.precision) else 4
        check_factor_memory(
            FactorMemory.of(layers, itemsize, trainer.max_epochs if self.options.epochs == "all" else self.options.epochs,
                            self.segments, online=self.options.correction == "online", intermediate=self.every_n_epochs is not None),
            pl_module.device, self.memory_budget,
            processes_per_device=trainer.world_size // max(1, trainer.num_nodes) if pl_module.device.type == "cpu" else 1,
        )
        self.state = OnlineFactors(layers, self.options, track_segment=self.segments > 1)
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None
        self._capture = LayerCapture(layers, on_gradient=self.state.observe).attach()
        self._capture.enabled = False
        if self.options.fisher == "true":
            self._sampled_capture = LayerCapture(layers, collect=True).attach()
            self._sampled_capture.enabled = False
        self._generator = torch.Generator(device=pl_module.device).manual_seed(self.options.seed + trainer.global_rank)

    def _check_segments(self, trainer) -> None:
        epochs = trainer.max_epochs
        if epochs is None or epochs < self.segments:
            raise check.InvalidArgumentError(
                f"EKFACInfluence(segments={self.segments}) cuts training into segments of whole epochs and needs "
                f"Trainer(max_epochs >= {self.segments}), got max_epochs={epochs}"
            )
        if self.sharded:
            raise UnsupportedStrategyError(
                f"EKFACInfluence(segments={self.segments}) saves the tracked modules' weights at every segment end, "
                "which is not implemented for sharded parameters (FSDP); use segments=1 or strategy='ddp'"
            )

    def segment_end_epochs(self, max_epochs: int) -> list[int]:
        """0-based epochs after which each segment ends: ``(k+1)·max_epochs // segments - 1``."""
        return [(k + 1) * max_epochs // self.segments - 1 for k in range(self.segments)]

    @staticmethod
    def _trainable(layers: list) -> list:
        """``layers`` without those whose parameters are all frozen (warned about once)."""
        frozen = [l.name for l in layers if not any(p.requires_grad for p in l.parameters())]
        if not frozen:
            return layers
        kept = [l for l in layers if l.name not in frozen]
        if not kept:
            raise LayerSelectionError(
                f"EKFACInfluence(layers=None): every supported layer is frozen ({frozen}); unfreeze some, or name the "
                "layers to track in layers="
            )
        rank_zero_warn(f"EKFACInfluence(layers=None) skips {len(frozen)} layers without trainable parameters: {frozen[:10]}; "
                       "name them in layers= to track them anyway")
        return kept

    def start_training(self, trainer, pl_module) -> None:
        # the precision plugin converts the model (e.g. "64-true") after setup
        self.state.acc_dtype = accumulation_dtype(next(pl_module.parameters()).dtype)

    def release(self, trainer, pl_module, stage: str) -> None:
        for cap in (self._capture, self._sampled_capture):
            if cap is not None:
                cap.detach()
        self._capture = self._sampled_capture = None

    # -- training -------------------------------------------------------------------------------
    def start_epoch(self, trainer, pl_module) -> None:
        self.state.begin_epoch(trainer.current_epoch, trainer.max_epochs, pl_module.device)

    def before_batch(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        drop = self.padded_positions(trainer, example_count(self.resolved_task, batch))
        active, mask = self.state.begin_batch(batch, self.resolved_task, trainer.current_epoch, trainer.max_epochs,
                                              self._gradient_factor(trainer, pl_module, batch), drop=drop)
        if active and self.options.fisher == "true":
            with trainer.precision_plugin.forward_context():
                self.state.observe_sampled(pl_module, batch, self._sampled_capture, self.resolved_task, mask, self._generator)
        self._capture.enabled = active and self.options.fisher == "empirical"
        self._capture.mask = mask
        self._step = trainer.global_step
        if self.segments > 1:
            self._segment.observe(trainer)

    def after_batch(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        self._capture.enabled = False
        self._capture.mask = None
        self.hook_seconds += self._capture.seconds
        self._capture.seconds = 0.0
        if self.state.end_batch() is False:
            rank = f" on rank {trainer.global_rank}" if trainer.world_size > 1 else ""
            warnings.warn(
                f"EKFACInfluence(name={self.name!r}): training batch {batch_idx} of epoch {trainer.current_epoch} (global "
                f"step {self._step}){rank} gave non-finite layer inputs or output gradients (NaN, inf or an overflow); "
                "every layer whose sums it would make non-finite leaves it out, and it is counted in the nonfinite_batches metric",
                RuntimeWarning, stacklevel=2,
            )

    def _gradient_factor(self, trainer, pl_module, batch: Any) -> float:
        """Multiply seen output gradients by this to get gradients of the summed loss."""
        c = float(self.resolved_task.gradient_scale(batch))
        accumulate = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        amp = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        return accumulate / (c * amp)

    def end_epoch(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        self.state.end_epoch(epoch, trainer.max_epochs, self._reduce(trainer), trainer.strategy.root_device)
        first = max(self.state.running.values(), key=lambda acc: acc.examples)
        self.log_metrics(trainer, {"examples": first.examples, "tokens": first.a_tokens, "hook_seconds": self.hook_seconds,
                                   "nonfinite_batches": self.state.nonfinite_batches})
        self._segment.last_epoch = epoch
        if self.segments > 1 and epoch in self.segment_end_epochs(trainer.max_epochs):
            self._write_segment(trainer, pl_module, self._segment.index, epoch, final=epoch == trainer.max_epochs - 1)
        if self.epoch_due(epoch) and not OnlineFactors.is_last_epoch(epoch, trainer.max_epochs):
            self._finalise(trainer, pl_module, epoch=epoch)

    def end_training(self, trainer, pl_module) -> None:
        if self.segments > 1 and self.state.segment_epochs > 0:
            # training stopped inside a segment (max_steps, early stopping): write the part that ran
            self._write_segment(trainer, pl_module, self._segment.index, self._segment.last_epoch, final=True)
        self._finalise(trainer, pl_module, epoch=None)

    def finish_skipped_fit(self, trainer, pl_module) -> None:
        """Resumed from a checkpoint whose run ended (or was killed) before its factors were
        written: write them now, at the checkpoint's weights, unless the factors in the folder
        are this run's at this step already."""
        if self.state is None or len(self.state.empty_layers()) == len(self.state.layers):
            return
        if self.state.epoch_accs and any(acc.examples for acc in self.state.epoch_accs.values()):
            # a checkpoint taken inside the last epoch: fold the partial epoch as on_train_epoch_end would have
            self.state.end_epoch(trainer.current_epoch, trainer.max_epochs, self._reduce(trainer), trainer.strategy.root_device)
        if self.segments > 1 and self.state.segment_epochs > 0:
            # the run stopped inside a segment (max_steps, or a checkpoint taken inside its last epoch)
            self._write_segment(trainer, pl_module, self._segment.index, trainer.current_epoch, final=True)
        if self.artifact_is_current(trainer, self.factors_path, step_key="global_step"):
            return
        rank_zero_warn(f"EKFACInfluence(name={self.name!r}): the checkpoint's run stopped before writing its factors; "
                       f"writing them now to {self.factors_path}")
        self._finalise(trainer, pl_module, epoch=None)

    # -- factors at the end ---------------------------------------------------------------------
    @staticmethod
    def _reduce(trainer):
        if trainer.world_size <= 1:
            return lambda t: t
        return lambda t: trainer.strategy.reduce(t.clone(), reduce_op="sum")

    def _correction_pass(self, trainer, pl_module):
        loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError("EKFACInfluence(correction='pass') needs the training dataloader at the end of fit")
        o = self.options
        loader = self._without_padding(trainer, loader, self.sharded, o.correction_max_batches, o.correction_max_examples)
        if self.sharded:
            # every forward pass is a collective: all ranks run the same batches, so no rank may stop early
            o = dataclasses.replace(o, correction_tol=None)
        return o.correction_pass(pl_module, correction_batches(loader), self.state.layers, self.resolved_task,
                                 seed_offset=999 + trainer.global_rank,
                                 forward_context=trainer.precision_plugin.forward_context)

    @staticmethod
    def _without_padding(trainer, loader, sharded: bool = False, max_batches: Optional[int] = None,
                         max_examples: Optional[int] = None):
        """The training loader over this rank's examples of the sampler's current epoch, without
        the duplicates a ``DistributedSampler`` pads with (the loader itself when there are none).

        Under a sharded strategy every forward pass is a collective, so every rank must run as
        many batches: a rank one example short (it held a duplicate) takes one example less in
        its last batch, or in the one before when the last would be empty, and the batches are
        cut where the correction caps stop a rank with the full share (no rank then stops
        earlier). When that cannot be done (a share of one example, batches of one) the padded
        loader is kept, so the duplicates count in the correction, with a warning.
        """
        sampler = getattr(loader, "sampler", None)
        if trainer.world_size <= 1 or not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            return loader
        n_data, world, rank = len(sampler.dataset), sampler.num_replicas, sampler.rank
        if sampler.total_size <= n_data:
            return loader
        indices = [i for p, i in enumerate(iter(sampler)) if p * world + rank < n_data]
        size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 1  # sums: the size only sets speed
        if not sharded:
            return DataLoader(Subset(loader.dataset, indices), batch_size=size, shuffle=False,
                              collate_fn=loader.collate_fn, num_workers=loader.num_workers)
        sizes = even_batch_sizes(len(indices), sampler.num_samples, size, max_batches, max_examples)
        if sizes is None:
            rank_zero_warn(f"EKFACInfluence: the correction pass keeps the {sampler.total_size - n_data} examples the "
                           "DistributedSampler repeats to even out the ranks (shares of one example or batches of one "
                           "cannot be evened out otherwise under a sharded strategy)")
            return loader
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        batches = [indices[a:a + n] for a, n in zip(starts, sizes)]
        return DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn, num_workers=loader.num_workers)

    def _finalise(self, trainer, pl_module, epoch: Optional[int]) -> None:
        import time

        t0 = time.perf_counter()
        o, layers = self.options, self.state.layers
        cap = "the training data" if o.correction_max_examples is None else f"at most {o.correction_max_examples} examples per rank"
        rank_zero_info(f"EKFACInfluence(name={self.name!r}): computing the factors of {len(layers)} layers: eigendecomposition, "
                       + (f"then the eigenvalue correction over {cap}" if o.correction != "none" else "no correction pass")
                       + " (a progress bar shows on a terminal)")
        factors = self.state.factors(self._correction_pass(trainer, pl_module), self._reduce(trainer),
                                     trainer.strategy.root_device, warn=rank_zero_warn, release=epoch is None)
        self.fit_seconds += time.perf_counter() - t0
        rank_zero_info(f"EKFACInfluence(name={self.name!r}): factors ready in {time.perf_counter() - t0:.1f} s "
                       f"(eigendecomposition {self.state.seconds['eigh']:.1f} s, correction {self.state.seconds['correction']:.1f} s "
                       f"over {factors.n_lambda_examples} examples); writing {self.artifact_path('factors', epoch)}")
        factors.meta.update({
            "source": "EKFACInfluence", "callback": self.name, "run_id": self.run_id, "global_step": trainer.global_step,
            "epochs_completed": trainer.current_epoch + (1 if epoch is not None else 0),
            "epochs_accumulated": self.state.epochs_accumulated, "options": self._options(),
            "hook_seconds": self.hook_seconds, "fit_seconds": self.fit_seconds,
            "nonfinite_batches": self.state.nonfinite_batches, "nonfinite_correction_examples": self.state.nonfinite_correction,
            "layers_left_out": [l.name for l in self.state.layers if l.name not in factors.layers],
        })
        if self.state.nonfinite_correction:
            rank_zero_warn(f"EKFACInfluence(name={self.name!r}): {self.state.nonfinite_correction} examples of the correction "
                           "pass gave non-finite gradients and were left out of the eigenvalue correction")
        path = self.artifact_path("factors", epoch)
        fault_point("ekfac.before_save")
        weights = self.all_ranks(trainer, lambda: fingerprint_sharded(  # every rank: gathering shards is a collective
            pl_module, factors.layer_names, f"written by EKFACInfluence(name={self.name!r}) at global_step "
            f"{trainer.global_step}, after {factors.meta['epochs_completed']} epochs", root=trainer.strategy.model))
        def save() -> None:
            save_factors(factors, path, weights=weights)
            remember_written_factors(path, factors)  # the end-of-fit report reads them from memory

        self.on_rank_zero(trainer, save)
        metrics = {"fit_seconds": self.fit_seconds, "hook_seconds": self.hook_seconds}
        for n, f in factors.layers.items():
            metrics[f"{n}/lambda_max"] = float(f.lambdas.max())
            metrics[f"{n}/lambda_mean"] = float(f.lambdas.mean())
        if self.probe is not None and epoch is None:
            metrics.update(self._probe_self_influence(trainer, pl_module, factors))
        self.log_metrics(trainer, metrics)
        if epoch is None:
            self.factors = factors
            self._log_images(trainer)

    def _write_segment(self, trainer, pl_module, index: int, epoch: int, final: bool = False) -> None:
        """Write segment ``index`` (ending after 0-based ``epoch``): its factors, corrected at
        the current weights, and the tracked modules' parameters, then start the next segment.
        A segment no training batch contributed to (``update_every_n_steps`` larger than the
        segment) is not written: its epochs join the next segment, with a warning."""
        import time

        if len(self.state.empty_layers(self.state.segment)) == len(self.state.layers):
            rank_zero_warn(
                f"EKFACInfluence(name={self.name!r}, segments={self.segments}): no training batch of epochs "
                f"{self._segment.start_epoch}-{epoch} contributed (update_every_n_steps={self.options.update_every_n_steps}); "
                + ("they are left out of the trajectory" if final else "they join the next segment")
                + "; lower update_every_n_steps or use fewer segments"
            )
            if final:
                self.state.reset_segment()
            return
        t0 = time.perf_counter()
        with randomness_kept(trainer.train_dataloader):  # training goes on as without the pass
            factors = self.state.segment_factors(self._correction_pass(trainer, pl_module), self._reduce(trainer),
                                                 trainer.strategy.root_device, warn=rank_zero_warn)
        self.fit_seconds += time.perf_counter() - t0
        info = self._segment.finish(trainer, index, epoch, self.segments)
        info.update(source="EKFACInfluence", callback=self.name, run_id=self.run_id)
        factors.meta.update({**info, "options": self._options(), "nonfinite_batches": self.state.nonfinite_batches,
                             "layers_left_out": [l.name for l in self.state.layers if l.name not in factors.layers]})
        weights = {f"{l.name}.{p}": t.detach() for l in self.state.layers for p, t in l.module.named_parameters(recurse=False)}
        folder = self.output_dir / segment_dirname(index)
        fingerprint = self.all_ranks(trainer, lambda: fingerprint_sharded(
            pl_module, factors.layer_names, f"written by EKFACInfluence(name={self.name!r}) at the end of "
            f"segment {index}, global_step {trainer.global_step}"))

        def save() -> None:
            save_factors(factors, folder / "factors", weights=fingerprint)
            write_artifact(folder / "weights", SEGMENT_WEIGHTS_KIND, weights,
                           {"layers": [l.name for l in self.state.layers], "meta": info})

        self.on_rank_zero(trainer, save)
        self.log_metrics(trainer, {f"segment={index:02d}/weight": info["weight"]})

    def _probe_self_influence(self, trainer, pl_module, factors: EKFACFactors) -> dict:
        scorer = InfluenceScorer(pl_module, factors, task=self.resolved_task, damping=self.damping)
        loader = self.probe_loader(trainer, self.probe)
        result = self.all_ranks(trainer, lambda: scorer.self_influence(loader))
        ids, scores = self.gather_by_id(trainer, result.train_ids.to(pl_module.device), result.self_influence.to(pl_module.device),
                                        padding=self.probe_padding(trainer, self.probe))
        result.train_ids, result.self_influence = ids.cpu(), scores.detach().cpu()
        result.epoch, result.step = self.last_epoch(trainer), trainer.global_step
        result.meta = {"callback": self.name, "run_id": self.run_id}
        self.probe_scores = result
        self.write_scores(trainer, result, self.artifact_path("self_influence"))
        return self.ranking_metrics(result.train_ids, result.self_influence)

    def _log_images(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        from ..report import read_report

        # read back only when a logger takes the figures (a 124M model's factors are GBs)
        paths = [self.factors_path] + ([self.artifact_path("self_influence")] if self.probe is not None else [])
        self.log_images(trainer, [lambda p=p: read_report(p, self.top_k) for p in paths])

    def _options(self) -> dict:
        return {"layers": self.layer_patterns, "exclude": self.exclude, **self.options.as_dict(), "segments": self.segments,
                "update_every_n_steps_auto": self.auto_update, "memory_budget": self.memory_budget,
                "correction_used": self.state.correction_used if self.state else None}

    # -- checkpointing ---------------------------------------------------------------------------
    def method_state(self) -> dict:
        if self.state is None:
            return {} if self._pending_state is None else dict(self._pending_state)
        state = {**self.state.state_dict(), **self.folder_state(), "hook_seconds": self.hook_seconds,
                 "segment_clock": self._segment.state_dict()}
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            # Lightning saves rank zero's callback state only: the epoch's per-rank sums so far are
            # summed over ranks here (every rank saves a checkpoint), and restored on rank zero alone
            reduce = self._reduce(trainer)
            epoch = {}
            for name, acc in self.state.epoch_accs.items():
                copy = type(acc)(acc.a_dim, acc.d_out).merge_(acc)
                epoch[name] = copy.all_reduce_(reduce, self.state.acc_dtype, trainer.strategy.root_device).state_dict()
            pending = reduce(torch.tensor([float(self.state.nonfinite_pending)], dtype=torch.float64, device=trainer.strategy.root_device))
            state.update(epoch=epoch, nonfinite_pending=int(pending.item()), epoch_reduced=True)
        return state

    def load_method_state(self, state: dict) -> None:
        if not state:
            return
        if self.state is None:
            self._pending_state = state
            return
        self._load(state)

    def _load(self, state: dict) -> None:
        state = dict(state)
        if state.get("epoch_reduced") and self._trainer is not None and self._trainer.global_rank != 0:
            state["epoch"], state["nonfinite_pending"] = {}, 0  # rank zero carries the sum over ranks
        self.state.load_state_dict(state)
        self.hook_seconds = state.get("hook_seconds", 0.0)
        self._segment.load_state_dict(state.get("segment_clock") or {})
        self.restore_folder(state)


class SegmentClock:
    """Steps and learning rates of the current trajectory segment (checkpointed with the
    callback): every training batch adds the first optimizer's first parameter group's
    learning rate; a segment's ``weight`` is its mean learning rate × its optimizer steps."""

    def __init__(self) -> None:
        self.index = 0  # segments finished
        self.start_step = 0
        self.start_epoch = 0
        self.batches = 0
        self.lr_sum = 0.0
        self.last_epoch = 0  # the last epoch that ended

    def observe(self, trainer) -> None:
        optimizers = trainer.optimizers
        lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else 0.0
        self.batches += 1
        self.lr_sum += lr

    def finish(self, trainer, index: int, epoch: int, segments: int) -> dict:
        """The finished segment's record (for both artifacts' manifests); starts the next."""
        steps = trainer.global_step - self.start_step
        mean_lr = self.lr_sum / self.batches if self.batches else 0.0
        info = {"segment": index, "segments": segments, "first_epoch": self.start_epoch, "last_epoch": epoch,
                "global_step": trainer.global_step, "steps": steps, "batches": self.batches, "mean_lr": mean_lr,
                "weight": mean_lr * steps}
        self.index, self.start_epoch, self.batches, self.lr_sum = index + 1, epoch + 1, 0, 0.0
        self.start_step = trainer.global_step
        return info

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def even_batch_sizes(n: int, share: int, batch_size: int, max_batches: Optional[int] = None,
                     max_examples: Optional[int] = None) -> Optional[list[int]]:
    """Batch sizes for ``n`` examples (``share`` or ``share - 1``) such that every rank runs the
    same number of batches: those of ``share`` examples in batches of ``batch_size``, cut where
    ``max_batches`` / ``max_examples`` (stop before the first batch once this many were seen) stop
    them; with ``n = share - 1`` one example less in the last batch, or in the one before when the
    last would be empty. ``None`` when that is impossible (``n = 0``, or batches of one)."""
    full = [batch_size] * (share // batch_size) + ([share % batch_size] if share % batch_size else [])
    keep, seen = 0, 0
    for size in full:
        if (max_batches is not None and keep >= max_batches) or (max_examples is not None and seen >= max_examples):
            break
        keep, seen = keep + 1, seen + size
    if n == share:
        return full[:keep]
    if n != share - 1 or n == 0:
        return None
    sizes = list(full)
    if sizes[-1] > 1:
        sizes[-1] -= 1
    elif len(sizes) >= 2 and sizes[-2] > 1:
        sizes[-2] -= 1
    else:
        return None
    return sizes[:keep]
