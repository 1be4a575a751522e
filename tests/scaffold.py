"""Scaffolding the tests share: a quiet trainer, an exact EK-FAC callback, indexed probes and a
two-rank batch order.

Plain functions and classes rather than fixtures, so that the subprocess workers
(``fsdp_launch.py``, ``crash_worker.py``) use the same ones; tests import them with
``from scaffold import ...`` (``tests/`` is on ``sys.path`` under pytest and for a script there).
"""

from __future__ import annotations

import datetime

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import lightning as L
from torch.utils.data import Dataset, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler

from lightning_influence import EKFACInfluence, IndexedDataset


def quiet_trainer(root: Any = None, callbacks: Iterable[L.Callback] = (), **kw: Any) -> L.Trainer:
    """A one-device CPU ``L.Trainer`` under ``root`` (``None``: Lightning's default, the working
    directory) that writes and prints nothing of its own.

    No logger, progress bar, model summary or checkpoint; ``kw`` (``max_epochs``, ``precision``,
    ``deterministic``, ``devices``, ``strategy``, ``logger=...``, ...) is passed on and overrides
    these defaults.
    """
    opts: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=list(callbacks),
    )
    if root is not None:
        opts["default_root_dir"] = str(root)
    opts.update(kw)
    if str(opts.get("strategy", "")).startswith("ddp") and opts.get("devices", 1) != 1:
        opts["callbacks"] = list(opts["callbacks"]) + [ReleaseProcessGroup()]
    return L.Trainer(**opts)


class ReleaseProcessGroup(L.Callback):
    """Every rank of a ``ddp_spawn``/``ddp_fork`` test run destroys the process group at the end
    of fit, after a barrier, instead of in Lightning's exit handler: a gloo process group torn
    down at interpreter exit sometimes left a thread running and the child aborted ("terminate
    called without an active exception", SIGABRT) after a successful fit, failing the test
    about one run in five (also before round 3's changes)."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            # a rank that never arrives fails the test within two minutes instead of hanging it
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
            dist.destroy_process_group()


def trainer(root: Any, cb: L.Callback, max_epochs: int = 1, **kw: Any) -> L.Trainer:
    """:func:`quiet_trainer` for ``cb``, deterministic, without the sanity check (``kw`` overrides)."""
    opts = dict(max_epochs=max_epochs, num_sanity_val_steps=0, deterministic=True, callbacks=[cb])
    opts.update(kw)
    return quiet_trainer(root, **opts)


def exact(**kw: Any) -> EKFACInfluence:
    """The callback with every step counted and an uncapped correction (defaults subsample)."""
    kw.setdefault("update_every_n_steps", 1)
    kw.setdefault("correction_max_examples", None)
    kw.setdefault("correction_tol", None)
    return EKFACInfluence(**kw)


def indexed(dataset: Dataset, n: int | Sequence[int], offset: int = 0) -> IndexedDataset:
    """The first ``n`` examples of ``dataset`` (or those at the positions ``n``), each batch
    carrying ids ``offset + position`` within the subset (``IndexedDataset(Subset(...))``)."""
    return IndexedDataset(Subset(dataset, range(n) if isinstance(n, int) else n), offset=offset)


class MergedRanks(Sampler):
    """One process's order for the optimizer steps of two: batch ``k`` is rank 0's batch ``k``
    then rank 1's, under the ``DistributedSampler`` Lightning gives the training loader (shuffled
    with the global seed, reshuffled each epoch as the trainer calls ``set_epoch``; with an odd
    ``n`` rank 1's last example repeats the first one)."""

    def __init__(self, n: int, batch: int, shuffle: bool = True) -> None:
        self.n, self.batch, self.epoch, self.shuffle = n, batch, 0, shuffle

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def ranks(self) -> list[list[int]]:
        """Each rank's example order this epoch (``2`` lists of ``ceil(n / 2)`` positions)."""
        out = []
        for rank in range(2):
            s = DistributedSampler(range(self.n), num_replicas=2, rank=rank, shuffle=self.shuffle,
                                   seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
            s.set_epoch(self.epoch)
            out.append(list(s))
        return out

    def __iter__(self) -> Iterator[int]:
        r = self.ranks()
        return iter([i for k in range(0, len(r[0]), self.batch) for rank in r for i in rank[k : k + self.batch]])

    def __len__(self) -> int:
        return 2 * len(self.ranks()[0])
