"""Exact resume under `communs train` with 2 processes (torchrun, gloo, DeepSpeed): stopping anywhere
(SIGUSR1 or Ctrl-C's SIGINT to `communs train`, --stop-at-step at a phase boundary, kill -9 in the middle of
a checkpoint write) and resuming gives losses bit-identical to an uninterrupted run, at ZeRO 1 and ZeRO 3,
across a phase change of sequence length and RoPE base. Eight launches in all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train import EXIT_OK, EXIT_REQUEUE
from train.loop import FAULT_ENV

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def env(**extra) -> dict:
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    e.update(PYTHONPATH=str(ROOT), WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    return e


def train_cmd(recipe: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "communs.py"),
        "train",
        str(recipe),
        *extra,
        "--run-dir",
        str(run_dir),
        "--nproc",
        "2",
    ]


def run(recipe, run_dir, *extra, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(recipe, run_dir, *extra), env=env(**env_extra), capture_output=True, text=True, timeout=240
    )


def losses(run_dir: Path) -> dict[int, str]:
    """step -> loss as written (repr of the float): the last record of a step wins (redone after a resume)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = repr(r["loss"])
    return out


def test_zero1_kill_during_checkpoint_then_stop_at_phase_boundary(tiny_recipe, tmp_path):
    straight = run(tiny_recipe, tmp_path / "straight")
    assert straight.returncode == EXIT_OK, straight.stdout[-3000:]
    expected = losses(tmp_path / "straight")
    assert sorted(expected) == list(range(1, 12))

    run_dir = tmp_path / "interrupted"
    # kill -9 of rank 0 after every rank wrote step 4's files, before the commit
    killed = run(tiny_recipe, run_dir, **{FAULT_ENV: "4"})
    assert killed.returncode not in (EXIT_OK, EXIT_REQUEUE), killed.stdout[-3000:]
    ckpts = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert "step-00000002" in ckpts and "step-00000004" not in ckpts and ".tmp-step-00000004" in ckpts
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000002"

    # resume from step 2, stop at the phase boundary (step 8, the phase-end checkpoint)
    stopped = run(tiny_recipe, run_dir, "--stop-at-step", "8")
    assert stopped.returncode == EXIT_REQUEUE, stopped.stdout[-3000:]
    assert "resuming from step-00000002" in stopped.stdout
    assert json.loads((run_dir / "run.json").read_text())["status"] == "preempted"
    assert (run_dir / "export" / "first" / "model.safetensors").exists()

    # resume across the boundary into the second phase, to the end
    done = run(tiny_recipe, run_dir)
    assert done.returncode == EXIT_OK, done.stdout[-3000:]
    assert "resuming from step-00000008" in done.stdout
    assert losses(run_dir) == expected  # bit-identical, every step
    assert json.loads((run_dir / "summary.json").read_text())["phases"][1]["loss_end"] == float(expected[11])


def signal_at_step(cmd: list[str], run_dir: Path, step: int, sig: int) -> tuple[subprocess.Popen, str]:
    """Launch, send `sig` to `communs train` once metrics.jsonl has a record of `step`, wait for the end."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and f'"step": {step},' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=180)
    return proc, out


def test_zero3_sigusr1_then_ctrl_c_then_resume(tiny_recipe, tmp_path):
    straight = run(tiny_recipe, tmp_path / "straight", "deepspeed.zero_stage=3")
    assert straight.returncode == EXIT_OK, straight.stdout[-3000:]
    expected = losses(tmp_path / "straight")

    run_dir = tmp_path / "signalled"
    cmd = train_cmd(tiny_recipe, run_dir, "deepspeed.zero_stage=3")
    # SIGUSR1: what a Slurm script asks for before the time limit (--signal=USR1@...); torchrun handles it
    proc, out = signal_at_step(cmd, run_dir, 3, signal.SIGUSR1)
    assert proc.returncode == EXIT_REQUEUE, out[-3000:]
    first = json.loads((run_dir / "run.json").read_text())
    assert first["status"] == "preempted" and 3 <= first["step"] < 11

    # Ctrl-C (SIGINT to communs train only: torchrun runs in a session of its own), two steps later
    proc, out = signal_at_step(cmd, run_dir, first["step"] + 2, signal.SIGINT)
    assert proc.returncode == EXIT_REQUEUE, out[-3000:]
    # (torchrun itself reports the signal with a traceback; the ranks handle SIGINT, no KeyboardInterrupt)
    assert f"resuming from step-{first['step']:08d}" in out and "KeyboardInterrupt" not in out
    second = json.loads((run_dir / "run.json").read_text())
    assert second["status"] == "preempted" and first["step"] + 2 <= second["step"] < 11

    done = run(tiny_recipe, run_dir, "deepspeed.zero_stage=3")
    assert done.returncode == EXIT_OK, done.stdout[-3000:]
    assert f"resuming from step-{second['step']:08d}" in done.stdout
    assert losses(run_dir) == expected
    assert sorted(p.name for p in run_dir.glob("env*.json")) == ["env-1.json", "env-2.json", "env.json"]
