"""``lightning-influence query INDEX --model SPEC --queries SPEC``: the top training examples per
query from an influence index (no pass over the training data), as a table, JSON or CSV, and
optionally saved as a ``"scores"`` artifact that ``lightning-influence report`` reads.

``SPEC`` is ``module.path:name`` or ``path/to/file.py:name``. For ``--model`` it names an
``nn.Module`` (a class or a function called without arguments, or an instance), loaded from
``--checkpoint`` when given (a Lightning checkpoint's ``state_dict``, or a plain state dict); for
``--queries`` a ``Dataset`` or ``DataLoader`` (or a function returning one) whose batches the
model's task reads, with ids (``IndexedDataset``) to name the queries.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._objects import load_object

NAME = "query"
HELP = "top training examples per query from an influence index"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="the index folder (build_index or InfluenceIndexCallback's <folder>/index)")
    p.add_argument("--model", required=True, help="module.path:name or file.py:name of the model (class, factory or instance)")
    p.add_argument("--checkpoint", default=None, help="weights for the model (Lightning checkpoint or state dict)")
    p.add_argument("--queries", required=True, help="module.path:name or file.py:name of the query Dataset / DataLoader")
    p.add_argument("--collate", default=None, help="module.path:name of a collate function (queries given as a Dataset)")
    p.add_argument("--batch-size", type=int, default=32, help="query batch size for a Dataset (default 32)")
    p.add_argument("--top-k", "-k", type=int, default=10, help="training examples per query (default 10)")
    p.add_argument("--opponents", action="store_true", help="also list the most harmful examples")
    p.add_argument("--approximate", action="store_true", help="use the index's FAISS index (FaissSearch.build)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--out", default=None, help="save the result as a 'scores' artifact in this folder")


def _model(spec: str, checkpoint: Any):
    import torch
    from torch import nn

    obj = load_object(spec)
    try:
        model = obj if isinstance(obj, nn.Module) else obj()
    except TypeError as e:
        raise ValueError(f"--model {spec} cannot be called without arguments ({e}); name a factory function") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec} gave {type(model).__name__}, not an nn.Module")
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict(state)
    return model.eval()


def _queries(spec: str, collate: Any, batch_size: int):
    from torch.utils.data import DataLoader, Dataset

    obj = load_object(spec)
    if callable(obj) and not isinstance(obj, (Dataset, DataLoader)):
        try:
            obj = obj()
        except TypeError as e:
            raise ValueError(f"--queries {spec} cannot be called without arguments ({e}); name a factory function") from e
    if isinstance(obj, DataLoader):
        return obj
    return DataLoader(obj, batch_size=batch_size, shuffle=False, collate_fn=load_object(collate) if collate else None)


def run(args: argparse.Namespace) -> int:
    from ..index.search import load_index, top_as_scores
    from ..report import MethodReport, render
    from ..scores import save_scores
    from ..storage import ArtifactError

    if args.top_k < 1 or args.batch_size < 1:
        print("error: --top-k and --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        model = _model(args.model, args.checkpoint)
        queries = _queries(args.queries, args.collate, args.batch_size)
        index = load_index(args.index, model=model)
        approximate = None
        if args.approximate:
            from ..index.approximate import FaissSearch

            approximate = FaissSearch.load(index)
        top = index.search(queries, k=args.top_k, opponents=args.opponents, approximate=approximate)
    except (ValueError, ImportError, ArtifactError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scores = top_as_scores(top, options={**index.options(), "approximate": bool(args.approximate)})
    rep = MethodReport("index query", Path(args.index), label="query")
    rep.summary = {"train_examples": index.n_examples, "queries": int(top.query_ids.shape[0]), "compression": index.compression}
    rep.pairwise_top = top.as_rows()
    print(_table(rep, args.opponents) if args.format == "table" else render([rep], args.format))
    if args.out:
        path = save_scores(scores, args.out, top_k=args.top_k)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _table(rep, opponents: bool) -> str:
    lines = [f"== index query  ({rep.artifact})", "   " + ", ".join(f"{k}={v}" for k, v in rep.summary.items())]
    for item in rep.pairwise_top:
        lines.append(f"   query {item['query_id']}: proponents (help)" + ("         | opponents (hurt)" if opponents else ""))
        for rank, (i, s) in enumerate(item["proponents"]):
            row = f"      {rank + 1:>3}. {i:>8} {s:>+12.5g}"
            if opponents and rank < len(item["opponents"]):
                j, t = item["opponents"][rank]
                row += f"       | {j:>8} {t:>+12.5g}"
            lines.append(row)
    return "\n".join(lines) + "\n"
