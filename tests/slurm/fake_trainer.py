"""A stand-in for `python -m train` with the same interface and run-directory traces, for testing the
Slurm plumbing (requeue, chains, failures, status) in seconds instead of DeepSpeed launches.

    python -m tests.slurm.fake_trainer PLAN.json --run-dir RUN [--resume auto] [--stop-at-step N]

PLAN.json: {"phases": [{"name": "a", "steps": 5}, ...], "sleep": 0.2, "fail_phase": "b" | null}.
Steps count over the whole run, as train's do. Writes RUN/checkpoints/latest (`step-%08d`, committed at
each step), RUN/metrics.jsonl, RUN/run.json and RUN/summary.json like the trainer; exits 75 after a
USR1/TERM or at --stop-at-step (when steps remain), 3 when it reaches `fail_phase`, 0 when done.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

EXIT_REQUEUE = 75


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fake_trainer")
    ap.add_argument("plan")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--resume", default="auto")
    ap.add_argument("--stop-at-step", type=int)
    args = ap.parse_args(argv)
    plan = json.loads(Path(args.plan).read_text())
    run = Path(args.run_dir)
    rank = int(os.environ.get("RANK", "0"))
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    with open(run / f"ranks-{rank}.jsonl", "a") as f:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "DS_ACCELERATOR")
        f.write(json.dumps({k: os.environ.get(k) for k in keys}) + "\n")

    stop: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    latest = run / "checkpoints" / "latest"
    step = int(latest.read_text().strip().split("-")[1]) if latest.exists() else 0
    first = 0
    for ph in plan["phases"]:
        end = first + ph["steps"]
        while step < end:
            if ph["name"] == plan.get("fail_phase"):
                print(f"fake trainer: phase {ph['name']} fails on purpose", file=sys.stderr, flush=True)
                return 3
            time.sleep(plan.get("sleep", 0.0))
            step += 1
            if rank == 0:
                with open(run / "metrics.jsonl", "a") as f:
                    f.write(
                        json.dumps({"kind": "train", "phase": ph["name"], "step": step, "loss": 10.0 / step})
                        + "\n"
                    )
                (run / "checkpoints" / ".latest.tmp").write_text(f"step-{step:08d}\n")
                os.replace(run / "checkpoints" / ".latest.tmp", latest)
            last = step == sum(p["steps"] for p in plan["phases"])
            if not last and (stop or (args.stop_at_step is not None and step >= args.stop_at_step)):
                print(f"fake trainer: stopping at step {step}: exit {EXIT_REQUEUE}", flush=True)
                if rank == 0:
                    (run / "run.json").write_text(json.dumps({"status": "preempted", "step": step}))
                return EXIT_REQUEUE
        first = end
    if rank == 0:
        (run / "run.json").write_text(json.dumps({"status": "finished", "step": step}))
        (run / "summary.json").write_text(json.dumps({"status": "finished", "steps": step}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
