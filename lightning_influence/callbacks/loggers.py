"""What the callbacks send to the Trainer's loggers: scalar metrics, figures and artifact files.

* every logger gets the scalar metrics;
* TensorBoard, MLflow and Weights & Biases loggers get the report figures as images
  (TensorBoard image tab; MLflow run artifacts ``influence/plots/<name>.png``; W&B media);
* MLflow and W&B loggers also get the artifact files (``influence/<name>/...`` in the MLflow run;
  a W&B artifact ``influence-<name>`` of type ``"influence"``) and the HTML report.

Loggers are rank-zero-only in Lightning, so these functions are safe to call on every rank.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

__all__ = ["log_metrics", "log_figures", "log_artifacts", "TRACKERS"]

TRACKERS = ("MLFlowLogger", "WandbLogger")
"""Loggers that keep files (artifacts) with the run."""


def log_metrics(trainer: Any, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
    """Send scalar metrics to every logger of the trainer and into ``trainer.callback_metrics``."""
    if not metrics:
        return
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=trainer.global_step if step is None else step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in clean.items()})


def log_figures(trainer: Any, reports: list, step: Optional[int] = None) -> int:
    """Log the report figures of ``reports`` (see :func:`lightning_influence.report.make_figures`;
    an entry may be a callable returning the report, called only when a logger takes images)
    as images to every TensorBoard, MLflow and W&B logger; returns how many images were logged
    (0 without such a logger, or without matplotlib)."""
    if not takes_figures(trainer):
        return 0
    from ..report import log_figures as _log

    reports = [r() if callable(r) else r for r in reports]
    return _log(trainer.loggers, reports, step=trainer.global_step if step is None else step)


def takes_figures(trainer: Any) -> bool:
    """Whether this rank has a logger that :func:`log_figures` sends images to (rank zero with a
    TensorBoard, MLflow or W&B logger): without one, nothing needs the figures made or read."""
    kinds = ("TensorBoardLogger",) + TRACKERS
    return bool(trainer.is_global_zero) and any(type(lg).__name__ in kinds for lg in trainer.loggers)


def _files(local: Path) -> Iterator[tuple[Path, str]]:
    """``(file, path relative to local)`` below ``local``, skipping dot-named files and folders
    (snapshots, temporaries of writes in progress)."""
    if local.is_file():
        yield local, local.name
        return
    for dirpath, dirnames, filenames in os.walk(local):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                p = Path(dirpath) / f
                yield p, p.relative_to(local).as_posix()


def log_artifacts(trainer: Any, local: str | os.PathLike, artifact_path: str) -> int:
    """Send a folder (or one file) to every MLflow and W&B logger of the trainer.

    MLflow: each file goes to ``<artifact_path>/<its path below local>`` of the logger's run.
    W&B: one artifact named ``<artifact_path>`` with ``/`` as ``-`` (type ``"influence"``) holding
    the files. Dot-named files and folders are skipped. TensorBoard and CSV loggers keep no
    files and are left alone.

    Args:
        trainer: the Lightning trainer (only rank zero sends).
        local: the folder or file.
        artifact_path: where it goes in the run, e.g. ``"influence/ekfac"``.

    Returns:
        Files sent (summed over loggers).
    """
    local = Path(local)
    if not trainer.is_global_zero or not local.exists():
        return 0
    sent = 0
    for lg in trainer.loggers:
        kind = type(lg).__name__
        if kind == "MLFlowLogger":
            for path, rel in _files(local):
                parent = str(Path(artifact_path, rel).parent.as_posix())
                lg.experiment.log_artifact(lg.run_id, str(path), parent)
                sent += 1
        elif kind == "WandbLogger":
            import wandb

            art = wandb.Artifact(name=artifact_path.strip("/").replace("/", "-"), type="influence")
            for path, rel in _files(local):
                art.add_file(str(path), name=rel)
                sent += 1
            lg.experiment.log_artifact(art)
    return sent
