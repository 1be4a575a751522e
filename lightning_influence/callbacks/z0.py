"""``Z0Influence``: record what Z0-Inf needs while a Lightning model trains. Connects
:class:`~lightning_influence.z0.recorder.Z0Recorder` (rows, snapshots, the Gram matrix across
ranks) and :mod:`lightning_influence.z0.losses` (the probe's and queries' losses) to the training
loop; all estimation is in :mod:`lightning_influence.z0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from .. import validation as check
from ..layers import unwrapped_name
from ..params import select_parameters
from ..patterns import select_names
from ..scores import InfluenceScores
from ..task import TaskLike
from ..z0.artifact import Z0Result
from ..z0.losses import EpochLosses, drop_positions, step_losses
from ..z0.options import Z0Options
from ..z0.recorder import Z0Recorder
from .base import InfluenceCallback
from .loggers import takes_figures
from .z0_rows import RowWrites

__all__ = ["Z0Influence"]

OWNER = "Z0Influence"


class Z0Influence(RowWrites, InfluenceCallback):
    """Record loss trajectories and the Gram matrix of parameter snapshots for Z0-Inf (the
    recording options go into the frozen :class:`~lightning_influence.z0.options.Z0Options`,
    ``self.options``).

    At every recording point (end of every ``every_n_epochs``-th epoch, or every
    ``every_n_steps``-th optimizer step) it takes the per-example losses of ``probe`` (see
    ``losses_from``) and the ``measurement`` (by default the loss) of ``queries`` (eval mode, no
    gradients, modes restored), gathers them by id across ranks, snapshots the selected
    parameters into ``<folder>/.snapshots`` (extending the ``E × E`` Gram matrix) and, on rank
    zero, rewrites (spaced so that writing costs at most ~1/50 of the run, and at the end)
    ``<folder>/recording`` (kind ``"z0"``; :func:`~lightning_influence.load_z0`; ``.pairwise()``
    gives train-test influence, positive = helps the query) and, from the second row on,
    ``<folder>/self_influence`` (method ``"z0"``, ``>= 0``; :func:`~lightning_influence.load_scores`).
    Metrics (``influence/<name>/``): ``self_mean``, ``self_max``, ``nonfinite``, ``top1_id`` …
    ``top{k}_id``. ``<folder>`` is ``<log dir>/influence/<name>`` unless ``dirpath`` is given.

    Strategies: one process, DDP (rank zero writes snapshots and broadcasts the Gram matrix),
    ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``) and ``ModelParallelStrategy`` (FSDP2): each
    rank writes its part of every snapshot and of each Gram entry, summed over ranks (resume with
    the same number of processes). Parameter names are those of the unwrapped model. DeepSpeed and
    XLA FSDP are refused at ``setup``.

    Args:
        probe: training examples to score (a ``Dataset`` batched with ``probe_batch_size``, or a
            ``DataLoader``) whose batches carry example ids (:class:`~lightning_influence.IndexedDataset`).
            Required unless ``losses_from="training_step"``, where it is refused.
        queries: optional test examples (same rules); needed for train-test influence.
        every_n_epochs: record at the end of every n-th epoch (default 1 without ``every_n_steps``).
        every_n_steps: record after every n-th optimizer step instead.
        params: ``None`` (all trainable parameters), ``"last_layer"`` (the output head) or glob
            pattern(s) (:func:`lightning_influence.params.select_parameters`).
        losses_from: where the probe's losses come from (docs/z0.md): ``"auto"`` (default: from
            the epoch's training forward passes, at the weights of the step that trained on each
            example, when the probe is the training set, recording is per epoch and there is no
            ``record_initial``; else, or when they do not add up to the step's loss, from
            ``"probe"``, with one warning; the manifest's ``probe_losses_at`` says which),
            ``"probe"`` (a pass over the probe in eval mode at each snapshot: the paper's
            estimator) or ``"training_step"`` (no probe: ``training_step`` returns a dict with
            ``"loss"``, ``"per_example_loss"`` ``Tensor[B]`` and optionally ``"ids"``; epoch
            recording, no ``record_initial``).
        record_initial: also record a row at the initial weights (before the first step).
        keep_snapshots: keep the snapshot files after training (for ``Z0Result.snapshot`` and to
            continue a finished run); otherwise the files this recording wrote are deleted at the
            end of training (and its folder when it created it and it is empty).
        self_influence: the estimator of the self-influence artifact and metrics
            (:meth:`~lightning_influence.Z0Result.self_influence`): ``"mean_loss"`` (default),
            ``"variance"`` (the paper's), ``"finite_difference"`` or ``"least_squares"``; the
            recording keeps every estimator available.
        snapshot_dir: where snapshot files go (default ``<folder>/.snapshots``; a resumed run
            reads the recorded folder unless this is given). A folder holding another recording's
            snapshots is refused.
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
        self.options = Z0Options(every_n_steps=every_n_steps, params=params, losses_from=losses_from,
                                 record_initial=record_initial, keep_snapshots=keep_snapshots, snapshot_dir=snapshot_dir,
                                 self_influence=self_influence, owner=OWNER)
        self.probe = check.data_source(OWNER, "probe", probe)
        self.queries = check.data_source(OWNER, "queries", queries)
        if self.options.losses_from != "training_step" and probe is None:
            raise check.InvalidArgumentError(f"{OWNER}(probe=None) needs losses_from='training_step'; with "
                                             f"losses_from={self.options.losses_from!r} pass a probe Dataset or DataLoader")
        if self.options.losses_from == "training_step":
            for arg, bad, why in (("probe", probe is not None, "the losses come from training_step, not from a probe"),
                                  ("every_n_steps", every_n_steps is not None, "a row needs every training example once; use every_n_epochs"),
                                  ("record_initial", record_initial, "no training losses exist before the first step")):
                if bad:
                    raise check.InvalidArgumentError(f"{OWNER}({arg}=...) cannot be used with losses_from='training_step': {why}")
        self.recorder: Optional[Z0Recorder] = None
        self._epoch_losses: Optional[EpochLosses] = None  # losses_from="auto" when the probe is the training set
        self._pending: Optional[tuple[Z0Result, Optional[InfluenceScores]]] = None  # the last row's artifacts, unwritten
        self._last_write: Optional[tuple[float, float]] = None  # (when the last write ended, its CPU time), CPU seconds
        self._scores_written = False
        self._restored_state: Optional[dict] = None
        self._probe_loader = self._query_loader = None  # Optional[Iterable[Any]], set up per fit

    # -- set-up and checkpointing ------------------------------------------------------------------
    @property
    def snapshot_dir(self) -> Optional[Path]:
        """Where snapshot files go when given (``snapshot_dir``), else ``None``."""
        return None if self.options.snapshot_dir is None else Path(self.options.snapshot_dir)

    def prepare_fit(self, trainer, pl_module) -> None:
        self._parameters(pl_module)  # a pattern that matches nothing fails now
        snapshots = self.snapshot_dir if self.snapshot_dir is not None else self.output_dir / ".snapshots"
        shard = (trainer.global_rank, trainer.world_size) if self.sharded and trainer.world_size > 1 else None
        recorder_mode = "training_step" if self.options.losses_from == "training_step" else "probe"
        self.recorder = Z0Recorder(snapshots, recorder_mode, self._options(), warn=rank_zero_warn, shard=shard)
        self.release(trainer, pl_module, "fit")
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
        trainer = self._trainer  # Lightning saves rank zero's state only: buffered losses are gathered
        gather = (trainer is not None and trainer.world_size > 1
                  and (self.options.losses_from == "training_step" or self._epoch_losses is not None))
        return {**self.recorder.state_dict(self.ranks(trainer) if gather else None), **self.folder_state()}

    def load_method_state(self, state: dict) -> None:
        if not state:
            return
        self._restored_state = dict(state)  # applied at train start, after setup on every path
        self.restore_folder(state)

    def _options(self) -> dict:
        return {"params": self.options.params, "every_n_epochs": self.every_n_epochs, "every_n_steps": self.options.every_n_steps,
                "record_initial": self.options.record_initial, "keep_snapshots": self.options.keep_snapshots,
                "losses_requested": self.options.losses_from}

    # -- hooks ------------------------------------------------------------------------------------
    def start_training(self, trainer, pl_module) -> None:
        if self._restored_state is not None:
            state, self._restored_state = self._restored_state, None
            writes = trainer.is_global_zero or self.recorder.gram.shard is not None  # sharded: every rank has files
            self.all_ranks(trainer, lambda: self.recorder.load_state_dict(
                state, snapshot_dir=self.snapshot_dir, check_files=writes, primary=trainer.global_rank == 0))
        elif self.recorder.rows == 0:  # every rank raises with rank zero
            self.on_rank_zero(trainer, lambda: self.recorder.gram.refuse_foreign(f"{OWNER}(name={self.name!r})"))
        self.warn_if_steps_never_due(trainer, "every_n_steps", self.options.every_n_steps, done=trainer.global_step)
        self.release(trainer, pl_module, "fit")
        if (self.options.losses_from == "auto" and self.options.every_n_steps is None and not self.options.record_initial
                and _is_training_set(self.probe, trainer)):
            self._epoch_losses = EpochLosses(self.recorder, self.resolved_task, f"{OWNER}(name={self.name!r}, losses_from='auto')")
            self._epoch_losses.start(pl_module)
        if self.options.record_initial and self.recorder.rows == 0 and trainer.global_step == 0:
            self._record(trainer, pl_module, epoch=0)

    def start_epoch(self, trainer, pl_module) -> None:
        if self.options.losses_from == "training_step" or self._epoch_losses is not None:  # a row holds the losses of the epoch that ends it
            self.recorder.clear_training_losses()
        if self._epoch_losses is not None:
            self._epoch_losses.begin_epoch()

    def before_batch(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._epoch_losses is not None:
            self._epoch_losses.begin_batch(batch)

    def after_batch(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._epoch_losses is not None:
            self._epoch_losses.after_batch(outputs, batch, trainer.accumulate_grad_batches,
                                           lambda n: self.padded_positions(trainer, n))
        if self.options.losses_from == "training_step":
            ids, losses = step_losses(outputs, batch, self.resolved_task, OWNER)
            ids, losses = drop_positions(ids, losses, self.padded_positions(trainer, int(ids.numel())))
            self.recorder.observe_training_losses(ids, losses)
        step = trainer.global_step
        if self.options.every_n_steps is not None and step > 0 and step % self.options.every_n_steps == 0 and step != self.recorder.last_step:
            self._record(trainer, pl_module, epoch=trainer.current_epoch)

    def end_epoch(self, trainer, pl_module) -> None:
        if self.epoch_due(trainer.current_epoch):
            self._record(trainer, pl_module, epoch=trainer.current_epoch + 1)

    def end_training(self, trainer, pl_module) -> None:
        self.release(trainer, pl_module, "fit")
        self._write_pending(trainer)  # the last row, if its write was left for later
        self.recorder.finish_files(self.ranks(trainer), keep=self.options.keep_snapshots)
        if trainer.is_global_zero and self.recorder.rows >= 2 and takes_figures(trainer):  # else nothing shows them
            from ..report import read_report

            self.log_images(trainer, [read_report(self.artifact_path("self_influence"), self.top_k)])

    def _parameters(self, pl_module) -> dict[str, Tensor]:
        """The selected parameters, named as in the unwrapped model (FSDP1's wrapper segments
        removed), ``params`` patterns matched against those names."""
        patterns = self.options.params if isinstance(self.options.params, list) else None
        chosen = select_parameters(pl_module, None if patterns else self.options.params, owner=OWNER)
        named = {unwrapped_name(n): p for n, p in chosen.items()}
        if patterns:
            keep = set(select_names(list(named), patterns, what="trainable parameter", owner=OWNER, include_arg="params"))
            named = {n: p for n, p in named.items() if n in keep}
        return named

    def release(self, trainer, pl_module, stage: str) -> None:
        if self._epoch_losses is not None:  # also when training raised: no hook stays on the model
            self._epoch_losses.detach()
        self._epoch_losses = None

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
