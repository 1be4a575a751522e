"""``LiSSASelfInfluence``: sampled-LiSSA self-influence of probe examples during ``fit``.

A thin adapter over :func:`lightning_influence.lissa.self_influence`: the probe is split across
ranks by the base's :meth:`~InfluenceCallback.probe_loader`, the sample pool is the training set
by default, the core runs with gradients enabled and the model in eval mode, the scores are
gathered by example id and written as one :class:`~lightning_influence.InfluenceScores` artifact
(kind ``"scores"``, method ``"lissa"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .. import validation as check
from ..data_sources import map_style, subsample
from ..memory import PeakMemory
from ..lissa.budget import MemoryPlan, plan_memory
from ..lissa.options import LiSSAOptions
from ..params import select_parameters
from ..lissa.samplers import SamplePool
from ..lissa.self_influence import self_influence
from ..model_mode import eval_mode
from ..scores import InfluenceScores
from ..task import TaskLike
from .base import InfluenceCallback

__all__ = ["LiSSASelfInfluence"]

OWNER = "LiSSASelfInfluence"
QUANTILES = (0.5, 0.9, 0.99)
DEFAULT_MAX_PROBE: Optional[int] = None


class LiSSASelfInfluence(InfluenceCallback):
    """Self-influence ``∇ℓ(z)ᵀ(H + λI)⁻¹∇ℓ(z)`` of every probe example with sampled LiSSA, at the
    end of ``fit`` and, with ``every_n_epochs``, after every ``n``-th training epoch.

    ``H`` is the Hessian (``options.curvature="hessian"``) or Gauss-Newton matrix (``"ggn"``) of
    the **mean** per-example loss over each LiSSA step's mini-batch, drawn from ``pool`` by the
    options' sampler; per-example losses are sums over tokens. Scores are ``≥ 0`` for every
    curvature (each is a sum of non-negative terms; examples whose iterates met negative
    curvature are counted in the ``negative_curvature`` metric) and are not normalised by
    dataset size. The work is bounded by ``options.time_budget`` (600 s by default) and the
    memory by ``options.memory_budget`` (see :class:`~lightning_influence.lissa.LiSSAOptions`);
    a progress bar shows the recursion's steps when standard error is a terminal.

    Files (``<folder>`` is ``<log dir>/influence/<name>`` unless ``dirpath`` is given):
    ``<folder>/self_influence`` at the end of fit and ``<folder>/epoch=NNNN/self_influence`` after
    each due epoch, all ``"scores"`` artifacts (``train_ids`` sorted, ``self_influence`` float32,
    options and run facts in the manifest); load with :func:`lightning_influence.load_scores`.
    When the last epoch was due, its scores are written again as the end-of-fit artifact, not
    recomputed.

    Metrics (prefix ``influence/<name>/``), per computation (docs/lissa.md says what each
    measures): ``self_mean``, ``self_max``, ``nonfinite``, ``top1_id`` … ``top{k}_id``,
    ``self_q50``, ``self_q90``, ``self_q99``, ``n_probe`` (examples scored), ``steps`` (per chunk),
    ``vector_steps`` (per example), ``converged_fraction``, ``seconds``, ``peak_mem_mb`` (this
    rank; :class:`~lightning_influence.lissa.PeakMemory`), ``scale``, ``damping`` and ``depth``
    (the values used; ``budget_limited`` is 1 when ``options.time_budget`` cut the depth),
    ``auto_products``, ``negative_curvature`` (examples whose iterates met net negative curvature;
    their scores stay ``≥ 0``) and ``chunk_size`` (probe vectors per recursion).

    Args:
        probe: the examples to score: a ``Dataset`` (batched with ``probe_batch_size``) or a
            ``DataLoader``. Its batches must carry example ids (wrap the dataset in
            :class:`~lightning_influence.IndexedDataset`); this is checked at ``setup``.
        options: :class:`~lightning_influence.lissa.LiSSAOptions` (default ``LiSSAOptions()``).
        every_n_epochs: also score after epochs ``n-1, 2n-1, …`` (0-based); ``None``: only at
            the end of fit.
        pool: what the sampler draws from: a map-style ``Dataset`` or a ``DataLoader`` over one
            (its collate function is used); default: the training dataloader's.
        name: names the state, the folder and the metric prefix (see
            :class:`~lightning_influence.callbacks.base.InfluenceCallback`).
        dirpath: the output folder (default ``<log dir>/influence/<name>``).
        probe_batch_size: batch size of a ``Dataset`` probe and of the samplers' passes over the pool.
        top_k: how many top ids to log.
        task: how to read batches (default: the LightningModule's methods, else by layout).
        max_probe: score at most this many probe examples: a random subset of a map-style
            probe (seeded with ``options.seed``; the same examples at every computation, so
            per-epoch scores follow the same examples), logged as ``n_probe``, with a warning at
            ``setup``. ``None`` (the default): every example, as self-influence is used to rank
            the whole probe (with 64 of the 1,437 digits scored, the other 96% of the flipped
            labels can never be found: docs/benchmarks_mislabel.md). LiSSA costs about
            ``depth × sample_size`` curvature-vector products per scored example (20 × 32 by
            default; ``options.time_budget`` lowers the depth when that would take too long),
            so set it to bound the cost on a large probe. An iterable probe is always scored
            whole.

    Memory: at ``setup`` the callback refuses (:class:`~lightning_influence.lissa.LiSSAMemoryError`,
    before step 0) when one vector's parameter copies alone exceed ``options.memory_budget``;
    when scoring, the vectors and mini-batch examples carried at once are chosen to fit it (see
    docs/lissa.md, *Memory*).

    Strategies: one process and DDP. Sharded strategies (``FSDPStrategy``,
    ``ModelParallelStrategy``, DeepSpeed, XLA FSDP) are refused at ``setup``
    (:class:`~lightning_influence.callbacks.base.UnsupportedStrategyError`) with what to do instead.

    Attributes:
        scores: the latest gathered :class:`~lightning_influence.InfluenceScores` (every rank).
    """

    method = "lissa"
    sharded_refusal = ("sampled LiSSA differentiates the loss twice with respect to the whole parameter vector, which no "
                       "rank holds under sharding. Train with strategy='ddp', or score after training: load the "
                       "consolidated checkpoint into the unsharded model and call lightning_influence.lissa.self_influence "
                       "(or use EKFACInfluence / Z0Influence, which run under FSDP).")

    def __init__(
        self,
        probe: Any,
        options: Optional[LiSSAOptions] = None,
        every_n_epochs: Optional[int] = None,
        pool: Optional[Any] = None,
        name: str = "lissa",
        dirpath: Optional[str] = None,
        probe_batch_size: int = 64,
        top_k: int = 10,
        task: Optional[TaskLike] = None,
        max_probe: Optional[int] = DEFAULT_MAX_PROBE,
    ) -> None:
        super().__init__(name=name, dirpath=dirpath, every_n_epochs=every_n_epochs, probe_batch_size=probe_batch_size,
                         top_k=top_k, task=task)
        self.probe = check.data_source(OWNER, "probe", probe, allow_none=False)
        self.max_probe = check.positive_int(OWNER, "max_probe", max_probe, allow_none=True)
        self.pool = check.data_source(OWNER, "pool", pool)
        if self.pool is not None:
            map_style(self.pool, OWNER)
        if options is None:
            options = LiSSAOptions()
        if not isinstance(options, LiSSAOptions):
            raise check.InvalidArgumentError(f"{OWNER}(options=...) must be a LiSSAOptions or None, got {options!r}")
        self.options = options
        self.scores: Optional[InfluenceScores] = None
        self._last_epoch: Optional[int] = None

    @property
    def scores_path(self) -> Path:
        """Where the end-of-fit scores are written (known after ``setup``)."""
        return self.artifact_path("self_influence")

    # -- hooks --------------------------------------------------------------------------------
    def prepare_fit(self, trainer: Any, pl_module: Any) -> None:
        self.scores, self._last_epoch = None, None
        self.preflight(trainer, pl_module)
        self.check_example_ids(trainer, self.probe)
        scored = self.scored_probe()
        if scored is not self.probe:
            from lightning.pytorch.utilities import rank_zero_warn

            total = len(self.probe.dataset if isinstance(self.probe, DataLoader) else self.probe)
            rank_zero_warn(f"{OWNER}(name={self.name!r}) scores a random {self.max_probe} of the probe's {total} examples "
                           f"(max_probe={self.max_probe}: LiSSA's cost grows with every scored example); pass "
                           "max_probe=None to score them all")

    def preflight(self, trainer: Any, pl_module: Any) -> MemoryPlan:
        """Refuse before training when not even one LiSSA vector's parameter copies fit the
        memory budget (``options.memory_budget``, default 60% of the memory available on the
        training device). The activations are measured, and the full plan made, when scoring.

        Raises:
            LiSSAMemoryError: with the numbers and the knobs.
        """
        selected = select_parameters(pl_module, self.options.params, owner=OWNER)
        unique = {id(p): p for p in selected.values()}.values()  # a tied tensor counts once
        first = next(iter(unique))
        device = getattr(trainer.strategy, "root_device", first.device)
        return plan_memory(num_params=sum(p.numel() for p in unique), itemsize=first.element_size(), activation_bytes=0,
                           chunk_size=self.options.chunk_size, device=device, memory_budget=self.options.memory_budget,
                           owner=f"{OWNER}(name={self.name!r})")

    def end_epoch(self, trainer: Any, pl_module: Any) -> None:
        self._last_epoch = trainer.current_epoch
        if self.epoch_due(trainer.current_epoch):
            self._score(trainer, pl_module, epoch=trainer.current_epoch)
            self._write(trainer, self.artifact_path("self_influence", trainer.current_epoch))

    def end_training(self, trainer: Any, pl_module: Any) -> None:
        fresh = self.scores is None or self.scores.step != trainer.global_step
        if fresh:  # else the last epoch was scored at these very weights
            self._score(trainer, pl_module, epoch=self._last_epoch)
        self._write(trainer, self.scores_path, images=fresh)

    def finish_skipped_fit(self, trainer: Any, pl_module: Any) -> None:
        """Resumed from a checkpoint of a run that stopped before its end-of-fit scores were
        written: score the checkpoint's weights now (unless this run's scores at this step are
        in the folder already)."""
        if self.artifact_is_current(trainer, self.scores_path):
            return
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"{OWNER}(name={self.name!r}): the checkpoint's run stopped before writing its end-of-fit scores; "
                       f"computing them now into {self.scores_path}")
        self.end_training(trainer, pl_module)

    # -- checkpointing ------------------------------------------------------------------------
    def method_state(self) -> dict:
        return {**self.folder_state(), "last_epoch": self._last_epoch}

    def load_method_state(self, state: dict) -> None:
        if state:
            self._last_epoch = state.get("last_epoch")
            self.restore_folder(state)

    def scored_probe(self) -> Any:
        """The probe, or with ``max_probe`` the seeded random subset of it that is scored."""
        return subsample(self.probe, self.max_probe, self.options.seed)

    def _pool(self, trainer: Any, device: torch.device) -> SamplePool:
        pool = self.pool if self.pool is not None else trainer.train_dataloader
        if pool is None:
            raise RuntimeError(f"{OWNER} found no training dataloader to sample from; pass pool=<Dataset or DataLoader>")
        dataset, collate = map_style(pool, OWNER)
        return SamplePool(dataset, collate_fn=collate, device=device, batch_size=self.probe_batch_size)

    def _score(self, trainer: Any, pl_module: Any, epoch: Optional[int]) -> None:
        """Compute, gather (every rank) and log the probe's self-influence; sets :attr:`scores`."""
        device = pl_module.device
        mem = PeakMemory(device, reset_peak=True)

        def run() -> InfluenceScores:
            loader = self.probe_loader(trainer, self.scored_probe())
            pool = self._pool(trainer, device)
            with eval_mode(pl_module), mem, torch.inference_mode(False), torch.enable_grad():
                return self_influence(pl_module, loader, pool, self.options, task=self.resolved_task)

        local = self.all_ranks(trainer, run)
        ids, values = self.gather_by_id(trainer, local.train_ids.to(device), local.self_influence.float().to(device))
        steps, converged = local.meta["steps"], local.meta["converged"]
        stats = torch.tensor([float(sum(steps)), float(len(steps)), float(sum(converged))], device=device)
        if trainer.world_size > 1:
            stats = trainer.strategy.reduce(stats, reduce_op="sum")
        total_steps, chunks, n_converged = stats.tolist()
        ids, values = ids.cpu(), values.detach().cpu()
        metrics = {
            **self.ranking_metrics(ids, values),
            **_quantiles(values),
            "n_probe": float(ids.numel()),
            "steps": total_steps / chunks if chunks else 0.0,
            "converged_fraction": n_converged / chunks if chunks else 0.0,
            "seconds": float(local.meta["seconds"]),
            "scale": float(local.meta["scale"]),
            "damping": float(local.meta["damping"]),
            "vector_steps": float(local.meta["vector_steps"]),
            "peak_mem_mb": mem.peak_bytes / 2**20,
            "depth": float(local.meta["depth"]),
            "budget_limited": float(local.meta["budget_limited"]),
            "sample_size": float(local.meta["sample_size"] or 0), "sample_limited": float(local.meta["sample_limited"]),
            "auto_products": float(local.meta["auto_products"]),
            "negative_curvature": float(local.meta["negative_curvature"]),
            "chunk_size": float(local.meta["memory"]["chunk_size"]),
        }
        self.log_metrics(trainer, metrics)
        meta = {
            "callback": self.name, "run_id": self.run_id, "num_params": local.meta["num_params"], "world_size": trainer.world_size,
            "peak_memory_method": mem.method, "metrics": metrics,
            "units": "g^T (H + damping I)^-1 g; H of the mean per-example loss; not normalised by dataset size",
        }
        self.scores = InfluenceScores("lissa", ids, self_influence=values, epoch=epoch, step=trainer.global_step,
                                      options=local.options, meta=meta)

    def _write(self, trainer: Any, path: Path, images: bool = True) -> None:
        self.write_scores(trainer, self.scores, path)
        if images and trainer.is_global_zero:
            from ..report import read_report

            self.log_images(trainer, [read_report(path, self.top_k)])


def _quantiles(values: Tensor) -> dict[str, float]:
    """``self_q50``, ``self_q90``, ``self_q99`` over the finite scores (none when there are none)."""
    finite = values.double()[torch.isfinite(values)]
    if not finite.numel():
        return {}
    q = torch.quantile(finite, torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"self_q{round(p * 100)}": float(v) for p, v in zip(QUANTILES, q.tolist())}
