"""Evaluate influence scores on your own data (metrics from torchmetrics).

* :func:`mislabel_detection` — AUROC, average precision and the share of known mislabeled
  examples found in the top p% of self-influence;
* :func:`fact_tracing` — MRR and recall@k of each query's known source examples;
* :func:`linear_datamodeling_score` — LDS against models retrained on random subsets, which
  :func:`retrain_subsets` produces (resumable, with a progress bar) from a ``retrain`` function,
  e.g. :func:`trainer_retrain` over your Trainer and model factories;
* :func:`spearman` — rank agreement of two score sets;
* :func:`select` — choose a default by its worst case on half of the tasks of a
  :class:`ResultMatrix` and report it on the other half (:func:`split_tasks`).

See docs/evaluate.md.
"""

from .metrics import (
    FactTracing,
    LinearDatamodelingScore,
    MislabelDetection,
    fact_tracing,
    linear_datamodeling_score,
    mislabel_detection,
    spearman,
)
from .selection import CRITERIA, ResultMatrix, Selection, TaskSummary, select, split_tasks
from .retrain import RETRAIN_KIND, SubsetLosses, query_losses, random_subsets, retrain_subsets, trainer_retrain

__all__ = [
    "mislabel_detection",
    "MislabelDetection",
    "fact_tracing",
    "FactTracing",
    "linear_datamodeling_score",
    "LinearDatamodelingScore",
    "spearman",
    "retrain_subsets",
    "random_subsets",
    "SubsetLosses",
    "trainer_retrain",
    "query_losses",
    "RETRAIN_KIND",
    "ResultMatrix",
    "Selection",
    "TaskSummary",
    "select",
    "split_tasks",
    "CRITERIA",
]
