"""What a callback's steps call (a mixin of :class:`~.base.InfluenceCallback`): artifact paths,
gating, metrics and figures, scores written on rank zero, and the collectives of
:mod:`lightning_influence.distributed` with the callback named in their messages.

It reads the base's attributes: ``name``, ``output_dir``, ``every_n_epochs``, ``top_k``,
``probe_batch_size``, ``sharded``, ``run_id``, ``resolved_task``. A method that may run a
collective must be called on every rank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .. import distributed as dist
from ..padding import padded_positions
from ..randomness import RandomnessKeepingLoader
from ..ranking import top_examples
from ..run_folder import check_replaceable, written_by_run
from ..task import MissingExampleIdsError
from .loggers import log_figures, log_metrics

__all__ = ["CallbackToolbox", "epoch_dirname"]

T = TypeVar("T")


def epoch_dirname(epoch: int) -> str:
    """Folder of per-epoch artifacts: ``epoch=0003`` for 0-based epoch 3."""
    return f"epoch={epoch:04d}"


class CallbackToolbox:
    """Helpers for the steps of :class:`~.base.InfluenceCallback` subclasses (no Lightning hook)."""

    _epoch_position: int = 0  # examples of the training loader seen in this epoch on this rank

    def metric(self, key: str) -> str:
        """Full metric name: ``influence/<name>/<key>``."""
        return f"influence/{self.name}/{key}"

    @staticmethod
    def _broadcast(trainer: Any, obj: T) -> T:
        return dist.broadcast(trainer, obj)

    @staticmethod
    def estimated_batches(trainer: Any) -> Optional[int]:
        """``trainer.estimated_stepping_batches`` in training batches (``None`` when unknown or infinite)."""
        try:
            steps = trainer.estimated_stepping_batches
        except Exception:  # no dataloader length (iterable datasets), or not computable yet
            return None
        if steps is None or not math.isfinite(float(steps)):
            return None
        return int(steps) * max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))

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

    def artifact_is_current(self, trainer: Any, path: Path, step_key: str = "step") -> bool:
        """Whether ``path`` holds a complete artifact that this run (same run id) wrote at the
        current global step: decided on rank zero, the same answer on every rank."""

        current = written_by_run(path, self.run_id, trainer.global_step, step_key) if trainer.is_global_zero else None
        return bool(self._broadcast(trainer, current))

    def write_scores(self, trainer: Any, scores: Any, path: Path) -> None:
        """Write ``scores`` (:class:`~lightning_influence.InfluenceScores`) at ``path`` on rank
        zero. Scores another method wrote there are never replaced (``ArtifactError``)."""
        from ..scores import save_scores

        def write() -> None:
            check_replaceable(path, scores.method, f"{type(self).__name__}(name={self.name!r})")
            save_scores(scores, path, top_k=max(self.top_k, 1))

        self.on_rank_zero(trainer, write)

    def padded_positions(self, trainer: Any, batch_size: int) -> list[int]:
        """Positions in this rank's next training batch (of ``batch_size`` examples; call once per
        batch, in order) of a ``DistributedSampler``'s padding duplicates (:mod:`~lightning_influence.padding`),
        counting from the start of the epoch (or of a resumed run), where Lightning's iteration starts."""
        start = self._epoch_position
        self._epoch_position += batch_size
        return padded_positions(trainer.train_dataloader, start, batch_size) if trainer.world_size > 1 else []

    def artifact_path(self, artifact: str, epoch: Optional[int] = None) -> Path:
        """``<folder>/<artifact>``, or ``<folder>/epoch=NNNN/<artifact>`` for a per-epoch result."""
        if self.output_dir is None:
            raise RuntimeError(f"{type(self).__name__} has no output folder before setup('fit')")
        return self.output_dir / artifact if epoch is None else self.output_dir / epoch_dirname(epoch) / artifact

    @staticmethod
    def last_epoch(trainer: Any) -> int:
        """0-based index of the last epoch that ran, at the end of fit (Lightning has already
        advanced ``current_epoch`` past it by ``on_train_end``)."""
        return max(int(trainer.current_epoch) - 1, 0)

    def epoch_due(self, epoch: int) -> bool:
        """Whether per-epoch work runs after 0-based ``epoch`` (see ``every_n_epochs``)."""
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

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

    def probe_loader(self, trainer: Any, data: Any) -> Iterable[Any]:
        """:meth:`probe_batches` wrapped so that every pass over it leaves the global random
        states as they were (:class:`~lightning_influence.randomness.RandomnessKeepingLoader`):
        a probe pass during training never changes training's shuffles, dropout or augmentations."""
        return RandomnessKeepingLoader(self.probe_batches(trainer, data))

    def probe_batches(self, trainer: Any, data: Any) -> Iterable[Any]:
        """This rank's batches of ``data`` (:func:`~lightning_influence.distributed.split_probe`)."""
        return dist.split_probe(trainer, data, self.probe_batch_size, self.sharded, type(self).__name__)

    def probe_padding(self, trainer: Any, data: Any) -> int:
        """Repeated examples :meth:`probe_loader` adds over all ranks: pass it to :meth:`gather_by_id`."""
        return dist.probe_padding(trainer, data, self.sharded)

    def gather_by_id(self, trainer: Any, ids: Tensor, values: Tensor, padding: int = 0) -> tuple[Tensor, Tensor]:
        """Rows of every rank sorted by id (:func:`~lightning_influence.distributed.gather_by_id`)."""
        return dist.gather_by_id(trainer, ids, values, type(self).__name__, padding)

    def ranks(self, trainer: Any) -> dist.Ranks:
        """The run's ranks for core objects, with this callback named in their messages."""
        return dist.Ranks(trainer, type(self).__name__)

    def all_ranks(self, trainer: Any, fn: Callable[[], T], device: Optional[torch.device] = None) -> T:
        """``fn`` on every rank, raising on all if it raises on one (:func:`~lightning_influence.distributed.all_ranks`)."""
        return dist.all_ranks(trainer, fn, type(self).__name__, device)

    def on_rank_zero(self, trainer: Any, fn: Callable[[], T]) -> Optional[T]:
        """``fn`` on rank zero, every rank waiting for it (:func:`~lightning_influence.distributed.on_rank_zero`)."""
        return dist.on_rank_zero(trainer, fn, type(self).__name__)
