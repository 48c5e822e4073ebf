"""Per-rank entry under torchrun in a Slurm job: run `MODULE`'s `main(argv) -> int` (what `python -m
MODULE ARGS…` runs, e.g. train/__main__.py), record the exit code in ATTEMPT_DIR/rank<RANK>, exit with it.

Why: torchrun reports any failing rank as exit 1, so the trainer's "checkpointed, not finished" code
(75, train.EXIT_REQUEUE) would not reach the batch script, which must tell a requeue from a failure.
The trainer runs in this very process, so USR1/TERM reach its own handlers unchanged.

    python -m slurm.rank ATTEMPT_DIR MODULE [ARGS…]
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path


def exit_code(exc: SystemExit) -> int:
    """The status a process exits with for this SystemExit (Python's own rule)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    return 1


def entry_point(module: str):
    """`main` of MODULE, or of MODULE.__main__ when MODULE is a package (what `python -m` runs)."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(f"no module named {module!r}")
    name = f"{module}.__main__" if spec.submodule_search_locations is not None else module
    return importlib.import_module(name).main


def run(attempt_dir: Path, module: str, args: list[str]) -> int:
    rank = os.environ.get("RANK", "0")
    try:
        code = int(entry_point(module)(args) or 0)
    except SystemExit as e:
        code = exit_code(e)
    except BaseException:  # an uncaught exception: Python's exit status 1, with the traceback
        traceback.print_exc()
        code = 1
    attempt_dir.mkdir(parents=True, exist_ok=True)
    tmp = attempt_dir / f".rank{rank}.tmp"
    tmp.write_text(f"{code}\n")
    tmp.replace(attempt_dir / f"rank{rank}")
    return code


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m slurm.rank ATTEMPT_DIR MODULE [ARGS...]")
    code = run(Path(argv[0]), argv[1], argv[2:])
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit, as `python -m train` does: DeepSpeed/gloo teardown at interpreter exit can hang.
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
