"""What every influence callback leaves at the end of ``fit`` besides its results, so that people
see their data: the rendered top examples, the HTML report, and copies in the experiment tracker.

:func:`publish_outputs` runs from :meth:`InfluenceCallback.on_fit_end` on every rank and works on
rank zero only, without collectives. For the callback's end-of-fit results (self-influence
rankings, Z0 train-test influence), it

1. renders the top examples and queries while the data and the model are at hand
   (:func:`~lightning_influence.report.views.example_views`: images, decoded text, table rows;
   the label each was given and the one the model predicts) and saves them as
   ``<folder>/examples`` (kind ``"examples"``);
2. sends the callback's folder to MLflow / W&B loggers (:func:`~.loggers.log_artifacts`);
3. when it is the last influence callback of the trainer, writes the run's HTML report
   ``<influence>/plots/report.html`` and sends it to those loggers too.

How examples are shown is read from the LightningModule: ``render_example(example)`` (a render
hook, see :mod:`lightning_influence.report.views`), ``tokenizer`` (or the datamodule's) and
``class_names``. Failures here never fail training: they are reported as warnings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_warn

from ..distributed import strategy_family
from ..report.views import ExampleViews, example_views, save_views
from ..report import READERS, MethodReport, read_report
from ..storage import list_artifacts
from .loggers import TRACKERS, log_artifacts

__all__ = ["publish_outputs", "save_examples"]
QUERIES_SHOWN = 5
MAX_SCAN = 20_000  # items read to find examples in data that is not an IndexedDataset (bounds the fit-end cost)
_EPOCH = re.compile(r"^epoch=\d+$")


def _module_attr(trainer: Any, pl_module: Any, name: str) -> Any:
    value = getattr(pl_module, name, None)
    if value is None:
        value = getattr(getattr(trainer, "datamodule", None), name, None)
    return value


def _end_of_fit_reports(callback: Any) -> list[MethodReport]:
    out = []
    for info in list_artifacts(callback.output_dir):
        rel = info.path.relative_to(callback.output_dir)
        if info.kind in READERS and info.kind != "ekfac" and not any(_EPOCH.match(p) for p in rel.parts):
            out.append(read_report(info.path, top_k=max(callback.top_k, 10), queries=QUERIES_SHOWN))
    return out


def save_examples(callback: Any, trainer: Any, pl_module: Any) -> Optional[Path]:
    """Render the examples the callback's end-of-fit results rank highest and save them as
    ``<folder>/examples``; returns its path (``None`` when the results rank no example).

    Training examples are looked up in the callback's ``probe`` (else the training dataloader),
    queries in its ``queries`` (directly in an ``IndexedDataset``; other data is read for at most
    ``MAX_SCAN`` items); predicted labels come from ``pl_module`` (not under a strategy
    that shards parameters, where a forward on one rank would wait for the others).
    """
    reports = _end_of_fit_reports(callback)
    train_ids = sorted({i for r in reports for i, _ in r.self_top}
                       | {i for r in reports for q in r.pairwise_top for i, _ in q["proponents"] + q["opponents"]})
    query_ids = sorted({int(q["query_id"]) for r in reports for q in r.pairwise_top})
    if not train_ids and not query_ids:
        return None
    train_src = getattr(callback, "probe", None)
    if train_src is None:
        train_src = trainer.train_dataloader
    query_src = getattr(callback, "queries", None)
    sharded = strategy_family(trainer) != "replicated"  # subclasses of the sharded strategies too
    common = dict(
        model=None if sharded else pl_module,
        task=callback.resolved_task,
        render=getattr(pl_module, "render_example", None) if callable(getattr(pl_module, "render_example", None)) else None,
        tokenizer=_module_attr(trainer, pl_module, "tokenizer"),
        label_names=_module_attr(trainer, pl_module, "class_names"),
        max_scan=MAX_SCAN,
    )
    views = ExampleViews(meta={"callback": callback.name, "illustrates": [str(r.artifact.relative_to(callback.output_dir)) for r in reports]})
    if train_src is not None and train_ids:
        views.train = example_views(train_src, train_ids, **common)
    if query_src is not None and query_ids:
        views.queries = example_views(query_src, query_ids, **common)
    return save_views(views, callback.artifact_path("examples"))


def _html(callbacks: list) -> Optional[Path]:
    from ..report import write_html_report

    dirs = [c.output_dir for c in callbacks]
    parents = {d.parent for d in dirs}
    root = parents.pop() if len(parents) == 1 else dirs[-1]
    return write_html_report(root, root / "plots" / "report.html")


def publish_outputs(callback: Any, trainer: Any, pl_module: Any, callbacks: list) -> None:
    """Save the rendered top examples, write the HTML report (when ``callback`` is the last of
    ``callbacks``, the trainer's influence callbacks that have an output folder) and send both
    with the callback's folder to MLflow / W&B loggers; rank zero only; a failure is a warning,
    never an error (see the module docstring)."""
    if not trainer.is_global_zero or callback.output_dir is None or not callback.output_dir.exists():
        return
    steps = [("render the top examples", lambda: save_examples(callback, trainer, pl_module))]
    if any(type(lg).__name__ in TRACKERS for lg in trainer.loggers):
        steps.append(("send the artifacts to the experiment tracker",
                      lambda: log_artifacts(trainer, callback.output_dir, f"influence/{callback.name}")))
    if callbacks[-1:] == [callback]:
        steps.append(("write the HTML report", lambda: _publish_html(trainer, callbacks)))
    for what, step in steps:
        try:
            step()
        except Exception as e:  # showing results must never fail a finished training run
            rank_zero_warn(f"{type(callback).__name__}({callback.name!r}) could not {what}: {type(e).__name__}: {e}")


def _publish_html(trainer: Any, callbacks: list) -> None:
    path = _html(callbacks)
    if path is not None:
        log_artifacts(trainer, path, "influence")
