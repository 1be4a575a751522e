"""What :class:`~lightning_influence.Z0Influence` records and writes, every rank together: a row
(the probe's and queries' losses gathered by id, the snapshot and its Gram row through
:meth:`~lightning_influence.z0.recorder.Z0Recorder.add_across_ranks`) and the artifacts
``recording`` and ``self_influence``, written on rank zero at spaced recording points.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from ..model_mode import eval_mode
from ..scores import InfluenceScores
from ..z0.artifact import Z0Result, write_z0
from ..z0.losses import evaluate_losses

__all__ = ["RowWrites", "WRITE_SPACING"]

OWNER = "Z0Influence"
WRITE_SPACING = 50.0
"""The artifacts are rewritten at a recording point once at least this many times the last write's
CPU time has passed (in this process's CPU time) since it, so that writing costs at most ~1/50 of
the run, and always at the end of training."""


class RowWrites:
    """The recording half of :class:`~lightning_influence.Z0Influence` (a mixin: it reads the
    callback's ``recorder``, ``probe``, ``queries``, loaders, ``losses_from`` and options)."""

    def finish_skipped_fit(self, trainer, pl_module) -> None:
        """A resume that Lightning skipped: write the artifacts of the checkpoint's rows when the
        interrupted run had not (its last write may have been left for the end of training)."""
        if self._restored_state is None:
            return
        state, self._restored_state = dict(self._restored_state), None
        self.all_ranks(trainer, lambda: self.recorder.load_state_dict(state, snapshot_dir=self.snapshot_dir, check_files=False))
        if self.recorder.rows:  # rewritten whole (the same content if it was written; a killed write's leftovers go)
            result = self.recorder.result(self.artifact_path("recording"))
            # the 0-based epoch the last row was recorded in (after it, for per-epoch rows), as when recorded
            last = int(result.epochs[-1])
            epoch = last if self.options.every_n_steps is not None else max(last - 1, 0)
            self._pending = (result, self._scores(trainer, result, epoch=epoch, step=int(result.steps[-1])))
            self._write_pending(trainer)

    def _record(self, trainer, pl_module, epoch: int) -> None:
        """One row on every rank; ``epoch`` = completed epochs (0 for the initial weights)."""
        ranks = self.ranks(trainer)
        training = None
        if self._epoch_losses is not None:  # gathered, or None: a probe pass
            n = len(self.probe.dataset if isinstance(self.probe, DataLoader) else self.probe)
            training = self._epoch_losses.row(ranks, n, trainer.global_step, rank_zero_warn)
        probe, query = self.all_ranks(trainer, lambda: self._local_losses(trainer, pl_module, probe_pass=training is None))
        if training is not None:
            probe = training
        else:
            padding = self.probe_padding(trainer, self.probe) if self.options.losses_from != "training_step" else 0
            probe = self.gather_by_id(trainer, *probe, padding=padding)
        query = None if query is None else self.gather_by_id(trainer, *query, padding=self.probe_padding(trainer, self.queries))
        query_ids, query_losses = (None, None) if query is None else query
        at_snapshot = self.options.losses_from != "training_step" and training is None
        row = dict(step=trainer.global_step, epoch=epoch, probe_ids=probe[0], probe_losses=probe[1], query_ids=query_ids,
                   query_losses=query_losses, losses_at="snapshot" if at_snapshot else "training_step")
        self.recorder.add_across_ranks(ranks, row, self._parameters(pl_module), pl_module)
        result = self.recorder.result(self.artifact_path("recording"))
        scores = self._scores(trainer, result)
        self._pending = (result, scores)
        if self._write_due(trainer, first_scores=scores is not None and not self._scores_written):
            self._write_pending(trainer)
        if scores is not None:
            self.log_metrics(trainer, self.ranking_metrics(scores.train_ids, scores.self_influence))

    def _write_due(self, trainer, first_scores: bool = False) -> bool:
        """Whether to write the artifacts at this recording point (decided on rank zero, the same
        on every rank): the first row, the first time there are scores (the second row), then once
        ``WRITE_SPACING`` times the last write's CPU time has passed since it ended (process CPU
        time: steadier than wall time on a shared machine); the end of training writes the rest."""
        last = self._last_write
        due = first_scores or last is None or time.process_time() - last[0] >= WRITE_SPACING * last[1]
        return bool(self._broadcast(trainer, due))

    def _write_pending(self, trainer) -> None:
        """Write the last row's recording and self-influence artifacts (rank zero), if unwritten."""
        if self._pending is None:
            return
        result, scores = self._pending
        start = time.process_time()
        self.on_rank_zero(trainer, lambda: write_z0(result.directory, result))
        if scores is not None:
            self.write_scores(trainer, scores, self.artifact_path("self_influence"))
            self._scores_written = True
        self._pending = None
        end = time.process_time()
        self._last_write = (end, end - start)

    def _local_losses(self, trainer, pl_module, probe_pass: bool = True) -> tuple[Optional[tuple[Tensor, Tensor]], Optional[tuple[Tensor, Tensor]]]:
        """This rank's ``(ids, losses)`` of the probe (``None`` without ``probe_pass``: they came
        from the training steps) and of the queries (no collective)."""
        probe = query = None
        if self.options.losses_from == "training_step":
            ids, losses = self.recorder.pop_training_losses()
            probe = (ids.to(pl_module.device), losses.to(pl_module.device))
        elif not probe_pass and self._query_loader is None:
            return probe, query  # nothing to evaluate: the model's modes are left alone
        with eval_mode(pl_module), torch.no_grad():
            if probe_pass and self.options.losses_from != "training_step":
                probe = self._evaluate(trainer, pl_module, self._probe_loader, "probe")
            if self._query_loader is not None:
                query = self._evaluate(trainer, pl_module, self._query_loader, "query")
        return probe, query

    def _evaluate(self, trainer, pl_module, loader: Iterable[Any], what: str) -> tuple[Tensor, Tensor]:
        task = self.resolved_task
        return evaluate_losses(pl_module, loader, task.per_example_loss if what == "probe" else task.measurement, task,
                               pl_module.device, what, OWNER, trainer.precision_plugin.forward_context)

    def _scores(self, trainer, result: Z0Result, epoch: Optional[int] = None, step: Optional[int] = None) -> Optional[InfluenceScores]:
        """The probe's self-influence (the ``self_influence`` estimator), once two rows exist;
        ``epoch`` / ``step``: of the last row (default: the trainer's now)."""
        if result.num_checkpoints < 2:
            return None
        return InfluenceScores("z0", result.probe_ids, self_influence=result.self_influence(self.options.self_influence),
                               epoch=trainer.current_epoch if epoch is None else epoch,
                               step=trainer.global_step if step is None else step,
                               options={"estimator": self.options.self_influence, "losses_from": self.options.losses_from, **self._options()},
                               meta={"callback": self.name, "run_id": self.run_id, "checkpoints": result.num_checkpoints,
                                     "epochs_completed": int(result.epochs[-1])})
