"""One rank of a training run: `python -m train RECIPE [key=value ...] --run-dir DIR [--resume ...]`
(train/__main__.py calls `main` here; `slurm.rank` calls it in-process).

Started by `communs train` through torchrun, by srun + torchrun on a cluster, or alone (then it is a
one-process run: RANK=0, WORLD_SIZE=1 and a free local port are set). The recipe is validated again
here, before the process group starts. Exit codes: see train/__init__.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from common.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (recipes/*.yaml)")
    p.add_argument(
        "overrides", nargs="*", help="recipe overrides key=value, e.g. phases.pretrain.tokens=2M seed=1"
    )
    p.add_argument("--run-dir", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--resume", choices=("auto", "never", "force"), default="auto",
                   help="auto: from the newest valid checkpoint if any; never: fresh (refused if checkpoints exist); "
                   "force: even from a different recipe or data manifest")  # fmt: skip
    p.add_argument(
        "--stop-at-step", type=int, help="checkpoint after this many steps and exit 75 (resumable)"
    )


def run_rank(args: argparse.Namespace) -> int:
    from train import loop
    from train.recipe import load_recipe, validate_inputs
    from train.telemetry import update_run_json

    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    run_dir = None
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        run_dir = Path(args.run_dir or Path("runs") / recipe.name).absolute()
        validate_inputs(recipe, world, args.recipe)
        return loop.run(recipe, run_dir, resume=args.resume, stop_at_step=args.stop_at_step)
    except UserError as e:
        if rank == 0:
            print(f"communs train: error: {e}", file=sys.stderr, flush=True)
            if run_dir is not None and run_dir.is_dir():
                update_run_json(run_dir, status="failed", error=str(e), error_kind="input")
        return 2
    except loop.TrainingAborted as e:
        if rank == 0:
            print(f"communs train: aborted: {e}", file=sys.stderr, flush=True)
        return 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))  # fmt: skip
    return run_rank(args)
