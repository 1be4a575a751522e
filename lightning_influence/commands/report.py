"""``lightning-influence report RUN_DIR``: the top examples per callback, as a table, JSON or CSV;
PNG plots and the self-contained HTML report ``report.html`` into ``RUN_DIR/influence/plots``
(unless ``--no-plots``), and the HTML report to ``--html OUT`` when given."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..report.methods import SCORE_FORMS

NAME = "report"
HELP = "summarise a run's influence/ artifacts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run's log directory (or its influence/ folder)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--top-k", type=int, default=10, help="examples per ranking (default 10)")
    p.add_argument("--queries", type=int, default=5, help="queries with proponent/opponent lists (default 5)")
    p.add_argument("--scores", choices=SCORE_FORMS, default="all",
                   help="score forms shown beside the raw one in the table and HTML: normalised (÷ the median "
                        "|score| of the ranking), rank (top p%%) or all (default)")
    p.add_argument("--html", metavar="OUT", default=None, help="also write the HTML report to OUT")
    p.add_argument("--mark-ids", metavar="FILE", default=None,
                   help="a file of training ids (one per line or comma-separated) to mark in the plots and HTML, "
                        "e.g. known mislabeled examples")
    p.add_argument("--mark-label", default="marked", help="what the marked ids are (legend and badge text)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots and plots/report.html")
    p.add_argument("--plots-dir", default=None, help="where to write plots (default: <influence>/plots)")


def _read_ids(path: str) -> list[int]:
    text = Path(path).read_text()
    return [int(t) for t in text.replace(",", " ").split()]


def run(args: argparse.Namespace) -> int:
    from ..report import collect_report, find_influence_dir, render, write_html_report, write_plots
    from ..storage import ArtifactError

    if args.top_k < 1 or args.queries < 0:
        print("error: --top-k must be >= 1 and --queries >= 0", file=sys.stderr)
        return 2
    try:
        marks = None if args.mark_ids is None else _read_ids(args.mark_ids)
    except (OSError, ValueError) as e:
        print(f"error: --mark-ids {args.mark_ids}: {e}", file=sys.stderr)
        return 2
    try:
        reports = collect_report(args.run_dir, top_k=args.top_k, queries=args.queries)
    except (FileNotFoundError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in (n for r in reports for n in r.notes if n.startswith("skipped")):
        print(f"warning: {note}", file=sys.stderr)
    print(render(reports, args.format, scores=args.scores))
    pages = [Path(args.html)] if args.html else []
    if not args.no_plots:
        out = Path(args.plots_dir) if args.plots_dir else find_influence_dir(args.run_dir) / "plots"
        pages.append(out / "report.html")
        try:
            paths = write_plots(reports, out, mark_ids=marks, mark_label=args.mark_label)
        except ImportError as e:
            print(f"note: {e}", file=sys.stderr)
        else:
            for p in paths:
                print(f"wrote {p}", file=sys.stderr)
    if pages:  # one page, copied where asked twice
        first = write_html_report(args.run_dir, pages[0], reports=reports, scores=args.scores, mark_ids=marks,
                                  mark_label=args.mark_label)
        for page in pages[1:]:
            page.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(first, page)
        for page in pages:
            print(f"wrote {page}", file=sys.stderr)
    return 0
