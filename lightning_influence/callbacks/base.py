"""The shared base of every influence callback (template method: the base implements every
Lightning hook; subclasses implement the named steps it calls: ``prepare_fit``, ``start_fit``,
``start_training``, ``start_epoch``, ``before_batch``, ``after_batch``, ``end_epoch``,
``end_training``, ``finish_fit``, ``finish_skipped_fit``, ``release``, ``method_state`` /
``load_method_state``).

The base owns: the ``name`` (checkpoint ``state_key``, output folder ``<log dir>/influence/<name>``
or ``dirpath``, metric prefix ``influence/<name>/``); artifact paths (``<folder>/epoch=NNNN/`` for
per-epoch results); ``every_n_epochs`` gating; set-up checks (strategy, writable folder not shared
with another callback, probe ids, gating that never fires); resuming (the folder and run id are
checkpointed; a resume whose training loop Lightning skips finishes in ``on_fit_end``); the
ranking metrics; and at the end of fit the shared outputs (:func:`.outputs.publish_outputs`).
Collectives and probe splitting are :mod:`lightning_influence.distributed`'s; a method that may
run one must be called on every rank.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from .. import validation as check
from ..data import DuplicateIdsError  # re-exported
from ..distributed import UnsupportedStrategyError, check_sharded_model, check_strategy, strategy_family  # re-exported
from ..run_folder import OutputFolderError, remove_empty_folders, writable_folder
from ..task import TaskLike, resolve_task
from .outputs import publish_outputs
from .toolbox import CallbackToolbox, epoch_dirname  # epoch_dirname re-exported

__all__ = ["InfluenceCallback", "DuplicateIdsError", "OutputFolderError", "UnsupportedStrategyError", "epoch_dirname",
           "strategy_family"]

class InfluenceCallback(CallbackToolbox, Callback):
    """Base class of :class:`EKFACInfluence`, :class:`Z0Influence` and :class:`LiSSASelfInfluence`.

    Args:
        name: names the callback's state in checkpoints, its output folder and its metric
            prefix; give two instances of one method different names.
        dirpath: the output folder (default ``<log dir>/influence/<name>``, or
            ``<default_root_dir>/influence/<name>`` without a logger).
        every_n_epochs: per-epoch work every ``n`` epochs (after epochs ``n-1, 2n-1, ...``,
            0-based); ``None``: none.
        probe_batch_size: batch size for probe / query sets given as a ``Dataset`` (a
            ``DataLoader`` keeps its own).
        top_k: how many top ids to log as metrics.
        task: how to read batches (default: the LightningModule's methods, else by batch layout).
    """

    method: ClassVar[str] = "influence"
    sharded_support: ClassVar[tuple[str, ...]] = ()
    """Sharded strategy families (see :func:`strategy_family`) this callback runs under; it is
    refused at ``setup`` under the others."""
    sharded_refusal: ClassVar[str] = ""
    """What to do instead, for the refusal message."""

    def __init__(
        self,
        *,
        name: str,
        dirpath: Optional[str] = None,
        every_n_epochs: Optional[int] = None,
        probe_batch_size: int = 256,
        top_k: int = 10,
        task: Optional[TaskLike] = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.name = check.artifact_name(owner, "name", name)
        self.dirpath = check.optional_path(owner, "dirpath", dirpath)
        self.every_n_epochs = check.positive_int(owner, "every_n_epochs", every_n_epochs, allow_none=True)
        self.probe_batch_size = check.positive_int(owner, "probe_batch_size", probe_batch_size)
        self.top_k = check.non_negative_int(owner, "top_k", top_k)
        if task is not None:
            resolve_task(None, task)  # checks the required methods now, not after training
        self.task = task
        self.output_dir: Optional[Path] = None
        self.resolved_task: Optional[TaskLike] = None
        self.run_id: Optional[str] = None
        self._recorded_dir: Optional[Path] = None  # the folder a checkpoint recorded
        self._restored = False  # state came from a checkpoint in this fit
        self._loop_ran = False  # Lightning ran the training loop in this fit
        self._epoch_position = 0  # examples of the training loader seen in this epoch on this rank
        self._trainer: Any = None
        self.sharded = False  # the strategy shards parameters (FSDP / FSDP2): forward passes are collectives

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # -- Lightning hooks: the base's alone, each calls the named step below -------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        # before any collective: every rank refuses alike
        self.sharded = check_strategy(trainer, type(self).__name__, self.sharded_support, self.sharded_refusal)
        self._trainer = trainer
        self._restored = self._loop_ran = False
        self._recorded_dir = None
        self.output_dir = self._output_dir(trainer)  # collective: every rank
        # every task method the method's options will call, checked before step 0
        self.resolved_task = resolve_task(pl_module, self.task, needs=getattr(getattr(self, "options", None), "task_needs", ()))
        self.prepare_fit(trainer, pl_module)
        self._check_own_folder(trainer)
        self.run_id = self._broadcast(trainer, uuid.uuid4().hex)
        self._warn_if_never_due(trainer)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.sharded:
            check_sharded_model(trainer, pl_module, type(self).__name__)
        self.start_fit(trainer, pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._loop_ran = True
        self._epoch_position = 0  # Lightning iterates the training loader from its start
        self.start_training(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_position = 0
        self.start_epoch(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.before_batch(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after_batch(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.end_epoch(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.end_training(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Finish what a skipped resume left undone (every rank), then save the rendered top
        examples, the HTML report and tracker copies (rank zero; never raises)."""
        if self._restored and not self._loop_ran:
            device = pl_module.device
            pl_module.to(trainer.strategy.root_device)  # Lightning's teardown moved it to the CPU
            try:
                self.finish_skipped_fit(trainer, pl_module)
            finally:
                pl_module.to(device)
        self.finish_fit(trainer, pl_module)
        influence = [c for c in trainer.callbacks if isinstance(c, InfluenceCallback) and c.output_dir is not None]
        publish_outputs(self, trainer, pl_module, influence)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.release(trainer, pl_module, stage)

    def state_dict(self) -> dict:
        return self.method_state()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.load_method_state(state)

    # -- the steps subclasses implement ---------------------------------------------------------
    def prepare_fit(self, trainer: Any, pl_module: Any) -> None:
        """At ``setup("fit")``, once the output folder and task are known (every rank)."""

    def start_fit(self, trainer: Any, pl_module: Any) -> None:
        """At ``on_fit_start``: the strategy has wrapped the model (``configure_model`` ran)."""

    def start_training(self, trainer: Any, pl_module: Any) -> None:
        """At ``on_train_start`` (not when a resume skips the training loop)."""

    def start_epoch(self, trainer: Any, pl_module: Any) -> None:
        """At ``on_train_epoch_start``."""

    def before_batch(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """At ``on_train_batch_start``."""

    def after_batch(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """At ``on_train_batch_end``."""

    def end_epoch(self, trainer: Any, pl_module: Any) -> None:
        """At ``on_train_epoch_end``."""

    def end_training(self, trainer: Any, pl_module: Any) -> None:
        """At ``on_train_end``: end-of-training results."""

    def finish_fit(self, trainer: Any, pl_module: Any) -> None:
        """At ``on_fit_end``, before the shared outputs: work that needs every callback's
        end-of-training results (e.g. an index from another callback's final factors)."""

    def finish_skipped_fit(self, trainer: Any, pl_module: Any) -> None:
        """At ``on_fit_end`` when a resume skipped the training loop (``max_epochs`` or
        ``max_steps`` reached): write what the interrupted run did not (model on its device)."""

    def release(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """At ``teardown`` (also after a failure): remove hooks from the model."""

    def method_state(self) -> dict:
        """What the callback keeps in checkpoints (``{}``: nothing)."""
        return {}

    def load_method_state(self, state: dict) -> None:
        """Restore :meth:`method_state` from a checkpoint (only called with a non-empty one)."""

    # -- set-up and resuming -------------------------------------------------------------------
    def _output_dir(self, trainer: Any) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        base = trainer.log_dir if trainer.loggers else None  # broadcasts from rank zero
        return Path(base if base is not None else trainer.default_root_dir) / "influence" / self.name

    def _check_own_folder(self, trainer: Any) -> None:
        """No influence callback set up before this one in the trainer writes into the same
        folder, and rank zero can write there (checked now, not at the end of fit)."""
        for other in trainer.callbacks:
            if other is self:
                break
            if isinstance(other, InfluenceCallback) and other.output_dir is not None and other.output_dir == self.output_dir:
                raise OutputFolderError(
                    f"{type(self).__name__}(name={self.name!r}) and {type(other).__name__}(name={other.name!r}) would both "
                    f"write into {self.output_dir}; give them different names or dirpaths"
                )
        created = self.on_rank_zero(trainer, lambda: writable_folder(self.output_dir, f"{type(self).__name__}(name={self.name!r})"))
        self._created_dirs = created or []

    def _warn_if_never_due(self, trainer: Any) -> None:
        max_epochs = trainer.max_epochs
        if self.every_n_epochs is not None and max_epochs is not None and 0 <= max_epochs < self.every_n_epochs:
            rank_zero_warn(
                f"{type(self).__name__}(every_n_epochs={self.every_n_epochs}) never fires in this run: max_epochs="
                f"{max_epochs}; lower every_n_epochs or raise max_epochs"
            )

    def folder_state(self) -> dict[str, Any]:
        """What every callback keeps in checkpoints besides its own state: its folder and run id."""
        return {"name": self.name, "folder": None if self.output_dir is None else str(self.output_dir), "run_id": self.run_id}

    def restore_folder(self, state: Mapping[str, Any]) -> None:
        """Continue in the folder and under the run id a checkpoint recorded (an explicit
        ``dirpath`` wins over the recorded folder); says so once when the folder differs from
        the one this run would have used (e.g. a new logger version)."""
        self._restored = True
        if state.get("run_id"):
            self.run_id = str(state["run_id"])
        saved = state.get("folder")
        if not saved or self.dirpath is not None:
            return
        saved = Path(saved)
        self._recorded_dir = saved
        if self.output_dir is not None and saved != self.output_dir:
            fresh = self.output_dir
            rank_zero_warn(
                f"{type(self).__name__}(name={self.name!r}): resuming into the folder the checkpoint recorded, {saved} "
                f"(this run alone would have written to {fresh})"
            )
            made = {d for cb in getattr(self._trainer, "callbacks", [self]) if isinstance(cb, InfluenceCallback)
                    for d in getattr(cb, "_created_dirs", [])}
            remove_empty_folders(fresh, made)  # made by the set-up checks (rank zero)
        self.output_dir = saved
