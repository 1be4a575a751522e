"""``lightning-influence report RUN_DIR``: the top examples per callback, as a table, JSON or CSV;
PNG plots and the self-contained HTML report ``report.html`` into ``RUN_DIR/influence/plots``
(unless ``--no-plots``), and the HTML report to ``--html [OUT]`` when given (without ``OUT``:
the page in the plots folder, whose path is printed).

A page the training run wrote knows things this command cannot find in the artifacts (the ids
it marked, e.g. flipped labels; examples rendered from its datasets): the command keeps the
marked ids when no ``--mark-ids`` is given, and never replaces a page that shows more rendered
examples or predicted labels than it can: it writes ``report-cli.html`` beside it instead."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..report.methods import SCORE_FORMS
from . import fail

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
    p.add_argument("--html", metavar="OUT", nargs="?", const="", default=None,
                   help="write the HTML report (to OUT; without OUT to <influence>/plots/report.html) and print its path")
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
    from ..report import HTML_NAME, collect_report, collect_views, find_influence_dir, render, write_html_report, write_plots
    from ..report.html import page_record
    from ..storage import ArtifactError

    if args.top_k < 1 or args.queries < 0:
        return fail("--top-k must be >= 1 and --queries >= 0")
    try:
        marks = None if args.mark_ids is None else _read_ids(args.mark_ids)
    except (OSError, ValueError) as e:
        return fail(f"--mark-ids {args.mark_ids}: {e}")
    try:
        reports = collect_report(args.run_dir, top_k=args.top_k, queries=args.queries)
    except (FileNotFoundError, ArtifactError) as e:
        return fail(e)
    for note in (n for r in reports for n in r.notes if n.startswith("skipped")):
        print(f"warning: {note}", file=sys.stderr)
    print(render(reports, args.format, scores=args.scores, views=collect_views(args.run_dir)))
    plots_dir = Path(args.plots_dir) if args.plots_dir else find_influence_dir(args.run_dir) / "plots"
    pages = [] if args.html is None else [Path(args.html) if args.html else plots_dir / HTML_NAME]
    if not args.no_plots and plots_dir / HTML_NAME not in pages:
        pages.append(plots_dir / HTML_NAME)
    if marks is None:  # the marks a page of this run already carries (e.g. the training run's flipped labels)
        for page in pages:
            record = page_record(page)
            if record and record.get("mark_ids"):
                marks, args.mark_label = [int(i) for i in record["mark_ids"]], str(record.get("mark_label") or args.mark_label)
                print(f"note: kept the {len(marks)} ids marked '{args.mark_label}' on {page} (--mark-ids FILE replaces them)",
                      file=sys.stderr)
                break
    if not args.no_plots:
        try:
            paths = write_plots(reports, plots_dir, mark_ids=marks, mark_label=args.mark_label)
        except ImportError as e:
            print(f"note: {e}", file=sys.stderr)
        else:
            for p in paths:
                print(f"wrote {p}", file=sys.stderr)
    for page in pages:
        notes: list[str] = []
        written = write_html_report(args.run_dir, page, reports=reports, scores=args.scores, mark_ids=marks,
                                    mark_label=args.mark_label, keep_richer=True, notes=notes)
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        print(f"wrote {written}" + ("  (open it in a browser)" if args.html is not None else ""), file=sys.stderr)
    return 0
