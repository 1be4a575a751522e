"""``Z0Influence``: record what Z0-Inf needs while a Lightning model trains. A thin adapter over
:class:`~lightning_influence.z0.recorder.Z0Recorder` (Lightning plumbing only: evaluation passes,
gathering across ranks, writes on rank zero, the strategy's reduce for sharded Gram rows); all
estimation is in :mod:`lightning_influence.z0`.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from .. import validation as check
from ..batches import move_to_device
from ..model_mode import eval_mode
from ..layers import unwrapped_name
from ..params import LAST_LAYER, select_parameters
from ..patterns import select_names
from ..scores import InfluenceScores
from ..task import MissingExampleIdsError, TaskLike
from ..z0.artifact import SELF_METHODS, Z0Result, write_z0
from ..z0.capture import TrainingLossCapture
from ..z0.recorder import Z0Recorder
from ..z0.shards import local_parts
from .base import DuplicateIdsError, InfluenceCallback

__all__ = ["Z0Influence"]

OWNER = "Z0Influence"
LOSS_MODES = ("auto", "probe", "training_step")
WRITE_SPACING = 50.0
"""The artifacts are rewritten at a recording point once at least this many times the last write's
CPU time has passed (in this process's CPU time) since it, so that writing costs at most ~1/50 of
the run, and always at the end of training."""


class Z0Influence(InfluenceCallback):
    """Record loss trajectories and the Gram matrix of parameter snapshots for Z0-Inf.

    At every recording point (end of every ``every_n_epochs``-th epoch, or every
    ``every_n_steps``-th optimizer step) it takes the per-example losses of ``probe`` (from the
    epoch's training steps when the probe is the training set, see ``losses_from``; else
    evaluated in eval mode without gradients, each module's training flag restored) and the
    ``measurement`` (by default the loss) of ``queries`` (evaluated so), gathers them by example
    id across ranks, snapshots the selected (trainable) parameters into ``<folder>/.snapshots``
    (streamed back one tensor at a time to extend the ``E × E`` Gram matrix;
    :mod:`lightning_influence.z0.gram`) and, on rank zero, rewrites (at the first two recording
    points, then spaced so that writing costs at most ~1/50 of the run, and at the end of
    training) ``<folder>/recording`` (kind ``"z0"``; :func:`~lightning_influence.load_z0`)
    and, from the second row on, ``<folder>/self_influence`` (kind ``"scores"``, method ``"z0"``:
    the probe's self-influence by the ``self_influence`` estimator, ``>= 0``; :func:`~lightning_influence.load_scores`).
    It logs ``influence/<name>/self_mean``, ``self_max``, ``nonfinite`` and ``top1_id`` …
    ``top{k}_id`` (highest self-influence first). ``<folder>`` is ``<log dir>/influence/<name>``
    unless ``dirpath`` is given. The recording's ``.pairwise()`` gives train-test influence
    (``Tensor[n_query, n_train]``, positive = the training example helps the query).

    Strategies: one process, DDP (rank zero writes whole snapshots and broadcasts the Gram
    matrix), ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``) and ``ModelParallelStrategy``
    (FSDP2, ``fully_shard``): under sharding no rank gathers the model; each rank writes its own
    part of every snapshot (``snapshot_NNNNN.shard-RRRRR-of-WWWWW.safetensors``) and computes its
    part of each Gram entry (float64 dot products of its pieces), summed over ranks with the
    strategy's ``reduce``. Parameter names are those of the unwrapped model (FSDP1's wrapper
    segments removed), also for ``params`` patterns. DeepSpeed and XLA FSDP are refused at
    ``setup``. A sharded recording resumes with the same number of processes.

    Args:
        probe: training examples to score, a ``Dataset`` (batched with ``probe_batch_size``, in
            order) or a ``DataLoader``; batches must carry example ids (wrap the dataset in
            :class:`~lightning_influence.IndexedDataset`). Required with ``losses_from="probe"``,
            not accepted otherwise.
        queries: optional test examples (same rules); needed for train-test influence.
        every_n_epochs: record at the end of every n-th epoch (default 1 without ``every_n_steps``).
        every_n_steps: record after every n-th optimizer step instead.
        params: ``None`` (all trainable parameters), ``"last_layer"`` (the output head) or glob
            pattern(s) with the library's one rule (``"2.*"`` matches ``net.2.weight``; see
            :func:`lightning_influence.params.select_parameters`).
        losses_from: where the probe's per-example losses come from:

            * ``"auto"`` (default): when the probe is the training loader's dataset and recording
              is per epoch without ``record_initial``, from the training forward passes of the
              epoch, at no extra pass: the step's own ``"per_example_loss"`` when
              ``training_step`` returns a dict with one, else read by forward hooks on the
              LightningModule and its direct children with the task's ``loss_from_outputs``
              and accepted only where ``gradient_scale(batch) * sum`` reproduces the step's
              training loss (:class:`~lightning_influence.z0.capture.TrainingLossCapture`).
              Each loss is then measured at the weights *of the step that trained on the
              example* (in train mode, so with dropout), not at the row's snapshot. Anything
              else (another probe, step recording, a loss that does not add up, an epoch that
              leaves examples out) falls back to ``"probe"``, with one warning; each row's
              manifest entry ``probe_losses_at`` says which it was.
            * ``"probe"``: a pass over the probe in eval mode at each recording point, at the
              snapshot's weights (the paper's estimator; what earlier versions always did).
            * ``"training_step"``: without a probe: ``training_step`` returns a dict with
              ``"loss"``, ``"per_example_loss"`` (``Tensor[B]``) and optionally ``"ids"``,
              measured when the batch was trained on. Needs epoch-based recording, no
              ``record_initial`` and no ``probe``.
        record_initial: also record a row at the initial weights (before the first step).
        keep_snapshots: keep the snapshot files after training (for ``Z0Result.snapshot`` and to
            continue a *finished* run); otherwise the files this recording wrote are deleted at
            the end of training (the folder too when the recording created it and it is empty;
            nothing else is ever deleted).
        self_influence: the estimator of the self-influence artifact and metrics (any of
            :meth:`~lightning_influence.Z0Result.self_influence`'s methods): ``"mean_loss"``
            (default: the example's mean loss over the recorded checkpoints), ``"variance"`` (the
            paper's loss variance: how much the loss moved), ``"finite_difference"`` or
            ``"least_squares"`` (``Σ ‖ĝ‖²`` with zeroth-order gradients, at their defaults). On
            digits with 10% flipped labels the mean loss found them with average precision
            0.98 and the variance with 0.58 (docs/benchmarks_mislabel.md). The recording keeps
            every estimator available after training.
        snapshot_dir: where snapshot files go (default ``<folder>/.snapshots``). A resumed run
            reads them from the folder its checkpoint recorded unless this is given (snapshots
            that were moved). A new recording refuses a folder that already holds snapshot
            files of another recording.
        name: names the output folder, metric prefix and checkpoint state (default ``"z0"``).
        dirpath: the output folder instead of ``<log dir>/influence/<name>``.
        probe_batch_size: batch size of ``probe`` / ``queries`` given as a ``Dataset``.
        top_k: how many top ids to log as metrics.
        task: how to read batches (default: the LightningModule's methods, else by batch layout).
    """

    method = "z0"
    sharded_support = ("fsdp", "fsdp2")
    sharded_refusal = ("the library reads neither DeepSpeed's nor XLA's parameter partitions, so it could not snapshot "
                       "each rank's part, and neither is tested. Use strategy='ddp', FSDPStrategy or ModelParallelStrategy "
                       "(FSDP2).")

    def __init__(
        self,
        probe: Optional[Any] = None,
        queries: Optional[Any] = None,
        every_n_epochs: Optional[int] = None,
        every_n_steps: Optional[int] = None,
        params: Optional[str | Sequence[str]] = None,
        losses_from: str = "auto",
        record_initial: bool = False,
        keep_snapshots: bool = False,
        snapshot_dir: Optional[str] = None,
        self_influence: str = "mean_loss",
        name: str = "z0",
        dirpath: Optional[str] = None,
        probe_batch_size: int = 256,
        top_k: int = 10,
        task: Optional[TaskLike] = None,
    ) -> None:
        if every_n_epochs is not None and every_n_steps is not None:
            raise check.InvalidArgumentError(f"{OWNER}: give every_n_epochs or every_n_steps, not both (got "
                                             f"every_n_epochs={every_n_epochs!r}, every_n_steps={every_n_steps!r})")
        super().__init__(name=name, dirpath=dirpath, every_n_epochs=1 if every_n_steps is None and every_n_epochs is None
                         else every_n_epochs, probe_batch_size=probe_batch_size, top_k=top_k, task=task)
        self.every_n_steps = check.positive_int(OWNER, "every_n_steps", every_n_steps, allow_none=True)
        self.losses_from = check.choice(OWNER, "losses_from", losses_from, LOSS_MODES)
        self.probe = check.data_source(OWNER, "probe", probe)
        self.queries = check.data_source(OWNER, "queries", queries)
        patterns = check.patterns(OWNER, "params", params)
        self.params = LAST_LAYER if patterns == [LAST_LAYER] else patterns
        self.record_initial = check.boolean(OWNER, "record_initial", record_initial)
        self.keep_snapshots = check.boolean(OWNER, "keep_snapshots", keep_snapshots)
        self.snapshot_dir = check.optional_path(OWNER, "snapshot_dir", snapshot_dir)
        self.self_influence = check.choice(OWNER, "self_influence", self_influence, SELF_METHODS)
        if self.losses_from != "training_step" and probe is None:
            raise check.InvalidArgumentError(f"{OWNER}(probe=None) needs losses_from='training_step'; with "
                                             f"losses_from={self.losses_from!r} pass a probe Dataset or DataLoader")
        if self.losses_from == "training_step":
            for arg, bad, why in (("probe", probe is not None, "the losses come from training_step, not from a probe"),
                                  ("every_n_steps", every_n_steps is not None, "a row needs every training example once; use every_n_epochs"),
                                  ("record_initial", record_initial, "no training losses exist before the first step")):
                if bad:
                    raise check.InvalidArgumentError(f"{OWNER}({arg}=...) cannot be used with losses_from='training_step': {why}")
        self.recorder: Optional[Z0Recorder] = None
        self._capture: Optional[TrainingLossCapture] = None  # losses_from="auto" when the probe is the training set
        self._capture_ok = True  # every training batch of this epoch gave verified losses (this rank)
        self._capture_problem: Optional[str] = None
        self._pending: Optional[tuple[Z0Result, Optional[InfluenceScores]]] = None  # the last row's artifacts, unwritten
        self._last_write: Optional[tuple[float, float]] = None  # (when the last write ended, its CPU time), CPU seconds
        self._scores_written = False
        self._fallback_warned = False
        self._restored_state: Optional[dict] = None
        self._probe_loader = self._query_loader = None  # Optional[Iterable[Any]], set up per fit

    # -- set-up and checkpointing ------------------------------------------------------------------
    def prepare_fit(self, trainer, pl_module) -> None:
        self._parameters(pl_module)  # a pattern that matches nothing fails now
        snapshots = self.snapshot_dir if self.snapshot_dir is not None else self.output_dir / ".snapshots"
        shard = (trainer.global_rank, trainer.world_size) if self.sharded and trainer.world_size > 1 else None
        recorder_mode = "training_step" if self.losses_from == "training_step" else "probe"
        self.recorder = Z0Recorder(snapshots, recorder_mode, self._options(), warn=rank_zero_warn, shard=shard)
        self._detach_capture()
        self._restored_state = None
        self._pending = self._last_write = None
        self._scores_written = False
        for what, data in (("probe", self.probe), ("queries", self.queries)):
            if data is not None:
                self.check_example_ids(trainer, data, what)
        self._probe_loader = self.probe_loader(trainer, self.probe) if self.probe is not None else None
        self._query_loader = self.probe_loader(trainer, self.queries) if self.queries is not None else None
        if self.snapshot_dir is not None:
            self.on_rank_zero(trainer, lambda: _writable_snapshots(self.snapshot_dir))

    def method_state(self) -> dict:
        if self.recorder is None:
            return {} if self._restored_state is None else dict(self._restored_state)
        state = {**self.recorder.state_dict(), **self.folder_state()}
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and (self.losses_from == "training_step" or self._capture is not None):
            # Lightning saves rank zero's state only: the epoch's training losses so far, buffered
            # per rank, are gathered here (every rank saves) and restored on rank zero alone
            device = trainer.strategy.root_device
            ids, losses = self.gather_by_id(trainer, state["buffer_ids"].to(device), state["buffer_losses"].to(device))
            state.update(buffer_ids=ids.cpu(), buffer_losses=losses.cpu(), buffer_gathered=True)
        return state

    def load_method_state(self, state: dict) -> None:
        if not state:
            return
        self._restored_state = dict(state)  # applied at train start, after setup on every path
        self.restore_folder(state)

    def _options(self) -> dict:
        return {"params": self.params, "every_n_epochs": self.every_n_epochs, "every_n_steps": self.every_n_steps,
                "record_initial": self.record_initial, "keep_snapshots": self.keep_snapshots,
                "losses_requested": self.losses_from}

    # -- hooks ------------------------------------------------------------------------------------
    def start_training(self, trainer, pl_module) -> None:
        if self._restored_state is not None:
            state = dict(self._restored_state)
            if state.get("buffer_gathered") and trainer.global_rank != 0:
                state["buffer_ids"], state["buffer_losses"] = state["buffer_ids"][:0], state["buffer_losses"][:0]
            writes = trainer.is_global_zero or self.recorder.gram.shard is not None  # sharded: every rank has files
            self.all_ranks(trainer, lambda: self.recorder.load_state_dict(state, snapshot_dir=self.snapshot_dir,
                                                                          check_files=writes))
            self._restored_state = None
        elif self.recorder.rows == 0:
            def no_foreign() -> None:
                foreign = self.recorder.gram.foreign_snapshots()
                if foreign:
                    raise FileExistsError(
                        f"Z0Influence(name={self.name!r}): the snapshot folder {self.recorder.gram.directory} already "
                        f"holds {len(foreign)} snapshot files of another recording (e.g. {foreign[0].name}); this library "
                        "never overwrites them. Resume that run from its checkpoint, or pass another snapshot_dir (or "
                        "delete them)."
                    )

            self.on_rank_zero(trainer, no_foreign)  # every rank raises with it
        self.warn_if_steps_never_due(trainer, "every_n_steps", self.every_n_steps, done=trainer.global_step)
        self._start_capture(trainer, pl_module)
        if self.record_initial and self.recorder.rows == 0 and trainer.global_step == 0:
            self._record(trainer, pl_module, epoch=0)

    def start_epoch(self, trainer, pl_module) -> None:
        if self.losses_from == "training_step" or self._capture is not None:  # a row holds the losses of the epoch that ends it
            self.recorder.clear_training_losses()
        if self._capture is not None:
            self._capture_ok = self._capture.attached  # detached: given up for this fit (the first batch failed)
            self._capture.reset_check()

    def before_batch(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._capture is not None and self._capture.attached:
            self._capture.begin(batch)

    def after_batch(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._capture is not None and self._capture.attached:
            self._observe_captured(trainer, outputs, batch)
        if self.losses_from == "training_step":
            ids, losses = self._training_step_losses(outputs, batch)
            padded = self.padded_positions(trainer, int(ids.numel()))
            if padded:  # the sampler's padding duplicates: each example is recorded once
                keep = torch.ones(ids.numel(), dtype=torch.bool)
                keep[padded] = False
                ids, losses = ids[keep.to(ids.device)], losses[keep.to(losses.device)]
            self.recorder.observe_training_losses(ids, losses)
        step = trainer.global_step
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0 and step != self.recorder.last_step:
            self._record(trainer, pl_module, epoch=trainer.current_epoch)

    def end_epoch(self, trainer, pl_module) -> None:
        if self.epoch_due(trainer.current_epoch):
            self._record(trainer, pl_module, epoch=trainer.current_epoch + 1)

    def end_training(self, trainer, pl_module) -> None:
        self._detach_capture()
        self._write_pending(trainer)  # the last row, if its write was left for later
        if self.keep_snapshots:  # snapshots held in memory get their files now
            self.all_ranks(trainer, self.recorder.gram.flush)
        else:
            if self.recorder.gram.shard is not None:  # every rank deletes its own part, then rank zero the folder
                self.all_ranks(trainer, lambda: self.recorder.gram.cleanup(remove_folder=False))
                self.on_rank_zero(trainer, self.recorder.gram.remove_folder)
            else:
                self.on_rank_zero(trainer, self.recorder.cleanup)
        if trainer.is_global_zero and self.recorder.rows >= 2 and _takes_figures(trainer):  # else nothing shows them
            from ..report import read_report

            self.log_images(trainer, [read_report(self.artifact_path("self_influence"), self.top_k)])

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
            epoch = last if self.every_n_steps is not None else max(last - 1, 0)
            self._pending = (result, self._scores(trainer, result, epoch=epoch, step=int(result.steps[-1])))
            self._write_pending(trainer)

    # -- recording --------------------------------------------------------------------------------
    def _record(self, trainer, pl_module, epoch: int) -> None:
        """One row on every rank; ``epoch`` = completed epochs (0 for the initial weights)."""
        training = self._training_row(trainer) if self._capture is not None else None  # gathered, or None: probe pass
        probe, query = self.all_ranks(trainer, lambda: self._local_losses(trainer, pl_module, probe_pass=training is None))
        if training is not None:
            probe = training
        else:
            padding = self.probe_padding(trainer, self.probe) if self.losses_from != "training_step" else 0
            probe = self.gather_by_id(trainer, *probe, padding=padding)
        query = None if query is None else self.gather_by_id(trainer, *query, padding=self.probe_padding(trainer, self.queries))
        query_ids, query_losses = (None, None) if query is None else query
        at_snapshot = self.losses_from != "training_step" and training is None
        row = dict(step=trainer.global_step, epoch=epoch, probe_ids=probe[0], probe_losses=probe[1], query_ids=query_ids,
                   query_losses=query_losses, losses_at="snapshot" if at_snapshot else "training_step")
        params = self._parameters(pl_module)
        with torch.no_grad():
            if self.recorder.gram.shard is not None:
                # sharded: each rank's part of the Gram row from its own pieces, summed over ranks
                parts, shapes = local_parts(params, pl_module, trainer.global_rank)
                if self.recorder.rows == 0:  # rank zero makes the folder, so that one rank knows it did
                    self.on_rank_zero(trainer, self.recorder.gram.ensure_directory)
                partial = self.all_ranks(trainer, lambda: self.recorder.gram.partial_row(parts, shapes))
                total = trainer.strategy.reduce(partial.to(trainer.strategy.root_device), reduce_op="sum")
                self.all_ranks(trainer, lambda: self.recorder.add(**row, params=parts, shapes=shapes, gram_row=total))
            else:
                self.on_rank_zero(trainer, lambda: self.recorder.add(**row, params=params))  # writes the snapshot file
                if trainer.world_size > 1:
                    gram = trainer.strategy.broadcast(self.recorder.gram.gram, src=0)
                    self.all_ranks(trainer, lambda: None if trainer.is_global_zero else self.recorder.add(**row, params=params, gram=gram))
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

    def _parameters(self, pl_module) -> dict[str, Tensor]:
        """The selected parameters, named as in the unwrapped model (FSDP1's wrapper segments
        removed), ``params`` patterns matched against those names."""
        patterns = self.params if isinstance(self.params, list) else None
        chosen = select_parameters(pl_module, None if patterns else self.params, owner=OWNER)
        named = {unwrapped_name(n): p for n, p in chosen.items()}
        if patterns:
            keep = set(select_names(list(named), patterns, what="trainable parameter", owner=OWNER, include_arg="params"))
            named = {n: p for n, p in named.items() if n in keep}
        return named

    def _local_losses(self, trainer, pl_module, probe_pass: bool = True) -> tuple[Optional[tuple[Tensor, Tensor]], Optional[tuple[Tensor, Tensor]]]:
        """This rank's ``(ids, losses)`` of the probe (``None`` without ``probe_pass``: they came
        from the training steps) and of the queries (no collective)."""
        probe = query = None
        if self.losses_from == "training_step":
            ids, losses = self.recorder.pop_training_losses()
            probe = (ids.to(pl_module.device), losses.to(pl_module.device))
        elif not probe_pass and self._query_loader is None:
            return probe, query  # nothing to evaluate: the model's modes are left alone
        with eval_mode(pl_module), torch.no_grad():
            if probe_pass and self.losses_from != "training_step":
                probe = self._evaluate(trainer, pl_module, self._probe_loader, "probe")
            if self._query_loader is not None:
                query = self._evaluate(trainer, pl_module, self._query_loader, "query")
        return probe, query

    def _evaluate(self, trainer, pl_module, loader: Iterable[Any], what: str) -> tuple[Tensor, Tensor]:
        task = self.resolved_task
        fn = task.per_example_loss if what == "probe" else task.measurement
        ids_all = [torch.zeros(0, dtype=torch.long, device=pl_module.device)]
        loss_all = [torch.zeros(0, device=pl_module.device)]
        for batch in loader:
            batch = move_to_device(batch, pl_module.device)
            ids = self._ids(batch, what)
            with trainer.precision_plugin.forward_context():
                loss_all.append(fn(pl_module, batch).float())  # shapes are checked against the ids when recorded
            ids_all.append(ids.to(torch.long))
        return torch.cat(ids_all), torch.cat(loss_all)

    def _ids(self, batch: Any, what: str) -> Tensor:
        ids = self.resolved_task.example_ids(batch)
        if ids is None:
            raise MissingExampleIdsError(f"{OWNER}: a {what} batch carries no example ids; wrap the dataset in lightning_influence."
                                         "IndexedDataset, or define `example_ids(batch)` on your LightningModule or task")
        return ids

    # -- losses read from the training forward (losses_from="auto") -------------------------------
    def _start_capture(self, trainer, pl_module) -> None:
        """With ``losses_from="auto"``, epoch recording and no initial row: read the probe's losses
        from the training forward when the probe is the training set."""
        self._detach_capture()
        self._capture_ok, self._fallback_warned = True, False
        if self.losses_from != "auto" or self.every_n_steps is not None or self.record_initial:
            return
        if not _is_training_set(self.probe, trainer):
            return
        self._capture = TrainingLossCapture(pl_module, self.resolved_task)
        self._capture.attach()

    def _detach_capture(self) -> None:
        if self._capture is not None:
            self._capture.detach()
        self._capture = None

    def release(self, trainer, pl_module, stage: str) -> None:
        self._detach_capture()  # also when training raised: no hook stays on the model

    def _observe_captured(self, trainer, outputs: Any, batch: Any) -> None:
        """Buffer the per-example losses of one training batch: the step's own ``per_example_loss``
        when it returns one, else what the forward hooks read (verified against the step's loss)."""
        step_loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(step_loss, Tensor) and step_loss.numel() == 1 and trainer.accumulate_grad_batches != 1:
            step_loss = step_loss.detach() * trainer.accumulate_grad_batches  # Lightning divides it by that
        explicit = isinstance(outputs, dict) and isinstance(outputs.get("per_example_loss"), Tensor)
        ids = self._training_step_losses(outputs, batch)[0] if explicit else self._ids(batch, "training")
        got = self._capture.end(step_loss if isinstance(step_loss, Tensor) else None, int(ids.numel()))
        losses = outputs["per_example_loss"] if explicit else got.losses
        padded = self.padded_positions(trainer, int(ids.numel()))
        if losses is None or not self._capture_ok:
            if self._capture_ok:
                self._capture_ok, self._capture_problem = False, got.problem
            if self._capture.chosen is None and not explicit:  # no module reproduced the first loss: give up
                self._capture.detach()
            return
        if padded:  # the sampler's padding duplicates: each example is recorded once
            keep = torch.ones(ids.numel(), dtype=torch.bool)
            keep[padded] = False
            ids, losses = ids[keep.to(ids.device)], losses[keep.to(losses.device)]
        if ids.numel() != losses.numel():
            self._capture_ok, self._capture_problem = False, (f"per_example_loss has {losses.numel()} values for "
                                                              f"{ids.numel()} examples")
            return
        self.recorder.observe_training_losses(ids, losses)

    def _training_row(self, trainer) -> Optional[tuple[Tensor, Tensor]]:
        """The probe row from this epoch's training steps, gathered by id (every rank), or ``None``
        when they do not cover the probe exactly once or a step's losses could not be verified:
        then the row comes from the probe pass (warned once)."""
        ok = self._capture_ok and self._capture.consistent()
        problem = None if ok else (getattr(self, "_capture_problem", None)
                                   or "a training step's per-example losses did not add up to its training loss")
        ids, losses = self.recorder.pop_training_losses()
        if not ok:
            ids, losses = ids[:0], losses[:0]
        device = trainer.strategy.root_device
        try:
            ids, losses = self.gather_by_id(trainer, ids.to(device), losses.to(device))
        except DuplicateIdsError:
            ids, losses, problem = ids[:0], losses[:0], "an example was trained on more than once in the epoch"
        n = len(self.probe.dataset if isinstance(self.probe, DataLoader) else self.probe)
        known = self.recorder.probe_ids
        if problem is None and (ids.numel() != n or (known is not None and not torch.equal(known, ids.cpu()))):
            problem = (f"the epoch's training steps covered {ids.numel()} of the {n} probe examples (limit_train_batches, "
                       "drop_last, max_steps or a sampler that leaves examples out)")
        if problem is None:
            return ids, losses
        if not self._fallback_warned:
            self._fallback_warned = True
            rank_zero_warn(f"{OWNER}(name={self.name!r}, losses_from='auto'): the probe is the training set, but its losses "
                           f"could not be read from the training steps at step {trainer.global_step} ({problem}); this row and "
                           "any other such row come from a pass over the probe instead (losses_from='probe' says so "
                           "from the start)")
        return None

    def _training_step_losses(self, outputs: Any, batch: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(outputs, dict) or not isinstance(outputs.get("per_example_loss"), Tensor):
            got = type(outputs).__name__ + (f" with keys {sorted(outputs)}" if isinstance(outputs, dict) else "")
            raise ValueError(f"{OWNER}(losses_from='training_step') needs training_step to return a dict with 'loss' and "
                             f"'per_example_loss' (Tensor[B], summed over tokens) and optionally 'ids'; got {got}")
        ids = outputs.get("ids")
        return (self._ids(batch, "training") if ids is None else ids), outputs["per_example_loss"]

    # -- artifacts --------------------------------------------------------------------------------
    def _scores(self, trainer, result: Z0Result, epoch: Optional[int] = None, step: Optional[int] = None) -> Optional[InfluenceScores]:
        """The probe's self-influence (the ``self_influence`` estimator), once two rows exist;
        ``epoch`` / ``step``: of the last row (default: the trainer's now)."""
        if result.num_checkpoints < 2:
            return None
        return InfluenceScores("z0", result.probe_ids, self_influence=result.self_influence(self.self_influence),
                               epoch=trainer.current_epoch if epoch is None else epoch,
                               step=trainer.global_step if step is None else step,
                               options={"estimator": self.self_influence, "losses_from": self.losses_from, **self._options()},
                               meta={"callback": self.name, "run_id": self.run_id, "checkpoints": result.num_checkpoints,
                                     "epochs_completed": int(result.epochs[-1])})


def _takes_figures(trainer) -> bool:
    """Whether a logger of the trainer takes report figures (TensorBoard, MLflow, W&B)."""
    from .loggers import TRACKERS

    return any(type(lg).__name__ in ("TensorBoardLogger",) + tuple(TRACKERS) for lg in trainer.loggers)


def _is_training_set(probe: Any, trainer) -> bool:
    """Whether ``probe`` (a Dataset or DataLoader) is the training loader's dataset, map-style with
    a length (so that an epoch covers it exactly once unless the run leaves examples out)."""
    data = probe.dataset if isinstance(probe, DataLoader) else probe
    train = getattr(trainer.train_dataloader, "dataset", None)
    return train is not None and train is data and not isinstance(data, IterableDataset) and hasattr(data, "__len__")


def _writable_snapshots(path) -> None:
    from ..run_folder import writable_folder

    for d in writable_folder(path, "Z0Influence(snapshot_dir=...)"):
        d.rmdir()  # created again by the first snapshot, so that the recording knows it may remove it
