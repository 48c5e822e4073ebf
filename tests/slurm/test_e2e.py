"""The tiny demo recipe trained for real (DeepSpeed, 2 CPU ranks over gloo, one per emulated node) through
`communs slurm submit` on the local cluster: an uninterrupted run, the same run pre-empted mid-phase
(USR1 → checkpoint → exit 75 → requeue → resume), and the same recipe as a chain of one job per phase.
All three must log the same loss at every step and end with the same final loss, bit for bit.

The three runs are submitted together (the cluster's two nodes take them side by side), once per module.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

import communs

from .conftest import ROOT, events, job_state, tiny_recipe, wait_final, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def one_rank_per_node_profile(path: Path) -> Path:
    """local-cpu with one rank per node: 2 nodes make the 2 ranks, so the rendezvous crosses nodes."""
    profile = yaml.safe_load((ROOT / "slurm" / "profiles" / "local-cpu.yaml").read_text())
    profile.update(procs_per_node=1, cpus_per_node=1, time_limit="00:10:00")
    path.write_text(yaml.safe_dump(profile))
    return path


def submit(recipe: Path, profile: Path, run_dir: Path, chain: str) -> list[int]:
    rc = communs.main(["slurm", "submit", str(recipe), "--profile", str(profile), "--nodes", "2",
                       "--run-dir", str(run_dir), "--chain", chain, "--allow-dirty"])  # fmt: skip
    assert rc == 0
    sub = json.loads((run_dir / "slurm" / "submissions.jsonl").read_text().splitlines()[-1])
    return [j["job_id"] for j in sub["jobs"]]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (resumed before its checkpoint) must log the same loss."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            assert out.setdefault(rec["step"], rec["loss"]) == rec["loss"], rec
    return out


@pytest.fixture(scope="module")
def runs(slurm_cluster, demo_data, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("slurm-e2e")
    recipe = tiny_recipe(demo_data, tmp / "tiny.yaml")
    profile = one_rank_per_node_profile(tmp / "local-cpu-1.yaml")
    dirs = {name: tmp / name for name in ("straight", "preempted", "chain")}
    jobs = {
        "straight": submit(recipe, profile, dirs["straight"], "one-job"),
        "preempted": submit(recipe, profile, dirs["preempted"], "one-job"),
        "chain": submit(recipe, profile, dirs["chain"], "per-phase"),
    }

    # Pre-empt mid-phase: USR1 to the job's steps, as `--signal=USR1@N` does before the wall time.
    def logged_step(n: int) -> bool:
        m = dirs["preempted"] / "metrics.jsonl"
        return m.exists() and any(json.loads(x).get("step", 0) >= n for x in m.read_text().splitlines())

    wait_for(lambda: logged_step(2), 180, "the pre-empted run's step 2")
    subprocess.run(["scancel", "--signal=USR1", str(jobs["preempted"][0])], check=True)

    for name, ids in jobs.items():
        for jid in ids:
            st = wait_final(jid, 240)
            assert st["JobState"] == "COMPLETED", (name, st, (dirs[name] / "slurm" / "logs").glob("*"))
    return {**dirs, "jobs": jobs}  # type: ignore[dict-item]


def test_submitted_run_finishes(runs):
    run = runs["straight"]
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    summary = json.loads((run / "summary.json").read_text())
    assert [p["name"] for p in summary["phases"]] == ["pretrain", "maths", "education"]
    assert sorted(train_losses(run)) == list(range(1, 15))
    ev = events(run)
    assert [(e["event"], e.get("outcome")) for e in ev] == [("start", None), ("end", "finished")]
    assert ev[0]["nodes"] == "cn[1-2]"
    for phase in ("pretrain", "maths", "education"):
        assert (run / "export" / phase / "model.safetensors").is_file()
    assert (run / "slurm" / "recipe.yaml").is_file() and (run / "slurm" / "all.sbatch").is_file()


def test_preempted_run_requeues_resumes_and_ends_with_the_same_loss(runs):
    straight, run = runs["straight"], runs["preempted"]
    (job,) = runs["jobs"]["preempted"]
    assert job_state(job)["Restarts"] == "1"
    ev = events(run)
    assert [(e["event"], e.get("outcome"), e["restart"]) for e in ev] == [
        ("start", None, 0), ("end", "requeue", 0), ("start", None, 1), ("end", "finished", 1)
    ]  # fmt: skip
    codes = sorted(p.read_text().strip() for p in (run / "slurm" / "attempts" / f"{job}.0").glob("rank*"))
    assert codes == ["75", "75"]
    ref, got = train_losses(straight), train_losses(run)
    assert got == ref  # every step's loss, bit for bit
    final = [json.loads((r / "summary.json").read_text())["phases"][-1]["loss_end"] for r in (straight, run)]
    assert final[0] == final[1]
    from slurm.status import run_status

    st = run_status(run)
    assert st["finished"] and st["requeues"] == 1 and st["jobs"][0]["attempts"] == 2
    assert st["last_checkpoint"] is not None


def test_per_phase_chain_matches_the_single_job(runs):
    straight, run = runs["straight"], runs["chain"]
    ids = runs["jobs"]["chain"]
    assert len(ids) == 3
    assert [p.name for p in sorted((run / "slurm").glob("*.sbatch"))] == [
        "00-pretrain.sbatch", "01-maths.sbatch", "02-education.sbatch"
    ]  # fmt: skip
    ends = [(e["label"], e["outcome"]) for e in events(run) if e["event"] == "end"]
    assert ends == [("pretrain", "finished"), ("maths", "finished"), ("education", "finished")]
    assert train_losses(run) == train_losses(straight)
