"""``lightning-influence report RUN_DIR``: the top examples per callback, as a table, JSON or CSV,
and PNG plots into ``RUN_DIR/influence/plots`` (unless ``--no-plots``)."""

from __future__ import annotations

import argparse
import sys

NAME = "report"
HELP = "summarise a run's influence/ artifacts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run's log directory (or its influence/ folder)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--top-k", type=int, default=10, help="examples per ranking (default 10)")
    p.add_argument("--queries", type=int, default=5, help="queries with proponent/opponent lists (default 5)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--plots-dir", default=None, help="where to write plots (default: <influence>/plots)")


def run(args: argparse.Namespace) -> int:
    from ..report import collect_report, find_influence_dir, render, write_plots
    from ..storage import ArtifactError

    if args.top_k < 1 or args.queries < 0:
        print("error: --top-k must be >= 1 and --queries >= 0", file=sys.stderr)
        return 2
    try:
        reports = collect_report(args.run_dir, top_k=args.top_k, queries=args.queries)
    except (FileNotFoundError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in (n for r in reports for n in r.notes if n.startswith("skipped")):
        print(f"warning: {note}", file=sys.stderr)
    print(render(reports, args.format))
    if not args.no_plots:
        out = args.plots_dir or find_influence_dir(args.run_dir) / "plots"
        try:
            paths = write_plots(reports, out)
        except ImportError as e:
            print(f"note: {e}", file=sys.stderr)
        else:
            for p in paths:
                print(f"wrote {p}", file=sys.stderr)
    return 0
