"""What the callbacks send to the Trainer's loggers: scalar metrics and figures.

Loggers are rank-zero-only in Lightning, so these functions are safe to call on every rank.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

__all__ = ["log_metrics", "log_figures"]


def log_metrics(trainer: Any, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
    """Send scalar metrics to every logger of the trainer and into ``trainer.callback_metrics``."""
    if not metrics:
        return
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=trainer.global_step if step is None else step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in clean.items()})


def log_figures(trainer: Any, reports: list, step: Optional[int] = None) -> int:
    """Log the report figures of ``reports`` (see :func:`lightning_influence.report.make_figures`)
    as images to every TensorBoard logger; returns how many images were logged (0 without one,
    or without matplotlib)."""
    if not trainer.is_global_zero or not any(type(lg).__name__ == "TensorBoardLogger" for lg in trainer.loggers):
        return 0
    from ..report import log_figures as _log

    return _log(trainer.loggers, reports, step=trainer.global_step if step is None else step)
