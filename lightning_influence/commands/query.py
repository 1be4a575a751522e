"""``lightning-influence query INDEX --model SPEC --queries SPEC``: the top training examples per
query from an influence index (no pass over the training data), as a table, JSON or CSV, and
optionally saved as a ``"scores"`` artifact that ``lightning-influence report`` reads.

``SPEC`` is ``module.path:name`` or ``path/to/file.py:name``. For ``--model`` it names an
``nn.Module`` (an instance, a class or a factory function), loaded from ``--checkpoint`` when
given (a Lightning checkpoint's ``state_dict``, or a plain state dict): a LightningModule class is
built with the hyper-parameters its checkpoint saved, any class with ``--model-kwargs JSON``.
For ``--queries`` (and ``--train``, to show the training examples) it names a ``Dataset`` or
``DataLoader`` (or a function returning one), or is a file saved with ``torch.save``; with ids
(``IndexedDataset``) to name the examples. The model's weights must be the ones the index was
built with (``--allow-other-weights`` to use others).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from . import fail
from ._objects import add_model_arguments, load_dataset, load_loader, load_model

NAME = "query"
HELP = "top training examples per query from an influence index"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="the index folder (build_index or InfluenceIndexCallback's <folder>/index)")
    add_model_arguments(p, "the index was built with")
    p.add_argument("--queries", required=True, help="module.path:name, file.py:name or a torch.save'd file of the query "
                                                     "Dataset / DataLoader")
    p.add_argument("--train", default=None, help="the training Dataset (same forms as --queries), to show the examples listed")
    p.add_argument("--collate", default=None, help="module.path:name of a collate function (queries given as a Dataset)")
    p.add_argument("--batch-size", type=int, default=32, help="query batch size for a Dataset (default 32)")
    p.add_argument("--top-k", "-k", type=int, default=10, help="training examples per query (default 10)")
    p.add_argument("--opponents", action="store_true", help="also list the most harmful examples")
    p.add_argument("--approximate", action="store_true", help="use the index's FAISS index (FaissSearch.build)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--out", default=None, help="save the result as a 'scores' artifact in this folder")


def _views(model: Any, train: Any, queries: Any, top: Any) -> tuple[dict[int, Any], dict[int, Any]]:
    """Views of the listed training examples (when ``--train`` is given) and of the queries."""
    from ..report.views import example_views

    render = getattr(model, "render_example", None)
    ids = sorted({int(i) for i in top.ids.reshape(-1).tolist() if i >= 0}
                 | ({int(i) for i in top.opponent_ids.reshape(-1).tolist() if i >= 0} if top.opponent_ids is not None else set()))
    source = getattr(queries, "dataset", queries)
    qviews = example_views(source, [int(q) for q in top.query_ids.tolist()], model=model, render=render)
    tviews = {} if train is None else example_views(getattr(train, "dataset", train), ids, model=model, render=render)
    return tviews, qviews


def run(args: argparse.Namespace) -> int:
    from ..index.search import load_index, top_as_scores
    from ..report import MethodReport, render
    from ..scores import save_scores
    from ..index.shards import InfluenceIndexError
    from ..storage import ArtifactError
    from ..weights import WeightsMismatchError

    if args.top_k < 1 or args.batch_size < 1:
        return fail("--top-k and --batch-size must be >= 1")
    try:
        model = load_model(args.model, args.checkpoint, args.model_kwargs)
        queries = load_loader(args.queries, "queries", args.batch_size, args.collate)
        train = load_dataset(args.train, "train") if args.train else None
        index = load_index(args.index, model=model, allow_other_weights=args.allow_other_weights)
        approximate = None
        if args.approximate:
            from ..index.approximate import FaissSearch

            approximate = FaissSearch.load(index)
        top = index.search(queries, k=args.top_k, opponents=args.opponents, approximate=approximate)
        tviews, qviews = _views(model, train, queries, top)
    except (WeightsMismatchError, ValueError, ImportError, ArtifactError, FileNotFoundError, InfluenceIndexError) as e:
        return fail(e)
    scores = top_as_scores(top, options={**index.options(), "approximate": bool(args.approximate), "n_train": index.n_examples})
    rep = MethodReport("index query", Path(args.index), label="query")
    rep.summary = {"train_examples": index.n_examples, "queries": int(top.query_ids.shape[0]), "compression": index.compression}
    rep.pairwise_top = top.as_rows()
    print(_table(rep, args.opponents, tviews, qviews, train_given=train is not None) if args.format == "table"
          else render([rep], args.format))
    if args.out:
        path = save_scores(scores, args.out, top_k=args.top_k)
        print(f"wrote {path}", file=sys.stderr)
        if tviews or qviews:
            from ..report.views import ExampleViews, save_views

            views = save_views(ExampleViews(tviews, qviews, {"source": "lightning-influence query"}), Path(args.out).parent / f"{Path(args.out).name}_examples")
            print(f"wrote {views}  (the examples, for lightning-influence report's HTML page)", file=sys.stderr)
    return 0


def _table(rep, opponents: bool, tviews: dict, qviews: dict, train_given: bool) -> str:
    from ..report.views import view_line

    def line(views: dict, i: int) -> str:
        v = views.get(int(i))
        return f"  {view_line(v)}" if v is not None else ""

    lines = [f"== index query  ({rep.artifact})", "   " + ", ".join(f"{k}={v}" for k, v in rep.summary.items())]
    if not train_given:
        lines.append("   (training examples by id; pass --train SPEC to see them)")
    for item in rep.pairwise_top:
        q = item["query_id"]
        lines.append(f"   query {q}:{line(qviews, q)}")
        for direction, title in (("proponents", "proponents (help)"), ("opponents", "opponents (hurt)")):
            if direction == "opponents" and not opponents:
                continue
            lines.append(f"     {title}")
            for rank, (i, s) in enumerate(item[direction]):
                lines.append(f"      {rank + 1:>3}. {i:>8} {s:>+12.5g}{line(tviews, i)}")
    return "\n".join(lines) + "\n"
