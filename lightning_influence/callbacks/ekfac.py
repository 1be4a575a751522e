"""``EKFACInfluence``: connects :class:`~lightning_influence.ekfac.online.OnlineFactors` to the
training loop (layer hooks feed it during training backward passes; epoch ends reduce through the
strategy); :class:`.ekfac_writes.FactorWrites` writes the results. A run interrupted during the
end-of-fit work writes its factors when resumed from its last checkpoint, or without a Trainer
with :func:`lightning_influence.ekfac.finish.finish_factors` (``lightning-influence finish-factors``).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn

from .. import validation as check
from ..distributed import reduce_sum
from ..ekfac.budget import FactorMemory, check_factor_memory
from ..ekfac.capture import LayerCapture
from ..ekfac.covariance import accumulation_dtype
from ..ekfac.factors import DEFAULT_FACTOR_STORAGE, STORAGE_CHOICES, EKFACFactors
from ..ekfac.online import AccumulationOptions, OnlineFactors
from ..ekfac.segments import SegmentClock
from ..ekfac.training import check_segments, gradient_factor, resolve_update_every, segment_end_epochs, trainable_layers
from ..layers import select_layers
from ..memory import TrainingState
from ..task import TaskLike, example_count
from .base import InfluenceCallback
from .ekfac_writes import FactorWrites

__all__ = ["EKFACInfluence"]

log = logging.getLogger("lightning_influence")
OWNER = "EKFACInfluence"


class EKFACInfluence(FactorWrites, InfluenceCallback):
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

    Strategies (docs/distributed.md): one process, DDP, ``FSDPStrategy`` (``use_orig_params=True``, every module
    with parameters in an FSDP unit of its own) and ``ModelParallelStrategy`` with ``fully_shard``: the sums are
    DDP's; layers are chosen at ``on_fit_start``, named as unwrapped. DeepSpeed, XLA FSDP, tensor parallelism: refused.

    Args:
        layers: glob pattern(s) of module names to track (``None``: every supported layer with
            trainable parameters; frozen ones are skipped with a warning).
        exclude: glob pattern(s) to leave out, e.g. ``"*lm_head"`` (each must match a layer).
        fisher: ``"empirical"`` or ``"true"`` (labels sampled from the model). This and the
            accumulation options below go into the frozen :class:`~lightning_influence.ekfac.online.AccumulationOptions`
            (documented there and in docs/ekfac.md); ``self.options`` holds the ones used.
        max_examples_per_update: use at most this many examples of a batch.
        epochs: ``"all"`` or ``k``: only the last ``k`` epochs contribute.
        ema_decay: running sums are multiplied by this before each new epoch is added.
        correction: ``"pass"``, ``"online"`` (last epoch) or ``"none"`` (K-FAC eigenvalues).
        correction_max_batches: cap on the correction pass, in batches.
        correction_max_examples: cap on the correction pass, in examples per rank.
        correction_tol: adaptive stop of the correction pass (``None``: run to the caps).
        correction_min_examples: the fewest examples an adaptive correction uses.
        eigh_dtype: ``"auto"``, ``"float32"`` or ``"float64"`` eigendecompositions.
        seed: seed for sampled labels.
        update_every_n_steps: accumulate on every n-th training batch of the contributing epochs
            (1 = all). ``"auto"`` (default): the smallest ``n`` whose updates (``Σ (a² + o²)``
            multiply-adds per token) cost at most :data:`~lightning_influence.ekfac.training.AUTO_OVERHEAD`
            of training (``6·P``), lowered so a run gets at least
            :data:`~lightning_influence.ekfac.training.AUTO_MIN_UPDATES` updates; logged and saved.
        every_n_epochs: also save factors under ``<folder>/epoch=NNNN/`` every n epochs.
        probe: examples (a ``Dataset`` with ids or a ``DataLoader``) whose self-influence is
            computed with the final factors.
        damping: damping for the probe scores (``None``: each layer's default).
        name: names the state, the folder and the metric prefix (see :class:`InfluenceCallback`).
        dirpath: the output folder (default ``<log dir>/influence/<name>``).
        probe_batch_size: batch size when ``probe`` is a ``Dataset``.
        top_k: how many top ids to log.
        task: how to read batches (default: the LightningModule's methods, else by layout).
        segments: cut training into this many trajectory segments of whole epochs and write each
            one's factors and end weights under ``<folder>/segment=KK/``
            (:class:`~lightning_influence.trajectory.TrajectoryScorer`); needs ``max_epochs >=
            segments`` and ``epochs="all"``; one process or DDP.
        memory_budget: bytes the factors may use per process (``None``: 90% of the memory
            available at ``fit`` start, shared by the processes on one device); checked before
            step 0 (:class:`~lightning_influence.memory.InsufficientMemoryError`).
        factor_storage: how factors are written: ``"auto"`` (float16 eigenvectors, bfloat16 Λ; float64 ones exact), ``"exact"``, ... .
    """

    method = "ekfac"
    sharded_support = ("fsdp", "fsdp2")
    sharded_refusal = ("the library reads neither DeepSpeed's engine (it runs the backward and scales the loss itself) nor XLA's "
                       "parameter sharding, and neither is tested. Use strategy='ddp', FSDPStrategy or ModelParallelStrategy (FSDP2), "
                       "or fit factors after training with lightning_influence.fit_factors on the consolidated model.")

    def __init__(
        self,
        layers: Optional[str | list[str]] = None, exclude: Optional[str | list[str]] = None,
        fisher: Literal["empirical", "true"] = "empirical", update_every_n_steps: int | Literal["auto"] = "auto",
        max_examples_per_update: Optional[int] = None, epochs: Literal["all"] | int = "all",
        ema_decay: Optional[float] = None, correction: Literal["pass", "online", "none"] = "pass",
        correction_max_batches: Optional[int] = None, correction_max_examples: Optional[int] = 4096,
        correction_tol: Optional[float] = 0.2, correction_min_examples: int = 64,
        eigh_dtype: Literal["auto", "float32", "float64"] = "auto",
        every_n_epochs: Optional[int] = None, probe: Optional[Any] = None, damping: Optional[float] = None,
        name: str = "ekfac", dirpath: Optional[str] = None, probe_batch_size: int = 64, top_k: int = 10,
        task: Optional[TaskLike] = None, seed: int = 0, segments: int = 1, memory_budget: Optional[int] = None,
        factor_storage: str = DEFAULT_FACTOR_STORAGE,
    ) -> None:
        super().__init__(name=name, dirpath=dirpath, every_n_epochs=every_n_epochs, probe_batch_size=probe_batch_size,
                         top_k=top_k, task=task)
        self.layer_patterns = check.patterns("EKFACInfluence", "layers", layers)
        self.auto_update = update_every_n_steps == "auto"
        if self.auto_update:
            update_every_n_steps = 1  # resolved at fit start (see resolve_update_every)
        self.memory_budget = check.positive_int("EKFACInfluence", "memory_budget", memory_budget, allow_none=True)
        self.exclude = check.patterns("EKFACInfluence", "exclude", exclude)
        self.factor_storage = check.choice("EKFACInfluence", "factor_storage", factor_storage, STORAGE_CHOICES)
        self.options = AccumulationOptions(
            fisher=fisher, update_every_n_steps=update_every_n_steps, max_examples_per_update=max_examples_per_update,
            epochs=epochs, ema_decay=ema_decay, correction=correction, correction_max_batches=correction_max_batches,
            correction_max_examples=correction_max_examples, seed=seed, correction_tol=correction_tol,
            correction_min_examples=correction_min_examples, eigh_dtype=eigh_dtype, owner=OWNER,
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
        self.hook_seconds = self.fit_seconds = 0.0
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
        """Choose and hook the layers once the strategy has wrapped the model (names as unwrapped)."""
        layers = select_layers(pl_module, self.layer_patterns, exclude=self.exclude, owner=OWNER)
        if self.layer_patterns is None:
            layers = trainable_layers(layers, OWNER, rank_zero_warn)
        if self.segments > 1:
            check_segments(self.segments, trainer.max_epochs, self.sharded, OWNER)
        if self.auto_update:
            steps = self.estimated_batches(trainer)
            n = resolve_update_every(layers, sum(p.numel() for p in pl_module.parameters()), steps)
            self.options = dataclasses.replace(self.options, update_every_n_steps=n)
            log.info("EKFACInfluence(update_every_n_steps='auto'): updating the covariances every %d training step(s) "
                     "(%s estimated steps)", n, steps if steps is not None else "unknown")
        itemsize = 8 if "64" in str(trainer.precision) else 4
        check_factor_memory(
            FactorMemory.of(layers, itemsize, trainer.max_epochs if self.options.epochs == "all" else self.options.epochs,
                            self.segments, self.options.correction == "online", self.every_n_epochs is not None,
                            TrainingState.of(pl_module, trainer.optimizers), storage=self.factor_storage),  # optimizers exist at on_fit_start
            pl_module.device, self.memory_budget,
            processes_per_device=trainer.world_size // max(1, trainer.num_nodes) if pl_module.device.type == "cpu" else 1,
        )
        self.state = OnlineFactors(layers, self.options, self.segments > 1, OWNER, self.ranks(trainer))
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None
        self._capture = LayerCapture(layers, on_gradient=self.state.observe).attach()
        self._capture.enabled = False
        if self.options.fisher == "true":
            self._sampled_capture = LayerCapture(layers, collect=True).attach()
            self._sampled_capture.enabled = False
        self._generator = torch.Generator(device=pl_module.device).manual_seed(self.options.seed + trainer.global_rank)

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
        active, mask = self.state.begin_batch(batch, self.resolved_task, trainer.current_epoch, trainer.max_epochs, factor, drop)
        if active and self.options.fisher == "true":
            with trainer.precision_plugin.forward_context():
                self.state.observe_sampled(pl_module, batch, self._sampled_capture, self.resolved_task, mask, self._generator)
        self._capture.enabled = active and self.options.fisher == "empirical"
        self._capture.mask = mask
        self._step = trainer.global_step
        if self.segments > 1:
            self._segment.observe(trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else 0.0)

    def after_batch(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        self._capture.enabled, self._capture.mask = False, None
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

    # -- checkpointing ---------------------------------------------------------------------------
    def method_state(self) -> dict:
        if self.state is None:
            return {} if self._pending_state is None else dict(self._pending_state)
        trainer = self._trainer
        # Lightning saves rank zero's state only: the epoch's sums over ranks, restored on rank zero alone
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
