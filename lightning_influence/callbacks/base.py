"""The shared base of every influence callback: what users see, and the distributed plumbing.

:class:`InfluenceCallback` owns, once for all methods:

* the callback's ``name``: its ``state_key`` (so several instances run in one Trainer), its output
  folder ``<log dir>/influence/<name>/`` (or ``dirpath``) and its metric prefix
  ``influence/<name>/``;
* artifact locations: ``<folder>/<artifact>`` at the end of fit, ``<folder>/epoch=NNNN/<artifact>``
  for per-epoch results;
* epoch gating (``every_n_epochs``);
* probe loaders under DDP: a map-style dataset is split across ranks by striding (rank ``r``
  takes examples ``r, r + W, ...``), never padded, so every example is scored exactly once and
  any repeated id is the data's own mistake;
* gathering per-example results by id on every rank, with duplicate ids reported;
* failures: a step that raises on one rank raises on every rank, so none waits in a collective;
* one ranking rule for metrics: ``self_mean``, ``self_max`` and ``top1_id`` … ``top{k}_id``
  (1-based ranks, ``nan`` never ranked);
* constructor validation of the shared arguments; at ``setup``: the output folder is writable,
  no two influence callbacks of the trainer share it, probes carry ids, and gating that would
  never fire in the configured run is warned about;
* resuming: the folder is recorded in checkpoints (a resumed run under a new logger version
  keeps writing where the run began), and a resumed run whose training loop Lightning skips
  (``max_epochs`` already reached) finishes in ``on_fit_end`` the end-of-fit work the
  interrupted run did not (:meth:`InfluenceCallback.finish_skipped_fit`);
* the positions of a distributed sampler's padding duplicates in each training batch;
* strategies: each subclass names the sharded strategies it runs under
  (:attr:`InfluenceCallback.sharded_support`) and is refused at ``setup`` under the others with
  a message that says what to do (:class:`UnsupportedStrategyError`). Under a sharded strategy
  (FSDP, FSDP2) every forward pass is a collective, so every rank runs the same number of them:
  probes are padded to equal shares (the repeats are dropped when gathering by id).

Subclasses are thin adapters: validate their own arguments, build core objects, and forward
Lightning hooks to them. Every method here that may run a collective must be called on all ranks.
"""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, TypeVar

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset
from torch.utils.data.distributed import DistributedSampler

from .. import validation as check
from ..data import DuplicateIdsError  # defined without Lightning (build_index raises it too); re-exported here
from ..randomness import RandomnessKeepingLoader
from ..ranking import top_examples
from ..storage import ArtifactError, read_artifact, read_manifest
from ..task import MissingExampleIdsError, TaskLike, resolve_task
from .loggers import log_figures, log_metrics
from .outputs import publish_outputs

__all__ = ["InfluenceCallback", "DuplicateIdsError", "OutputFolderError", "UnsupportedStrategyError", "epoch_dirname",
           "strategy_family", "SHARDED_FAMILIES"]

T = TypeVar("T")


class OutputFolderError(OSError):
    """An output folder cannot be written, or two callbacks would write into the same one."""


class UnsupportedStrategyError(RuntimeError):
    """The training strategy is one this callback cannot run under (the message says what to do)."""


SHARDED_FAMILIES = {
    "FSDPStrategy": "fsdp",
    "ModelParallelStrategy": "fsdp2",
    "DeepSpeedStrategy": "deepspeed",
    "XLAFSDPStrategy": "xla_fsdp",
}
"""Lightning strategy class name → the family of parameter sharding it does. Matched by name along
the strategy's class hierarchy, so subclasses count and optional packages (DeepSpeed, XLA) are
never imported."""

STRATEGY_NAMES = {"fsdp": "FSDPStrategy", "fsdp2": "ModelParallelStrategy", "deepspeed": "DeepSpeedStrategy",
                  "xla_fsdp": "XLAFSDPStrategy"}


def strategy_family(trainer: Any) -> str:
    """``"fsdp"`` (FSDP1), ``"fsdp2"`` (``ModelParallelStrategy``: ``fully_shard``), ``"deepspeed"``,
    ``"xla_fsdp"``, or ``"replicated"`` (one process, DDP and every strategy that keeps whole
    parameters on every rank)."""
    for klass in type(trainer.strategy).__mro__:
        family = SHARDED_FAMILIES.get(klass.__name__)
        if family is not None:
            return family
    return "replicated"


def epoch_dirname(epoch: int) -> str:
    """Folder of per-epoch artifacts: ``epoch=0003`` for 0-based epoch 3."""
    return f"epoch={epoch:04d}"


class InfluenceCallback(Callback):
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

    # -- identity ------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def metric(self, key: str) -> str:
        """Full metric name: ``influence/<name>/<key>``."""
        return f"influence/{self.name}/{key}"

    # -- set-up --------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.sharded = self.check_strategy(trainer)  # before any collective: every rank refuses alike
        self._trainer = trainer
        self._restored = self._loop_ran = False
        self._recorded_dir = None
        self.output_dir = self._output_dir(trainer)  # collective: every rank
        self.resolved_task = resolve_task(pl_module, self.task)
        self.prepare_fit(trainer, pl_module)
        self._check_own_folder(trainer)
        self.run_id = self._broadcast(trainer, uuid.uuid4().hex)
        self._warn_if_never_due(trainer)

    # -- the steps subclasses implement (the Lightning hooks are the base's alone) -------------
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

    def release(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """At ``teardown`` (also after a failure): remove hooks from the model."""

    def method_state(self) -> dict:
        """What the callback keeps in checkpoints (``{}``: nothing)."""
        return {}

    def load_method_state(self, state: dict) -> None:
        """Restore :meth:`method_state` from a checkpoint (only called with a non-empty one)."""

    # -- strategies ------------------------------------------------------------------------------
    def check_strategy(self, trainer: Any) -> bool:
        """Refuse a sharded strategy this callback does not support (:attr:`sharded_support`),
        and FSDP2 with tensor parallelism (layer hooks would see slices of the activations).

        Returns:
            Whether parameters are sharded (FSDP or FSDP2), so that every forward pass is a
            collective every rank must take part in.

        Raises:
            UnsupportedStrategyError: the message names the strategy and what to do instead.
        """
        family = strategy_family(trainer)
        if family == "replicated":
            return False
        owner = type(self).__name__
        strategy = type(trainer.strategy).__name__
        if family not in self.sharded_support:
            kind = STRATEGY_NAMES[family] + ("" if strategy == STRATEGY_NAMES[family] else f" ({strategy})")
            raise UnsupportedStrategyError(f"{owner} does not support {kind}: {self.sharded_refusal}")
        mesh = getattr(trainer.strategy, "_device_mesh", None)
        names = getattr(mesh, "mesh_dim_names", None) or ()
        if family == "fsdp2" and "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise UnsupportedStrategyError(
                f"{owner} does not support tensor parallelism (ModelParallelStrategy(tensor_parallel_size="
                f"{mesh['tensor_parallel'].size()})): it splits activations and parameters along their feature "
                "dimensions, which this library does not read. Use tensor_parallel_size=1 (FSDP2 data parallelism: "
                "fully_shard in configure_model)."
            )
        return True

    def check_sharded_model(self, trainer: Any, pl_module: Any) -> None:
        """At ``on_fit_start``, once the strategy has wrapped the model: under FSDP1, refuse what
        the callback's own passes (which call the LightningModule, not Lightning's wrapper) cannot
        run: ``use_orig_params=False`` (the modules then hold no parameters of their own) and
        parameters in the unit that wraps the whole LightningModule (sharded, and gathered only
        when Lightning calls the model through that wrapper); then initialise the outermost units
        (FSDP1 does so lazily at the first training forward; a pass before it, such as Z0's
        ``record_initial``, would make inner units initialise as roots).

        Raises:
            UnsupportedStrategyError: the message names the parameters and the fix.
        """
        if strategy_family(trainer) != "fsdp":
            return
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        owner = type(self).__name__
        root = trainer.strategy.model
        units = [m for m in [root, *pl_module.modules()] if isinstance(m, FSDP)]
        if any(not getattr(u, "_use_orig_params", True) for u in units):
            raise UnsupportedStrategyError(
                f"{owner} under FSDPStrategy needs use_orig_params=True (Lightning's default), so that every module "
                "keeps its own parameters; do not pass use_orig_params=False"
            )
        handle = getattr(root, "_handle", None) if isinstance(root, FSDP) and root is not pl_module else None
        if handle is not None and handle.uses_sharded_strategy and list(getattr(handle.flat_param, "_fqns", []) or []):
            from ..layers import unwrapped_name

            names = [unwrapped_name(n) for n in handle.flat_param._fqns]
            raise UnsupportedStrategyError(
                f"{owner} under FSDPStrategy: the parameters {names[:8]}{' ...' if len(names) > 8 else ''} are in the "
                "FSDP unit that wraps the whole LightningModule, which gathers them only when Lightning calls the model "
                "through its wrapper, but the callback's own passes call the LightningModule. Give the modules that own "
                "them units of their own: FSDPStrategy(auto_wrap_policy={...}) naming their types (e.g. {nn.Linear, "
                "nn.Embedding} or your block class), or wrap them in configure_model; or use ModelParallelStrategy "
                "(FSDP2) with fully_shard on each block."
            )
        # FSDP1 initialises lazily from the first forward of the outermost unit, which Lightning's
        # training step makes; a pass of the callback's own before it (Z0's record_initial) would
        # make the inner units initialise as roots. summon_full_params initialises the outermost
        # units (its own parameters only: the check above leaves none in the one around the module).
        for outer in FSDP.fsdp_modules(root, root_only=True):
            with FSDP.summon_full_params(outer, recurse=False, writeback=False):
                pass

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.sharded:
            self.check_sharded_model(trainer, pl_module)
        self.start_fit(trainer, pl_module)

    def _output_dir(self, trainer: Any) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        base = trainer.log_dir if trainer.loggers else None  # broadcasts from rank zero
        return Path(base if base is not None else trainer.default_root_dir) / "influence" / self.name

    @staticmethod
    def _broadcast(trainer: Any, obj: T) -> T:
        return trainer.strategy.broadcast(obj, src=0) if trainer.world_size > 1 else obj

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

    def warn_if_steps_never_due(self, trainer: Any, argument: str, every: Optional[int], done: int = 0) -> None:
        """Warn (at ``on_train_start``, once the number of batches is known) when step gating
        ``argument=every`` never fires: its next firing after optimizer step ``done`` (the next
        multiple of ``every``) lies beyond the run's estimated steps."""
        if every is None:
            return
        try:
            total = int(trainer.estimated_stepping_batches)
        except Exception:  # pragma: no cover - unsized loaders: nothing to compare with
            return
        if 0 < total < (done // every + 1) * every:
            rank_zero_warn(f"{type(self).__name__}({argument}={every}) never fires in this run: it lasts about {total} "
                           f"optimizer steps; lower {argument}")

    def check_example_ids(self, trainer: Any, data: Any, what: str = "probe") -> None:
        """Raise :class:`MissingExampleIdsError` (on every rank) when the first batch of ``data``
        carries no example ids: at ``setup``, before any training."""

        def check() -> None:
            batch = next(iter(self.probe_loader(trainer, data)), None)
            if batch is not None and self.resolved_task.example_ids(batch) is None:
                raise MissingExampleIdsError(
                    f"{type(self).__name__}({what}=...): the {what}'s batches carry no example ids, so scores could not "
                    "be matched to examples; wrap the dataset in lightning_influence.IndexedDataset (items become "
                    "(index, example)), or define example_ids(batch) on the LightningModule or task"
                )

        self.all_ranks(trainer, check)

    # -- checkpoints and resuming ----------------------------------------------------------------
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
            for d in [fresh, *fresh.parents]:  # made by the set-up checks (rank zero): removed while empty
                try:
                    if d not in made:
                        break
                    d.rmdir()
                except OSError:
                    break
        self.output_dir = saved

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

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.release(trainer, pl_module, stage)

    def state_dict(self) -> dict:
        return self.method_state()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.load_method_state(state)

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
        publish_outputs(self, trainer, pl_module)

    def finish_fit(self, trainer: Any, pl_module: Any) -> None:
        """Subclass hook: end-of-fit work that needs the whole run's results (e.g. an index built
        from another callback's final factors). Runs on every rank in ``on_fit_end``, before the
        shared outputs (rendered examples, HTML report), so subclasses never override
        ``on_fit_end`` and skip them."""

    def finish_skipped_fit(self, trainer: Any, pl_module: Any) -> None:
        """Subclass hook: Lightning restored a checkpoint and skipped the training loop (its
        ``max_epochs`` or ``max_steps`` was already reached), so ``on_train_end`` does not run;
        write what the interrupted run did not. Runs on every rank in ``on_fit_end``, with the
        model on the strategy's device."""

    def artifact_is_current(self, trainer: Any, path: Path, step_key: str = "step") -> bool:
        """Whether ``path`` holds a complete artifact that this run (same run id) wrote at the
        current global step: decided on rank zero, the same answer on every rank."""

        def current() -> bool:
            m = read_manifest(path)
            if m is None:
                return False
            meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
            if meta.get("run_id") != self.run_id or (meta.get(step_key, m.get(step_key)) != trainer.global_step):
                return False
            try:
                read_artifact(path)
            except ArtifactError:
                return False
            return True

        return bool(self._broadcast(trainer, current() if trainer.is_global_zero else None))

    def write_scores(self, trainer: Any, scores: Any, path: Path) -> None:
        """Write ``scores`` (:class:`~lightning_influence.InfluenceScores`) at ``path`` on rank
        zero. Scores another method wrote there are never replaced (``ArtifactError``)."""
        from ..scores import save_scores

        def write() -> None:
            old = read_manifest(path)
            if old is not None and old.get("kind") == "scores" and old.get("method") != scores.method:
                raise ArtifactError(
                    f"{type(self).__name__}(name={self.name!r}) refuses to replace {path}: it holds {old.get('method')!r} "
                    f"scores, not {scores.method!r} ones; give the callback another name or dirpath"
                )
            save_scores(scores, path, top_k=max(self.top_k, 1))

        self.on_rank_zero(trainer, write)

    # -- distributed samplers ----------------------------------------------------------------------
    def padded_positions(self, trainer: Any, batch_size: int) -> list[int]:
        """Positions in this rank's next training batch (of ``batch_size`` examples; call once
        per batch, in order) of the duplicates a ``DistributedSampler`` (``drop_last=False``) pads
        with so that every rank gets as many examples: the sampler's global positions
        ``len(dataset)`` and up, which are the last example of the last ranks. Positions count
        the examples the loader yielded since the epoch (or a resumed run) started, which is where
        Lightning's iteration of the loader starts. Empty on one process or without such a
        sampler."""
        start = self._epoch_position
        self._epoch_position += batch_size
        if trainer.world_size <= 1:
            return []
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            return []
        n_data = len(sampler.dataset)
        if sampler.total_size <= n_data:
            return []
        world, rank = sampler.num_replicas, sampler.rank
        return [i for i in range(batch_size) if (start + i) * world + rank >= n_data]


    def artifact_path(self, artifact: str, epoch: Optional[int] = None) -> Path:
        """``<folder>/<artifact>``, or ``<folder>/epoch=NNNN/<artifact>`` for a per-epoch result."""
        if self.output_dir is None:
            raise RuntimeError(f"{type(self).__name__} has no output folder before setup('fit')")
        return self.output_dir / artifact if epoch is None else self.output_dir / epoch_dirname(epoch) / artifact

    # -- gating --------------------------------------------------------------------------------
    @staticmethod
    def last_epoch(trainer: Any) -> int:
        """0-based index of the last epoch that ran, at the end of fit (Lightning has already
        advanced ``current_epoch`` past it by ``on_train_end``)."""
        return max(int(trainer.current_epoch) - 1, 0)

    def epoch_due(self, epoch: int) -> bool:
        """Whether per-epoch work runs after 0-based ``epoch`` (see ``every_n_epochs``)."""
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    # -- metrics and figures --------------------------------------------------------------------
    def log_metrics(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        """Log ``{key: value}`` as ``influence/<name>/<key>`` to every logger."""
        log_metrics(trainer, {self.metric(k): v for k, v in metrics.items()})

    def ranking_metrics(self, ids: Tensor, scores: Tensor) -> dict[str, float]:
        """``self_mean``, ``self_max`` (over finite scores), ``nonfinite`` (count) and
        ``top1_id`` … ``top{k}_id`` (1-based ranks, highest score first)."""
        s = scores.detach().double().cpu()
        finite = s[torch.isfinite(s)]
        out = {"nonfinite": float(s.numel() - finite.numel())}
        if finite.numel():
            out.update(self_mean=float(finite.mean()), self_max=float(finite.max()))
        for rank, (i, _) in enumerate(top_examples(ids.cpu(), s, self.top_k), 1):
            out[f"top{rank}_id"] = float(i)
        return out

    def log_images(self, trainer: Any, reports: list) -> None:
        """Log report figures (rank zero; TensorBoard, MLflow and W&B loggers)."""
        log_figures(trainer, reports)

    # -- probes under DDP -----------------------------------------------------------------------
    def probe_loader(self, trainer: Any, data: Any) -> Iterable[Any]:
        """:meth:`probe_batches` wrapped so that every pass over it leaves the global random
        states as they were (:class:`~lightning_influence.randomness.RandomnessKeepingLoader`):
        a probe pass during training never changes training's shuffles, dropout or augmentations."""
        return RandomnessKeepingLoader(self.probe_batches(trainer, data))

    def probe_batches(self, trainer: Any, data: Any) -> Iterable[Any]:
        """Batches of ``data`` (a ``Dataset`` or ``DataLoader``) for this rank.

        One process: ``data`` itself (a ``Dataset`` batched with ``probe_batch_size``, in order).
        Several: a map-style dataset is strided across ranks without padding; an iterable one is
        split by batch (rank ``r`` takes batches ``r, r + W, ...``). Under a sharded strategy
        every forward pass is a collective, so every rank gets ``ceil(n / W)`` examples: the
        shorter shares are padded with the dataset's first examples (:meth:`probe_padding`
        repeats in all, dropped again by :meth:`gather_by_id`), and an iterable dataset, whose
        shares cannot be evened out, is refused.

        Raises:
            InvalidArgumentError: an iterable dataset under a sharded strategy.
        """
        if isinstance(data, DataLoader):
            dataset, batch_size, kw = data.dataset, data.batch_size, {"collate_fn": data.collate_fn, "num_workers": data.num_workers}
            if trainer.world_size <= 1:
                return data
        else:
            dataset, batch_size, kw = data, self.probe_batch_size, {}
        world, rank = trainer.world_size, trainer.global_rank
        if isinstance(dataset, IterableDataset):
            if self.sharded and world > 1:
                raise check.InvalidArgumentError(
                    f"{type(self).__name__}: an iterable probe dataset cannot be split into equal shares, which a sharded "
                    "strategy needs (every forward pass is a collective); pass a map-style Dataset"
                )
            loader = data if isinstance(data, DataLoader) else DataLoader(dataset, batch_size=batch_size, **kw)
            return loader if world <= 1 else _Strided(loader, rank, world)
        if world > 1:
            indices = list(range(rank, len(dataset), world))
            if self.sharded:
                indices += list(range(-(-len(dataset) // world) - len(indices)))
            dataset = Subset(dataset, indices)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, **kw)

    def probe_padding(self, trainer: Any, data: Any) -> int:
        """How many repeated examples :meth:`probe_loader` adds over all ranks (0 unless the
        strategy is sharded): pass it to :meth:`gather_by_id`."""
        dataset = data.dataset if isinstance(data, DataLoader) else data
        if not self.sharded or trainer.world_size <= 1 or isinstance(dataset, IterableDataset):
            return 0
        n, world = len(dataset), trainer.world_size
        return -(-n // world) * world - n

    def gather_by_id(self, trainer: Any, ids: Tensor, values: Tensor, padding: int = 0) -> tuple[Tensor, Tensor]:
        """Gather per-example rows from every rank and sort them by id (identical on every rank).

        Args:
            ids: ``LongTensor[n_local]`` (lengths may differ across ranks).
            values: ``Tensor[n_local, ...]`` rows matching ``ids``.
            padding: how many repeated ids are expected (a distributed sampler's padding); the
                first row of each is kept.

        Raises:
            DuplicateIdsError: more repeated ids than ``padding``; the message lists them.
        """
        ids = ids.reshape(-1).long()
        if trainer.world_size > 1:
            n = torch.tensor([ids.numel()], device=ids.device)
            sizes = trainer.strategy.all_gather(n).reshape(-1).tolist()
            longest = max(int(s) for s in sizes)
            pad = longest - ids.numel()
            all_ids = trainer.strategy.all_gather(torch.cat([ids, ids.new_full((pad,), -1)]))
            all_vals = trainer.strategy.all_gather(torch.cat([values, values.new_zeros((pad,) + tuple(values.shape[1:]))]))
            keep = torch.cat([torch.arange(int(s), device=all_ids.device) + r * longest for r, s in enumerate(sizes)])
            ids = all_ids.reshape(-1)[keep]
            values = all_vals.reshape((-1,) + tuple(values.shape[1:]))[keep]
        order = torch.argsort(ids, stable=True)
        ids, values = ids[order], values[order]
        first = torch.ones_like(ids, dtype=torch.bool)
        first[1:] = ids[1:] != ids[:-1]
        repeated = int((~first).sum())
        if repeated > padding:
            dup = torch.unique(ids[~first])[:10].tolist()
            raise DuplicateIdsError(
                f"{type(self).__name__}: {repeated} examples repeat an id of another example (e.g. ids {dup}); every "
                "example needs its own id (IndexedDataset numbers them 0..n-1; give a second set an offset)"
            )
        return ids[first], values[first]

    # -- every rank together --------------------------------------------------------------------
    def all_ranks(self, trainer: Any, fn: Callable[[], T], device: Optional[torch.device] = None) -> T:
        """Run ``fn`` on every rank; if it raises on any rank, raise on every rank (the failing
        rank re-raises its own error, the others a ``RuntimeError`` quoting it), so that no rank
        is left waiting in a later collective."""
        error: Optional[BaseException] = None
        result: Any = None
        try:
            result = fn()
        except Exception as e:  # reported after every rank has agreed
            error = e
        if trainer.world_size <= 1:
            if error is not None:
                raise error
            return result
        device = device or trainer.strategy.root_device
        flags = trainer.strategy.all_gather(torch.tensor([0.0 if error is None else 1.0], device=device)).reshape(-1)
        if float(flags.sum()) == 0:
            return result
        src = int(torch.nonzero(flags)[0])
        mine = f"{type(error).__name__}: {error}" if error is not None and trainer.global_rank == src else ""
        text = trainer.strategy.broadcast(mine, src=src)
        if error is not None:
            raise error
        raise RuntimeError(f"{type(self).__name__} failed on rank {src} ({text}); this rank stops too so that no rank waits")

    def on_rank_zero(self, trainer: Any, fn: Callable[[], T]) -> Optional[T]:
        """Run ``fn`` on rank zero only (e.g. a write); every rank returns once it has finished,
        and a failure there raises on every rank."""
        return self.all_ranks(trainer, lambda: fn() if trainer.is_global_zero else None)


def writable_folder(path: Path, owner: str) -> list[Path]:
    """Create ``path`` (and parents) when missing and check that a file can be written in it.

    Returns:
        The folders it created, deepest first.

    Raises:
        OutputFolderError: the path is a file, or the folder cannot be created or written.
    """
    created = [p for p in [path, *path.parents] if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-check-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputFolderError(
            f"{owner} cannot write its output folder {path} ({e.strerror or e}); pass a writable dirpath"
        ) from e
    return created


class _Strided:
    """Every ``world``-th batch of ``loader``, starting at ``rank``."""

    def __init__(self, loader: Iterable[Any], rank: int, world: int) -> None:
        self.loader, self.rank, self.world = loader, rank, world

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.rank, None, self.world)
