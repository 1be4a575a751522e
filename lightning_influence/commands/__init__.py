"""Subcommands of the ``lightning-influence`` console script, one module each.

A command module defines ``NAME`` (the subcommand), ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int`` (the exit code: 0 ok, 2 bad input, from :func:`fail`). :data:`COMMANDS` lists them; adding a
command is one module and one entry here.
"""

from __future__ import annotations

import sys

__all__ = ["COMMANDS", "fail"]

COMMANDS = ("report", "build_index", "query", "finish")
"""Module names under :mod:`lightning_influence.commands`, in ``--help`` order."""


def fail(problem: object) -> int:
    """Print ``error: <problem>`` to stderr (the library's ``allow_other_weights=True`` spelled as
    the option ``--allow-other-weights``) and return the exit code for bad input, 2."""
    print(f"error: {problem}".replace("pass allow_other_weights=True", "pass --allow-other-weights"), file=sys.stderr)
    return 2
