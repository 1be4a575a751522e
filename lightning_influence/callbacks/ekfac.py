"""``EKFACInfluence``: Kronecker factors accumulated on the fly from Lightning training passes.

Connects :class:`~lightning_influence.ekfac.online.OnlineFactors` to the training loop: layer
hooks (:class:`~lightning_influence.ekfac.capture.LayerCapture`) feed it during training backward
passes, epoch ends reduce through the strategy, and the end of fit runs the eigenvalue correction
and writes ``<folder>/factors`` (and, with a ``probe``, ``<folder>/self_influence``). The rules
live in the core: :mod:`~lightning_influence.ekfac.training` (layers, update rate, gradient
scale, segment ends), :mod:`~lightning_influence.padding` (a sampler's duplicates),
:mod:`~lightning_influence.ekfac.segments` (trajectory segments, docs/trajectory.md).

A run interrupted during the end-of-fit work keeps everything in its last checkpoint: resuming
from it writes the factors in ``on_fit_end``, and :func:`lightning_influence.ekfac.finish.finish_factors`
(``lightning-influence finish-factors``) writes them without a Trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .. import validation as check
from ..distributed import UnsupportedStrategyError, reduce_sum
from ..ekfac.budget import FactorMemory, check_factor_memory
from ..ekfac.capture import LayerCapture
from ..ekfac.covariance import accumulation_dtype
from ..ekfac.factors import EKFACFactors, save_factors
from ..ekfac.finish import correction_batches
from ..ekfac.online import AccumulationOptions, OnlineFactors
from ..ekfac.scorer import InfluenceScorer
from ..ekfac.segments import SegmentClock, save_segment, segment_weights
from ..ekfac.training import gradient_factor, resolve_update_every, segment_end_epochs, trainable_layers
from ..faults import fault_point
from ..layers import select_layers
from ..padding import without_padding
from ..randomness import randomness_kept
from ..report.collect import remember_written_factors
from ..task import TaskLike, example_count
from ..weights import fingerprint_sharded
from .base import InfluenceCallback

__all__ = ["EKFACInfluence"]

log = logging.getLogger("lightning_influence")
OWNER = "EKFACInfluence"


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

    Writes ``<folder>/factors`` (:func:`~lightning_influence.load_factors`), with a ``probe``
    ``<folder>/self_influence`` (:func:`~lightning_influence.load_scores`), and every
    ``every_n_epochs`` epochs ``<folder>/epoch=NNNN/factors``; ``<folder>`` is
    ``<log dir>/influence/<name>`` unless ``dirpath`` is given. Metrics (``influence/<name>/``):
    ``examples``, ``tokens``, ``hook_seconds``, ``nonfinite_batches`` per epoch; at the end
    ``fit_seconds``, ``<layer>/lambda_max``, ``<layer>/lambda_mean`` and, with a probe,
    ``self_mean``, ``self_max``, ``nonfinite``, ``top1_id`` … ``top{k}_id``.

    A training batch that would make a layer's sums non-finite (NaN, inf, overflow) is left out
    of that layer's factors, with a warning naming the step (``nonfinite_batches``). Under DDP the
    duplicates a ``DistributedSampler`` pads with are left out, so every example counts once.

    Strategies: one process, DDP, ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``, every module
    with parameters in an FSDP unit of its own below the LightningModule) and
    ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2, data parallel): layer hooks see each
    rank's whole activations, so the sums are those of DDP; layers are chosen at ``on_fit_start``,
    named as in the unwrapped model. DeepSpeed, XLA FSDP and tensor parallelism are refused at
    ``setup`` (:class:`UnsupportedStrategyError`). See ``docs/distributed.md``.

    Args:
        layers: glob pattern(s) of module names to track (``None``: every supported layer with
            trainable parameters; frozen ones are skipped with a warning).
        exclude: glob pattern(s) to leave out, e.g. ``"*lm_head"`` (each must match a layer).
        fisher: ``"empirical"`` (the training backward as is) or ``"true"`` (one extra
            forward+backward per update with labels sampled from the model).
        update_every_n_steps: accumulate on every n-th training batch of the contributing epochs
            (1 = all; the first always contributes); an update costs ``Σ (a² + o²)``
            multiply-adds per token against ``6·P`` for a training step. ``"auto"`` (default):
            the smallest ``n`` costing at most :data:`~lightning_influence.ekfac.training.AUTO_OVERHEAD`
            of training, lowered so a run of ``estimated_stepping_batches`` steps gets at least
            :data:`~lightning_influence.ekfac.training.AUTO_MIN_UPDATES` updates (logged, and
            saved in the factors' options).
        max_examples_per_update: use at most this many examples of a batch.
        epochs: ``"all"`` or ``k``: only the last ``k`` epochs (needs ``max_epochs``) contribute.
        ema_decay: running sums are multiplied by this before each new epoch is added.
        correction: ``"pass"`` (eigenvalue correction from a pass over the training loader at
            the final weights, eval mode), ``"online"`` (during the last epoch, in the eigenbasis
            of the earlier ones) or ``"none"`` (K-FAC eigenvalues).
        correction_max_batches: cap on the correction pass, in batches.
        correction_max_examples: cap on the correction pass, in examples per rank (``None``: the
            whole loader).
        correction_tol: stop the correction pass once every layer's estimated relative standard
            error of the damped corrected eigenvalues is at most this; ``None``: run to the caps.
        correction_min_examples: the fewest examples (per rank) an adaptive correction uses.
        eigh_dtype: precision of the eigendecompositions: ``"auto"`` (the accumulation dtype),
            ``"float32"`` or ``"float64"``.
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
        segments: cut training into this many trajectory segments of whole epochs and write each
            one's factors and end weights under ``<folder>/segment=KK/``
            (:class:`~lightning_influence.trajectory.TrajectoryScorer`); needs ``max_epochs >=
            segments`` and ``epochs="all"``; one process or DDP.
        memory_budget: bytes the factors may use per process (``None``: 90% of the memory
            available at ``fit`` start, shared by the processes on one device); checked before
            step 0 (:class:`~lightning_influence.memory.InsufficientMemoryError`).
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

    def prepare_fit(self, trainer, pl_module) -> None:
        if self.probe is not None:
            self.check_example_ids(trainer, self.probe)

    def start_fit(self, trainer, pl_module) -> None:
        """Choose the layers and hook them, once ``configure_model`` has run and the strategy has
        wrapped the model (FSDP): the modules training will call, named as in the unwrapped model."""
        layers = select_layers(pl_module, self.layer_patterns, exclude=self.exclude, owner=OWNER)
        if self.layer_patterns is None:
            layers = trainable_layers(layers, OWNER, rank_zero_warn)
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
        self.state = OnlineFactors(layers, self.options, track_segment=self.segments > 1, owner=OWNER)
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
        """0-based epochs after which each segment ends (:func:`~lightning_influence.ekfac.training.segment_end_epochs`)."""
        return segment_end_epochs(max_epochs, self.segments)

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
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        factor = gradient_factor(self.resolved_task.gradient_scale(batch),
                                 trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1,
                                 float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0)
        active, mask = self.state.begin_batch(batch, self.resolved_task, trainer.current_epoch, trainer.max_epochs,
                                              factor, drop=drop)
        if active and self.options.fisher == "true":
            with trainer.precision_plugin.forward_context():
                self.state.observe_sampled(pl_module, batch, self._sampled_capture, self.resolved_task, mask, self._generator)
        self._capture.enabled = active and self.options.fisher == "empirical"
        self._capture.mask = mask
        self._step = trainer.global_step
        if self.segments > 1:
            self._segment.observe(trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else 0.0)

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

    def end_epoch(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        self.state.end_epoch(epoch, trainer.max_epochs, reduce_sum(trainer), trainer.strategy.root_device)
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
        """Resumed from a checkpoint whose run stopped before its factors were written: write them
        now, at the checkpoint's weights, unless this run's factors at this step are there."""
        if self.state is None or len(self.state.empty_layers()) == len(self.state.layers):
            return
        if self.state.epoch_accs and any(acc.examples for acc in self.state.epoch_accs.values()):
            # a checkpoint taken inside the last epoch: fold the partial epoch as end_epoch would have
            self.state.end_epoch(trainer.current_epoch, trainer.max_epochs, reduce_sum(trainer), trainer.strategy.root_device)
        if self.segments > 1 and self.state.segment_epochs > 0:
            # the run stopped inside a segment (max_steps, or a checkpoint taken inside its last epoch)
            self._write_segment(trainer, pl_module, self._segment.index, trainer.current_epoch, final=True)
        if self.artifact_is_current(trainer, self.factors_path, step_key="global_step"):
            return
        rank_zero_warn(f"EKFACInfluence(name={self.name!r}): the checkpoint's run stopped before writing its factors; "
                       f"writing them now to {self.factors_path}")
        self._finalise(trainer, pl_module, epoch=None)

    # -- factors --------------------------------------------------------------------------------
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
        """The correction pass's loader without a sampler's padding (:func:`~lightning_influence.padding.without_padding`)."""
        if trainer.world_size <= 1:
            return loader
        return without_padding(loader, sharded, max_batches, max_examples, warn=lambda m: rank_zero_warn(f"{OWNER}: {m}"))

    def _finalise(self, trainer, pl_module, epoch: Optional[int]) -> None:
        t0 = time.perf_counter()
        o, layers = self.options, self.state.layers
        cap = "the training data" if o.correction_max_examples is None else f"at most {o.correction_max_examples} examples per rank"
        rank_zero_info(f"EKFACInfluence(name={self.name!r}): computing the factors of {len(layers)} layers: eigendecomposition, "
                       + (f"then the eigenvalue correction over {cap}" if o.correction != "none" else "no correction pass")
                       + " (a progress bar shows on a terminal)")
        factors = self.state.factors(self._correction_pass(trainer, pl_module), reduce_sum(trainer),
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
        """Write segment ``index`` (ending after 0-based ``epoch``): its factors, corrected at the
        current weights, and the tracked modules' parameters, then start the next segment. A
        segment no training batch contributed to is not written: its epochs join the next one."""
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
            factors = self.state.segment_factors(self._correction_pass(trainer, pl_module), reduce_sum(trainer),
                                                 trainer.strategy.root_device, warn=rank_zero_warn)
        self.fit_seconds += time.perf_counter() - t0
        info = self._segment.finish(trainer.global_step, index, epoch, self.segments)
        info.update(source="EKFACInfluence", callback=self.name, run_id=self.run_id)
        factors.meta.update({**info, "options": self._options(), "nonfinite_batches": self.state.nonfinite_batches,
                             "layers_left_out": [l.name for l in self.state.layers if l.name not in factors.layers]})
        weights = segment_weights(self.state.layers)
        fingerprint = self.all_ranks(trainer, lambda: fingerprint_sharded(
            pl_module, factors.layer_names, f"written by EKFACInfluence(name={self.name!r}) at the end of "
            f"segment {index}, global_step {trainer.global_step}"))
        self.on_rank_zero(trainer, lambda: save_segment(self.output_dir, index, factors, weights,
                                                        [l.name for l in self.state.layers], info, fingerprint))
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
        trainer = self._trainer
        # Lightning saves rank zero's callback state only: the epoch's per-rank sums are summed over ranks
        # (every rank saves a checkpoint) and restored on rank zero alone
        many = trainer is not None and trainer.world_size > 1
        state = self.state.state_dict(reduce_sum(trainer) if many else None, trainer.strategy.root_device if many else "cpu")
        return {**state, **self.folder_state(), "hook_seconds": self.hook_seconds, "segment_clock": self._segment.state_dict()}

    def load_method_state(self, state: dict) -> None:
        if self.state is None:
            self._pending_state = state
            return
        self._load(state)

    def _load(self, state: dict) -> None:
        self.state.load_state_dict(state, primary=self._trainer is None or self._trainer.global_rank == 0)
        self.hook_seconds = state.get("hook_seconds", 0.0)
        self._segment.load_state_dict(state.get("segment_clock") or {})
        self.restore_folder(state)
