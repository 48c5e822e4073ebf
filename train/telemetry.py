"""What a run says about itself: run-directory files, metrics.jsonl, wandb, console progress, MFU.

Only rank 0 writes. metrics.jsonl is always written (one JSON object per line, flushed per line);
wandb is optional, offline when there is no API key, and a failure to start it is a warning, never an
error; the console shows a tqdm bar with loss, lr, grad norm, tokens/s and MFU.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

# Dense bf16 peak FLOP/s per GPU (datasheets, no sparsity). MFU on GPU is measured against these.
GPU_PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
}


def git_state() -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment(world_size: int) -> dict:
    """Versions, git commit + dirty flag, host and devices: env.json."""
    import deepspeed
    import numpy

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "world_size": world_size,
        "git": git_state(),
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for lib in ("transformers", "sentencepiece", "safetensors", "wandb", "omegaconf"):
        try:
            env[lib] = __import__(lib).__version__
        except Exception:
            env[lib] = None
    return env


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + os.replace): readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def update_run_json(run_dir: Path, **fields: Any) -> dict:
    path = run_dir / "run.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json(path, data)
    return data


# ----------------------------------------------------------------------------------------------------
# Peak FLOP/s and memory


def measured_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 1.0
) -> float:
    """Best FLOP/s of a square matmul on this device and thread count (the CPU's MFU denominator)."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: allocation, thread pool
        a @ b
    best = 0.0
    start = time.perf_counter()
    for _ in range(200):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        if time.perf_counter() - start > seconds:
            break
    return best


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of this rank's device, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if precision in ("bf16", "fp16"):
            for key, flops in GPU_PEAK_BF16.items():
                if key in name:
                    return flops, f"{name} datasheet dense bf16"
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        return measured_matmul_flops(device, dtype), f"{name} measured {dtype} matmul"
    threads = torch.get_num_threads()
    return measured_matmul_flops(device), f"CPU measured fp32 1024^3 matmul, {threads} thread(s)"


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


# ----------------------------------------------------------------------------------------------------
# Rank 0's writers


def open_metrics(path: Path):
    """metrics.jsonl opened for appending. A line cut by a kill -9 (the file does not end in a newline)
    was never complete: it is truncated away first, so the next record starts on a line of its own."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                # the last newline, searched backwards in blocks (the file can be large)
                end = f.seek(0, os.SEEK_END)
                keep, pos = 0, end
                while pos > 0:
                    start = max(0, pos - 65536)
                    f.seek(start)
                    cut = f.read(pos - start).rfind(b"\n")
                    if cut >= 0:
                        keep = start + cut + 1
                        break
                    pos = start
                f.truncate(keep)
    return open(path, "a")


class Telemetry:
    """metrics.jsonl + optional wandb + a tqdm bar; every method is a no-op off rank 0."""

    def __init__(self, run_dir: Path, rank: int, total_steps: int, recipe: Any, resumed_step: int = 0):
        self.active = rank == 0
        self.metrics = None
        self.wandb = None
        self.bar = None
        if not self.active:
            return
        self.metrics = open_metrics(run_dir / "metrics.jsonl")
        if recipe.logging.wandb_project and os.environ.get("WANDB_MODE") != "disabled":
            self.wandb = _start_wandb(run_dir, recipe)
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=resumed_step, unit="step", dynamic_ncols=True, mininterval=1.0,
                        file=sys.stderr)  # fmt: skip

    def log(self, record: dict) -> None:
        if not self.active:
            return
        self.metrics.write(json.dumps(record, sort_keys=True) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            try:
                flat = {
                    f"{record.get('kind', 'train')}/{k}": v
                    for k, v in record.items()
                    if isinstance(v, (int, float))
                }
                self.wandb.log(flat, step=record.get("step"))
            except Exception as e:  # wandb must never stop training
                self.message(f"wandb: log failed ({e}); continuing without it")
                self.wandb = None

    def progress(self, phase: str, n: int = 1, **shown: float) -> None:
        if self.bar is None:
            return
        self.bar.set_description(phase, refresh=False)
        self.bar.set_postfix({k: _short(v) for k, v in shown.items()}, refresh=False)
        self.bar.update(n)

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass


def _short(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v != v or abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3):
        return f"{v:.2e}"
    return f"{v:.4g}"


def _start_wandb(run_dir: Path, recipe: Any) -> Any:
    try:
        import wandb

        offline = recipe.logging.wandb_offline or not (os.environ.get("WANDB_API_KEY") or _has_netrc_key())
        return wandb.init(
            project=recipe.logging.wandb_project,
            name=recipe.name,
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE") or ("offline" if offline else "online"),
            resume="allow",
            id=_wandb_id(run_dir),
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
    except Exception as e:
        print(
            f"wandb: could not start ({' '.join(str(e).split())[:200]}); metrics.jsonl only", file=sys.stderr
        )
        return None


def _has_netrc_key() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="replace")


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, resumed across restarts."""
    path = run_dir / "wandb_id"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:16] + "\n")
    return path.read_text().strip()


def summarize(metrics_path: Path, phases: list[str]) -> dict:
    """Per-phase loss start -> end, tokens, tokens/s and last validation losses, from metrics.jsonl.

    Steps redone after a resume appear twice in the file: the last record of a step wins."""
    train: dict[int, dict] = {}
    val: dict[str, dict] = {}
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill -9
            if r.get("kind") == "train":
                train[r["step"]] = r
            elif r.get("kind") == "val":
                val[r["phase"]] = r
    out = []
    for name in phases:
        recs = [train[s] for s in sorted(train) if train[s]["phase"] == name]
        if not recs:
            continue
        rates = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
        out.append(
            {
                "name": name,
                "loss_start": recs[0]["loss"],
                "loss_end": recs[-1]["loss"],
                "steps": recs[-1]["step_in_phase"],
                "tokens": recs[-1]["phase_tokens"],
                "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else 0.0,
                "mfu": recs[-1].get("mfu"),
                "val_loss": val.get(name, {}).get("losses"),
            }
        )
    return {"phases": out}
