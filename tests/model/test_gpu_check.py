"""The CPU-runnable parts of benchmarks/gpu_check.{sh,py}: the same code, small settings, on CPU."""

import importlib.util
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_on_cpu(tmp_path):
    gpu_check = load_gpu_check()
    rc = gpu_check.main(
        ["--out", str(tmp_path), "--device", "cpu", "--sizes", "tiny", "--seq", "64", "--batch", "2",
         "--steps", "1", "--warmup", "1", "--no-compile"]
    )  # fmt: skip
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0
    measured = [c for c in result["checks"] if "loss_abs_diff" in c]
    assert len(measured) == 2 and all(c["ok"] for c in measured)  # sdpa x torch, causal and packed
    assert all(c["loss_abs_diff"] < 1e-4 and c["worst_grad_cosine"] > 0.9999 for c in measured)
    (run,) = result["runs"]
    assert run["size"] == "tiny" and run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1
    assert "| tiny |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_budget_skips_runs_and_fails(tmp_path):
    gpu_check = load_gpu_check()
    rc = gpu_check.main(
        ["--out", str(tmp_path), "--device", "cpu", "--sizes", "tiny", "--budget-s", "0", "--no-compile"]
    )
    (run,) = json.loads((tmp_path / "gpu_check.json").read_text())["runs"]
    assert rc == 1 and run["error"].startswith("skipped: over --budget-s 0")


def test_gpu_check_sh_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
