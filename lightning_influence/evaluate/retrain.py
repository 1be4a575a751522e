"""Retrain on random training subsets, the ground truth of the linear datamodeling score.

:func:`retrain_subsets` draws ``M`` random subsets (a fixed share of the training set each,
from a seed), calls your ``retrain(j, indices) -> Tensor[Q]`` on each and keeps the query losses
it returns. Each retrain's result is saved as soon as it finishes (``<workdir>/subset=NNNN``, an
artifact of kind ``"retrain"``), so an interrupted evaluation resumes where it stopped; a
progress bar shows how far it is.

:func:`trainer_retrain` builds ``retrain`` from a Lightning ``Trainer`` factory and a model
factory (no Lightning import here: the trainer is only called).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..progress import progress_bar
from ..storage import ArtifactError, read_artifact, write_artifact

__all__ = ["SubsetLosses", "random_subsets", "retrain_subsets", "trainer_retrain", "query_losses", "RETRAIN_KIND"]

RETRAIN_KIND = "retrain"

Retrain = Callable[[int, Tensor], Tensor]
"""``retrain(j, indices) -> Tensor[Q]``: train a fresh model on the training examples at
``indices`` (``LongTensor``, sorted positions) and return its loss on each query."""


@dataclass
class SubsetLosses:
    """Retrained subsets and the query losses of the models trained on them.

    Attributes:
        masks: ``BoolTensor[M, N]``: which training examples each model saw.
        losses: ``Tensor[M, Q]`` (float64): each model's loss on each query.
        seconds: ``Tensor[M]``: how long each retrain took (as recorded when it ran).
        resumed: how many results were read back from ``workdir`` instead of retrained.
    """

    masks: Tensor
    losses: Tensor
    seconds: Tensor
    resumed: int = 0


def random_subsets(n_train: int, n_subsets: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """``BoolTensor[M, N]``: ``M`` random subsets of ``⌊fraction · N⌋`` examples each, the same for
    the same arguments.

    Raises:
        ValueError: a size is not positive or ``fraction`` is not in (0, 1).
    """
    if n_train < 1 or n_subsets < 1 or not 0 < fraction < 1:
        raise ValueError(f"need n_train >= 1, n_subsets >= 1 and 0 < fraction < 1; got {n_train}, {n_subsets}, {fraction}")
    g = torch.Generator().manual_seed(int(seed))
    k = max(1, int(fraction * n_train))
    masks = torch.zeros(n_subsets, n_train, dtype=torch.bool)
    for j in range(n_subsets):
        masks[j, torch.randperm(n_train, generator=g)[:k]] = True
    return masks


def _load(path: Path, mask: Tensor) -> Optional[tuple[Tensor, float]]:
    if not path.exists():
        return None
    try:
        t, m = read_artifact(path, kind=RETRAIN_KIND)
    except ArtifactError:
        return None  # a damaged result is retrained
    if not torch.equal(t["mask"].bool(), mask):
        raise ArtifactError(f"{path} holds a retrain on another subset (different n_train, fraction or seed); use another "
                            "workdir or the arguments that made it")
    return t["losses"].double(), float(m.get("seconds", 0.0))


def retrain_subsets(
    n_train: int,
    retrain: Retrain,
    n_subsets: int = 32,
    fraction: float = 0.5,
    seed: int = 0,
    workdir: Optional[str | os.PathLike] = None,
    progress: Optional[bool] = None,
) -> SubsetLosses:
    """Retrain on ``n_subsets`` random subsets and collect the query losses, resumably.

    Args:
        n_train: training set size ``N`` (subsets are positions ``0..N-1``).
        retrain: ``retrain(j, indices) -> Tensor[Q]`` (see :func:`trainer_retrain`).
        n_subsets: ``M``; LDS papers use 50-100 for stable estimates.
        fraction: share of the training set in each subset (0.5 is the usual choice).
        seed: seed of the subsets (:func:`random_subsets`).
        workdir: where each result is saved as it finishes and read back on a rerun (``None``:
            nothing saved).
        progress: show a progress bar (``None``: when standard error is a terminal).

    Returns:
        :class:`SubsetLosses`.

    Raises:
        ArtifactError: ``workdir`` holds results for other subsets.
        ValueError: ``retrain`` returned losses of a different length than before.
    """
    masks = random_subsets(n_train, n_subsets, fraction, seed)
    losses: list[Optional[Tensor]] = [None] * n_subsets
    seconds = torch.zeros(n_subsets, dtype=torch.float64)
    resumed = 0
    root = None if workdir is None else Path(workdir)
    for j in progress_bar(range(n_subsets), desc="retraining subsets", progress=progress):
        path = None if root is None else root / f"subset={j:04d}"
        saved = None if path is None else _load(path, masks[j])
        if saved is not None:
            losses[j], seconds[j] = saved
            resumed += 1
            continue
        t0 = time.perf_counter()
        out = torch.as_tensor(retrain(j, torch.nonzero(masks[j]).flatten())).detach().double().cpu().reshape(-1)
        seconds[j] = time.perf_counter() - t0
        losses[j] = out
        if path is not None:
            write_artifact(path, RETRAIN_KIND, {"mask": masks[j], "losses": out},
                           {"subset": j, "n_train": n_train, "fraction": fraction, "seed": seed, "seconds": float(seconds[j])})
    sizes = {int(x.numel()) for x in losses}
    if len(sizes) != 1:
        raise ValueError(f"retrain returned query losses of different lengths {sorted(sizes)}; every call must return Tensor[Q]")
    return SubsetLosses(masks=masks, losses=torch.stack(losses), seconds=seconds, resumed=resumed)


def query_losses(model: Any, queries: Any, task: Any = None, batch_size: int = 256) -> Tensor:
    """``Tensor[Q]`` (float64): the task's measurement (by default the loss, summed over tokens)
    of every query, in the order of ``queries``, in eval mode without gradients.

    Args:
        model: the trained model.
        queries: a ``Dataset`` or ``DataLoader``.
        task: how to read batches (default: the module's task).
        batch_size: batch size for a ``Dataset``.
    """
    from ..batches import move_to_device
    from ..model_mode import eval_mode
    from ..task import resolve_task

    task = resolve_task(model, task)
    loader = queries if isinstance(queries, DataLoader) else DataLoader(queries, batch_size=batch_size, shuffle=False)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            out.append(task.measurement(model, move_to_device(batch, device)).detach().double().cpu().reshape(-1))
    return torch.cat(out)


def trainer_retrain(
    make_trainer: Callable[[], Any],
    make_model: Callable[[], Any],
    train: Any,
    queries: Any,
    batch_size: int = 64,
    task: Any = None,
    seed: int = 0,
    collate_fn: Optional[Callable[[list], Any]] = None,
) -> Retrain:
    """A ``retrain`` for :func:`retrain_subsets` that fits fresh Lightning models.

    For subset ``j`` it seeds torch with ``seed + j``, builds ``model = make_model()`` and
    ``trainer = make_trainer()``, runs ``trainer.fit(model, DataLoader(Subset(train, indices),
    batch_size, shuffle=True))`` and returns :func:`query_losses` of the fitted model.

    Args:
        make_trainer: returns a new ``lightning.Trainer`` (e.g. ``lambda: L.Trainer(max_epochs=10,
            logger=False, enable_checkpointing=False, enable_progress_bar=False)``).
        make_model: returns a new, untrained LightningModule.
        train: the training ``Dataset`` (positions ``0..N-1`` as in the scores' columns).
        queries: the queries (``Dataset`` or ``DataLoader``), in the order of the scores' rows.
        batch_size: training batch size.
        task: how to read query batches (default: the module's task).
        seed: base seed.
        collate_fn: collate function of the training loader.

    Returns:
        ``retrain(j, indices) -> Tensor[Q]``.
    """

    def retrain(j: int, indices: Tensor) -> Tensor:
        torch.manual_seed(seed + j)
        model = make_model()
        trainer = make_trainer()
        loader = DataLoader(Subset(train, indices.tolist()), batch_size=batch_size, shuffle=True, collate_fn=collate_fn,
                            generator=torch.Generator().manual_seed(seed + j))
        trainer.fit(model, loader)
        return query_losses(model, queries, task)

    return retrain
