"""`communs`: the one command-line entry point.

Each package registers its own subcommands (`register(subparsers)` in its `cli.py`); this file only
dispatches. Errors meant for the user are `UserError`s: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from common.errors import UserError

# (subcommand, module that defines it); imported lazily so that `communs --help` stays fast.
COMMANDS = {
    "data": "corpus.cli",
    "tokenizer": "tokenizer.cli",
    "train": "train.cli",
    "eval": "eval.cli",
    "generate": "eval.cli",
    "slurm": "slurm.cli",
    "demo": "app.demo",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="communs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    modules = {COMMANDS[wanted]} if wanted else dict.fromkeys(COMMANDS.values())
    for name in modules:
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"communs {args.command}: error: {e}", file=sys.stderr)
        return 2
