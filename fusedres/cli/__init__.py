"""``python -m fusedres <command>``: the command line, apart from the library.

Each command is a thin layer over the library: ``check`` over fusedres.check_model,
``bench`` over fusedres.benchmark, ``degradation`` and ``lesion`` over
fusedres/experiments.py. A user's mistake (an unknown model, no GPU for ``--device cuda``,
a size the model cannot take, a bad FUSEDRES_BACKEND, a folder that cannot be written)
ends in one line on stderr and exit status 2, never in a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..api import UsageError

__all__ = ["main", "parser"]


class _OneLinePerCommand(argparse.HelpFormatter):
    """argparse's formatter, leaving room for the longest command name ('degradation'): it
    sizes the help column from the options alone and would put that command's help on
    a line of its own."""

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action._get_subactions():
                width = len(self._format_action_invocation(sub)) + self._current_indent + 2
                self._action_max_length = max(self._action_max_length, width)


def parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    from .. import __version__
    from . import bench, check, experiments
    p = argparse.ArgumentParser(
        prog="python -m fusedres",
        description="fusedres: Triton kernels fusing batch norm, ReLU and the residual add "
                    "of ResNet blocks. Check and time them on your own model.",
        epilog="'python -m fusedres COMMAND --help' lists a command's options.",
        formatter_class=_OneLinePerCommand)
    p.add_argument("--version", action="version", version=f"fusedres {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    check.add_parser(sub)
    bench.add_parser(sub)
    experiments.add_parsers(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit status (argparse exits 2 itself on bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"python -m fusedres {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"python -m fusedres {args.command}: interrupted", file=sys.stderr)
        return 130
