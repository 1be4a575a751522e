"""Subcommands of the ``lightning-influence`` console script, one module each.

A command module defines ``NAME`` (the subcommand), ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int`` (the exit code: 0 ok, 2 bad input). :data:`COMMANDS` lists them; adding a
command is one module and one entry here.
"""

from __future__ import annotations

__all__ = ["COMMANDS"]

COMMANDS = ("report", "build_index", "query", "finish")
"""Module names under :mod:`lightning_influence.commands`, in ``--help`` order."""
