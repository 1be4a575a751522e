"""``InfluenceIndexCallback``: build a training-gradient index at the end of ``fit`` from the
factors an :class:`~lightning_influence.EKFACInfluence` callback just computed.

A thin adapter over :func:`lightning_influence.index.build_index_from_preconditioner`: it finds the EK-FAC
callback by its ``name`` in ``trainer.callbacks``, splits the data across ranks (each rank writes
its own shards; rank zero writes the catalog after a barrier), and writes
``<folder>/index`` (open with :func:`~lightning_influence.index.load_index`) plus
``<folder>/self_influence`` (an ``InfluenceScores`` artifact from the index's exact
self-influence column, which ``lightning-influence report`` reads). It runs in ``on_fit_end``,
after every callback's ``on_train_end`` (where the EK-FAC factors are finalised).
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from .. import validation as check
from ..ekfac.preconditioner import Preconditioner
from ..index.builder import DEFAULT_COMPRESSION, DEFAULT_DIM, IndexOptions, build_index_from_preconditioner
from ..index.projection import COMPRESSIONS
from ..index.reference import factors_match_artifact
from ..layers import TrackedLayer
from ..patterns import select_names
from ..task import TaskLike
from .base import InfluenceCallback

__all__ = ["InfluenceIndexCallback"]

OWNER = "InfluenceIndexCallback"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class InfluenceIndexCallback(InfluenceCallback):
    """At the end of ``fit``, index the training set with an EK-FAC callback's final factors.

    Writes ``<folder>/index`` and ``<folder>/self_influence``, where ``<folder>`` is
    ``<log dir>/influence/<name>`` unless ``dirpath`` is given. Metrics (prefix
    ``influence/<name>/``): ``examples``, ``bytes``, ``seconds``, and the self-influence ranking
    ``self_mean``, ``self_max``, ``top1_id`` … ``top{k}_id``.

    Args:
        ekfac: ``name`` of the :class:`~lightning_influence.EKFACInfluence` callback whose
            factors precondition the index (it must be in the same Trainer).
        data: the examples to index (a ``Dataset`` with ids or a ``DataLoader``); default: the
            training loader's dataset, in order, batched like the training loader.
        compression: ``"auto"`` (default: layers stored exactly while an example fits the
            index's default budget of numbers, the rest sketched), ``"exact"``, ``"sjlt"`` or
            ``"kronecker"`` (see :class:`~lightning_influence.index.IndexOptions`).
        dim: numbers per sketched layer and example (``"auto"``: the least a sketched layer gets;
            ignored by ``"exact"``).
        dtype: storage dtype, ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
        damping: λ for the index (``None``: the default rule of :mod:`lightning_influence.ekfac.damping`).
        layers: glob pattern(s) selecting a subset of the factors' layers (default: all).
        seed: seed of the random projections.
        shard_size: examples per shard (``None``: about 8 MiB per shard).
        per_layer: store each layer's self-influence too.
        if_exists: what to do with an index already in the folder: ``"overwrite"`` (default:
            the folder is this callback's), ``"resume"`` or ``"error"``.
        name: names the state, the folder and the metric prefix (see :class:`InfluenceCallback`).
        dirpath: the output folder (default ``<log dir>/influence/<name>``).
        probe_batch_size: batch size when ``data`` is a ``Dataset``.
        top_k: how many top self-influence ids to log.
        task: how to read batches (default: the LightningModule's methods, else by layout).
    """

    method = "index"

    def __init__(
        self,
        ekfac: str = "ekfac",
        data: Optional[Any] = None,
        compression: str = DEFAULT_COMPRESSION,
        dim: Optional[int] = DEFAULT_DIM,
        dtype: Literal["float16", "bfloat16", "float32", "float64"] = "float16",
        damping: Optional[float] = None,
        layers: Optional[str | list[str]] = None,
        seed: int = 0,
        shard_size: Optional[int] = None,
        per_layer: bool = False,
        if_exists: Literal["overwrite", "resume", "error"] = "overwrite",
        name: str = "index",
        dirpath: Optional[str] = None,
        probe_batch_size: int = 256,
        top_k: int = 10,
        task: Optional[TaskLike] = None,
    ) -> None:
        super().__init__(name=name, dirpath=dirpath, probe_batch_size=probe_batch_size, top_k=top_k, task=task)
        self.ekfac = check.artifact_name(OWNER, "ekfac", ekfac)
        self.data = check.data_source(OWNER, "data", data)
        check.choice(OWNER, "compression", compression, COMPRESSIONS)
        check.choice(OWNER, "dtype", dtype, tuple(_DTYPES))
        self.options = IndexOptions(compression, dim, dtype, seed, shard_size, per_layer, True)
        self.damping = check.finite_float(OWNER, "damping", damping, minimum=0.0, allow_none=True)
        self.layers = check.patterns(OWNER, "layers", layers)
        self.if_exists = check.choice(OWNER, "if_exists", if_exists, ("overwrite", "resume", "error"))
        self.index = None
        self.seconds = 0.0

    @property
    def index_path(self):
        """Where the index is written (known after ``setup``)."""
        return self.artifact_path("index")

    def _ekfac_callback(self, trainer: Any):
        from .ekfac import EKFACInfluence

        found = [cb for cb in trainer.callbacks if isinstance(cb, EKFACInfluence) and cb.name == self.ekfac]
        if not found:
            names = [cb.name for cb in trainer.callbacks if isinstance(cb, EKFACInfluence)]
            raise ValueError(
                f"{OWNER}(ekfac={self.ekfac!r}) needs an EKFACInfluence callback named {self.ekfac!r} in the same Trainer; "
                f"found {names or 'none'}"
            )
        return found[0]

    def prepare_fit(self, trainer: Any, pl_module: Any) -> None:
        self._ekfac_callback(trainer)  # fail before training, not after

    def _loader(self, trainer: Any):
        if self.data is not None:
            return self.probe_loader(trainer, self.data)
        train = trainer.train_dataloader
        if not isinstance(train, DataLoader):
            raise RuntimeError(f"{OWNER}: the training loader is not a DataLoader; pass data= (the examples to index)")
        plain = DataLoader(train.dataset, batch_size=train.batch_size or self.probe_batch_size, shuffle=False,
                           collate_fn=train.collate_fn, num_workers=train.num_workers)
        return self.probe_loader(trainer, plain)

    def _saved_factors(self, trainer: Any, source: Any, factors: Any, names: list[str]) -> Optional[Any]:
        """The EK-FAC callback's saved factor artifact when it holds ``factors`` (the index then
        references it instead of storing a copy), else ``None``; decided on rank zero for all."""
        path = getattr(source, "factors_path", None)
        if trainer.world_size > 1:
            trainer.strategy.barrier()
        ok = path is not None and trainer.global_rank == 0 and factors_match_artifact(factors, names, path)
        if trainer.world_size > 1:
            ok = bool(trainer.strategy.broadcast(ok, src=0))
        return path if ok else None

    def finish_fit(self, trainer: Any, pl_module: Any) -> None:
        source = self._ekfac_callback(trainer)
        if source.factors is None:
            rank_zero_warn(f"{OWNER}: the EKFACInfluence callback {self.ekfac!r} has no final factors (fit interrupted?); no index built")
            return
        factors = source.factors
        names = select_names(factors.layer_names, self.layers, what="layer of the factors", owner=OWNER)
        modules = dict(pl_module.named_modules())
        tracked = [TrackedLayer.from_module(n, modules[n]) for n in names]
        device = pl_module.device
        pre = Preconditioner(factors, names, self.damping, torch.float64, device)
        loader = self._loader(trainer)
        factors_path = self._saved_factors(trainer, source, factors, names)
        t0 = time.perf_counter()
        index = self.all_ranks(trainer, lambda: build_index_from_preconditioner(
            pl_module, pre, tracked, loader, self.index_path, self.options, task=self.resolved_task,
            if_exists=self.if_exists, rank=trainer.global_rank, world_size=trainer.world_size,
            barrier=trainer.strategy.barrier if trainer.world_size > 1 else None, factors_path=factors_path,
        ))
        self.seconds = time.perf_counter() - t0
        self.index = index
        scores = index.self_influence()
        scores.epoch, scores.step = self.last_epoch(trainer), trainer.global_step
        scores.meta = {"callback": self.name, "ekfac": self.ekfac, "index": str(self.index_path)}
        self.write_scores(trainer, scores, self.artifact_path("self_influence"))
        metrics = {"examples": index.n_examples, "bytes": index.nbytes, "seconds": self.seconds}
        metrics.update(self.ranking_metrics(scores.train_ids, scores.self_influence))
        self.log_metrics(trainer, metrics)
