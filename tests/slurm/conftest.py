"""Fixtures for the Slurm tests: the local cluster (skip when none answers), job waiting, fake runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import communs

ROOT = Path(__file__).resolve().parents[2]


def cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here (None when a controller answers with an idle node)."""
    if shutil.which("sinfo") is None:
        return "sinfo not found (start one: scripts/slurm-cluster.sh up)"
    # `scontrol ping` answers at once; sinfo retries for ~10 s when no controller listens.
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"no Slurm controller answers (scontrol ping: {' '.join(ping.stdout.split()[:5])})"
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no Slurm controller answers"
    if res.returncode != 0:
        return f"no Slurm cluster answers: {' '.join(res.stderr.split())[:200]}"
    if not any(s.strip() in ("idle", "mixed", "allocated") for s in res.stdout.splitlines()):
        return f"no usable Slurm node (states: {res.stdout.split()})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


def job_state(job_id: int) -> dict[str, str]:
    res = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    if res.returncode != 0:
        return {}
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_final(job_id: int, timeout: float) -> dict[str, str]:
    """Wait until a job reaches a final state (a requeued job passes through PENDING again)."""
    return wait_for(
        lambda: (st := job_state(job_id)) and st.get("JobState") in FINAL and st,
        timeout,
        f"job {job_id} to end",
    )


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fake_plan(run_dir: Path, chain: str, phases: list[tuple[str, int]], sleep: float = 0.0, fail_phase=None,
              nodes: int = 1, procs_per_node: int = 1, time_limit_s: int = 600):  # fmt: skip
    """A RunPlan whose ranks run tests.slurm.fake_trainer: the real scripts, chains and requeues,
    without DeepSpeed. Returns (plan, script paths) written into run_dir/slurm/."""
    from slurm.profiles import load_profile
    from slurm.render import make_launch
    from slurm.submit import GitState, JobPlan, RunPlan, render_jobs, write_plan

    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / "fake-plan.json"
    spec.write_text(json.dumps({"phases": [{"name": n, "steps": s} for n, s in phases], "sleep": sleep,
                                "fail_phase": fail_phase}))  # fmt: skip
    profile = load_profile("local-cpu").replace(procs_per_node=procs_per_node)
    launch = make_launch(profile, nodes=nodes, time_limit_s=time_limit_s)
    base = ("tests.slurm.fake_trainer", str(spec), "--run-dir", str(run_dir), "--resume", "auto")
    if chain == "one-job":
        jobs = [JobPlan("all", base)]
    else:
        ends = [sum(s for _, s in phases[: i + 1]) for i in range(len(phases))]
        jobs = [
            JobPlan(n, base + (("--stop-at-step", str(e)) if i < len(phases) - 1 else ()),
                    done_step=e if i < len(phases) - 1 else 0)
            for i, ((n, _), e) in enumerate(zip(phases, ends))
        ]  # fmt: skip
    plan = RunPlan(
        run_dir=run_dir, launch=launch, chain=chain, jobs=jobs, git=GitState(commit=None, dirty=False)
    )
    render_jobs(plan, python=sys.executable, code_dir=ROOT)
    return plan, write_plan(plan)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The embedded demo corpus prepared once per session: through `communs slurm prepare-data` when a
    cluster answers (so that the data-preparation job is tested for real at no extra cost), else by
    `communs data prepare` here."""
    out = tmp_path_factory.mktemp("slurm-demo-data")
    sources = str(ROOT / "data" / "demo" / "sources.yaml")
    if cluster_problem() is None:
        argv = [
            "slurm",
            "prepare-data",
            sources,
            "--profile",
            "local-cpu",
            "--out",
            str(out),
            "--allow-dirty",
        ]
        assert communs.main(argv) == 0
        job = json.loads((out / "slurm" / "prepare.json").read_text())["job_id"]
        st = wait_final(job, 300)
        logs = "".join(p.read_text()[-2000:] for p in (out / "slurm").glob("*.out"))
        assert st["JobState"] == "COMPLETED", logs
        assert f"communs slurm: job {job} preparing {sources} into {out}" in logs
    else:
        assert communs.main(["data", "prepare", sources, "--out", str(out)]) == 0
    assert (out / "manifest.json").is_file()
    return out


def tiny_recipe(data: Path, path: Path) -> Path:
    """recipes/demo.yaml cut to a few steps per phase (8 + 3 + 3), logging and checkpointing often."""
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe["name"] = "slurm-tiny"
    recipe["tokenizer"]["path"] = str(data / "tokenizer" / "tokenizer.model")
    recipe["data"]["manifest"] = str(data / "manifest.json")
    recipe["checkpoint"] = {"interval": 3, "keep_last": 1}
    recipe["logging"] = {"interval": 1, "val_tokens": 2048}
    recipe["model"]["overrides"].update(dim=64, n_layers=2, ffn_dim=192)
    for phase, steps in zip(recipe["phases"], (8, 3, 3)):
        phase.update(tokens=steps * 2048, batch_tokens=2048, micro_batch_size=2, seq_len=128)
        phase["lr"]["warmup_tokens"] = 2048
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
