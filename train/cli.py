"""`communs train RECIPE [key=value ...] [--run-dir DIR] [--nproc N] [--resume auto|never|force]`.

Validates the recipe completely (schema, files, vocab, mixture, budgets, batch divisibility) and the
resume point, writes the run directory, then launches `torchrun --standalone --nproc_per_node N -m train`
(one process per rank, `train/__main__.py`). Under a launcher that already set RANK (srun + torchrun
on a cluster), it runs this process as one rank instead. SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) are
forwarded to the ranks through torchrun (told to handle all three and to wait long enough), which
finish their step, checkpoint and stop; the exit code is then EXIT_REQUEUE (75).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from train import EXIT_OK, EXIT_REQUEUE
from train.rank import add_arguments, run_rank

REPO = Path(__file__).resolve().parent.parent


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a recipe, all its phases, resumable (DeepSpeed, torchrun)")
    add_arguments(p)
    p.add_argument("--nproc", type=int, default=1, help="processes (ranks) on this machine (default 1)")
    p.add_argument("--dry-run", action="store_true", help="validate, write the run directory, print the plan")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if "RANK" in os.environ:  # already one rank of a launched job
        return run_rank(args)

    from train import checkpoint, loop
    from train.recipe import load_recipe, plan_phases, recipe_hash, validate_inputs
    from train.telemetry import update_run_json

    recipe = load_recipe(args.recipe, args.overrides)
    world = args.nproc
    if world < 1:
        from common.errors import UserError

        raise UserError(f"--nproc {world}: must be >= 1")
    manifest = validate_inputs(recipe, world, args.recipe)
    run_dir = Path(args.run_dir or Path("runs") / recipe.name).absolute()
    # refuse a mismatched resume now, not after the launch (the ranks verify the files' hashes again)
    # (--resume never: the checkpoints' files are hashed here, a fresh start over unusable ones being allowed)
    point = checkpoint.find_resume(run_dir / "checkpoints", recipe_hash(recipe), manifest["root_hash"], args.resume,
                                   verify_files=args.resume == "never", log=lambda msg: None)  # fmt: skip
    if point is not None:
        loop.check_world_size(point, world, recipe.deepspeed.zero_stage)
    loop.prepare_run_dir(recipe, run_dir, world)
    update_run_json(run_dir, status="launching", recipe=recipe.name, world_size=world)
    plans = plan_phases(recipe, world)
    print(f"train: {recipe.name} -> {run_dir}", flush=True)
    for p in plans:
        print(
            f"  phase {p.name:<14} {p.phase.kind:<17} {p.steps:>7,} steps x {p.phase.batch_tokens:,} tokens "
            f"(seq {p.phase.seq_len}, {p.seqs_per_step} seqs = {world} ranks x {p.grad_accum} x "
            f"{p.phase.micro_batch_size}), lr {p.peak_lr:.2e} {p.phase.lr.schedule}",
            flush=True,
        )
    if args.dry_run:
        return EXIT_OK

    cmd = torchrun_command(world, recipe.deepspeed.timeout_minutes) + [
        "-m", "train", str(run_dir / "recipe.yaml"), "--run-dir", str(run_dir), "--resume", args.resume,
    ]  # fmt: skip
    if args.stop_at_step is not None:
        cmd += ["--stop-at-step", str(args.stop_at_step)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    return launch(cmd, env, run_dir)


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def torchrun_command(world: int, timeout_minutes: float) -> list[str]:
    """torchrun, set to pass every stop signal on to the ranks and to wait for them to checkpoint.

    torchrun forwards the signals it handles to its workers and, `--shutdown-timeout` seconds later,
    SIGKILLs them (30 s by default: too short for a large checkpoint). SIGUSR1 is not handled by default
    (its default action would kill torchrun itself). The wait allowed is one collective timeout (the
    longest a rank can block) plus 10 minutes for the checkpoint write."""
    shutdown = int(timeout_minutes * 60) + 600
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
        "--signals-to-handle", ",".join((*STOP_SIGNALS, "SIGHUP", "SIGQUIT")), "--shutdown-timeout", str(shutdown),
    ]  # fmt: skip


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def launch(cmd: list[str], env: dict, run_dir: Path) -> int:
    """Run torchrun, copy its output to the console and RUN/logs/, forward stop signals, map the exit code."""
    from train.telemetry import update_run_json

    log_path = run_dir / "logs" / f"train-{time.strftime('%Y%m%dT%H%M%S')}.log"
    # A session of its own: a Ctrl-C at the terminal reaches this process only, which forwards it once
    # (torchrun handling a second signal while it waits for the ranks would cut its wait short).
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,
                             start_new_session=True)  # fmt: skip
    forwarded: list[int] = []

    def forward(signum, frame) -> None:
        if child.poll() is None:
            if not forwarded:
                child.send_signal(signum)  # torchrun passes it on to every rank (torchrun_command)
            elif signum == signal.SIGINT and signal.SIGINT in forwarded:
                os.killpg(child.pid, signal.SIGKILL)  # a second Ctrl-C: quit now, without a checkpoint
        forwarded.append(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        with open(log_path, "ab") as log:
            while (
                chunk := child.stdout.read1(65536)
                if hasattr(child.stdout, "read1")
                else child.stdout.read(4096)
            ):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
        rc = child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    status = _status(run_dir)
    if status == "finished" and rc == 0:
        return EXIT_OK
    if status == "preempted":
        return EXIT_REQUEUE
    if status == "failed":
        return 2 if _error_kind(run_dir) == "input" else 1
    update_run_json(run_dir, status="failed", error=f"torchrun exited {rc}")
    return rc or 1


def _status(run_dir: Path) -> str | None:
    import json

    try:
        return json.loads((run_dir / "run.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def _error_kind(run_dir: Path) -> str | None:
    import json

    try:
        return json.loads((run_dir / "run.json").read_text()).get("error_kind")
    except (OSError, ValueError):
        return None
