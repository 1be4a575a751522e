"""Console script ``lightning-influence``.

``lightning-influence report RUN_DIR [--format table|json|csv] [--top-k K] [--queries Q] [--no-plots]``
prints the most self-influential training examples per method and, for pairwise results, the
top proponents and opponents per query; it writes PNG plots into
``RUN_DIR/influence/plots`` unless ``--no-plots``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-influence", description="Influence reports from lightning-influence artifacts.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="summarise a run's influence/ artifacts")
    r.add_argument("run_dir", help="the run's log directory (or its influence/ folder)")
    r.add_argument("--format", choices=("table", "json", "csv"), default="table")
    r.add_argument("--top-k", type=int, default=10, help="examples per ranking (default 10)")
    r.add_argument("--queries", type=int, default=5, help="queries with proponent/opponent lists (default 5)")
    r.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    r.add_argument("--plots-dir", default=None, help="where to write plots (default: <influence>/plots)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    from .report import collect_report, find_influence_dir, render, write_plots
    from .storage import ArtifactError

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
