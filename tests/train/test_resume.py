"""Exact resume under `communs train` with 2 processes (torchrun, gloo, DeepSpeed): stopping anywhere
(a signal, --stop-at-step at a phase boundary, kill -9 in the middle of a checkpoint write) and resuming
gives losses bit-identical to an uninterrupted run, at ZeRO 1 and ZeRO 3. Seven launches in all."""

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
    assert sorted(expected) == list(range(1, 15))

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
    assert json.loads((run_dir / "summary.json").read_text())["phases"][1]["loss_end"] == float(expected[14])


def test_zero3_sigterm_then_resume(tiny_recipe, tmp_path):
    straight = run(tiny_recipe, tmp_path / "straight", "deepspeed.zero_stage=3")
    assert straight.returncode == EXIT_OK, straight.stdout[-3000:]
    expected = losses(tmp_path / "straight")

    run_dir = tmp_path / "signalled"
    proc = subprocess.Popen(train_cmd(tiny_recipe, run_dir, "deepspeed.zero_stage=3"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and '"step": 3,' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what Slurm sends before the time limit / on pre-emption
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_REQUEUE, out[-3000:]
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "preempted" and 3 <= status["step"] < 14

    done = run(tiny_recipe, run_dir, "deepspeed.zero_stage=3")
    assert done.returncode == EXIT_OK, done.stdout[-3000:]
    assert f"resuming from step-{status['step']:08d}" in done.stdout
    assert losses(run_dir) == expected
