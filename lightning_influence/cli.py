"""Console script ``lightning-influence``: one subcommand per module of
:mod:`lightning_influence.commands` (``lightning-influence --help`` lists them).

* ``lightning-influence report RUN_DIR``: the most self-influential training examples per
  callback and, for pairwise results, the top proponents and opponents per query, with plots;
* ``lightning-influence finish-factors CHECKPOINT``: EK-FAC factors from a checkpoint whose
  end-of-fit work did not finish (see docs/guarantees.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .commands import COMMANDS

__all__ = ["main"]


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    p = argparse.ArgumentParser(prog="lightning-influence", description="Influence reports and queries from lightning-influence artifacts.")
    sub = p.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        mod = importlib.import_module(f"lightning_influence.commands.{name}")
        mod.add_arguments(sub.add_parser(mod.NAME, help=mod.HELP, description=mod.__doc__))
        modules[mod.NAME] = mod
    return p, modules


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 bad input)."""
    parser, modules = _parser()
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
