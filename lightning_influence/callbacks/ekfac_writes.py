"""What :class:`~lightning_influence.EKFACInfluence` writes, every rank together: the factors at
the end of fit (and of due epochs), each trajectory segment's factors and weights, and the
probe's self-influence. The correction pass runs over the training loader without a sampler's
padding (:func:`~lightning_influence.padding.without_padding`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..distributed import reduce_sum
from ..ekfac.factors import EKFACFactors, save_factors
from ..ekfac.finish import correction_batches
from ..ekfac.scorer import InfluenceScorer
from ..ekfac.segments import save_segment, segment_weights
from ..faults import fault_point
from ..padding import without_padding
from ..randomness import randomness_kept
from ..report.collect import remember_written_factors
from ..weights import fingerprint_sharded

__all__ = ["FactorWrites"]

OWNER = "EKFACInfluence"


class FactorWrites:
    """The writing half of :class:`~lightning_influence.EKFACInfluence` (a mixin: it reads the
    callback's ``state``, ``options``, ``probe``, ``damping``, ``segments`` and timings)."""

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
        factors.as_stored(self.factor_storage, inplace=True)  # every rank: the file's numbers (probe, report, index)
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
            save_factors(factors, path, weights=weights, storage=self.factor_storage, in_place=True)
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
                                                        [l.name for l in self.state.layers], info, fingerprint, self.factor_storage))
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
                "update_every_n_steps_auto": self.auto_update, "memory_budget": self.memory_budget, "factor_storage": self.factor_storage,
                "correction_used": self.state.correction_used if self.state else None}

