"""The Slurm plumbing on a real cluster (scripts/slurm-cluster.sh), with a stand-in trainer
(tests/slurm/fake_trainer.py) so that each job takes seconds: 2-node srun + torchrun rendezvous,
pre-emption by USR1 to the batch shell → checkpoint → requeue → resume, a chain of
one job per phase, and a failed phase cancelling the rest of its chain."""

from __future__ import annotations

import json
import subprocess

import pytest

from slurm.status import format_status, run_status
from slurm.submit import submit_plan

from .conftest import events, fake_plan, job_state, wait_final, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _step_reached(run_dir, n):
    latest = run_dir / "checkpoints" / "latest"
    return latest.exists() and int(latest.read_text().split("-")[1]) >= n


def test_two_nodes_preempted_by_a_batch_signal_requeue_and_resume(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    plan, paths = fake_plan(run_dir, "one-job", [("a", 10), ("b", 10)], sleep=0.4, nodes=2)
    (job,) = submit_plan(plan, paths, argv=["test"])

    # USR1 to the batch shell only (`--signal=B:USR1@N`, `scancel --batch`): its trap passes it on to the
    # ranks. (USR1 to the steps, what `--signal=USR1@N` does, is test_e2e's pre-emption.)
    wait_for(lambda: _step_reached(run_dir, 3), 60, "step 3")
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)

    st = wait_final(job, 120)
    assert st["JobState"] == "COMPLETED" and st["Restarts"] == "1", st
    evs = events(run_dir)
    assert [(e["event"], e.get("outcome"), e["restart"]) for e in evs] == [
        ("start", None, 0), ("end", "requeue", 0), ("start", None, 1), ("end", "finished", 1),
    ]  # fmt: skip
    assert evs[0]["nodes"] == "cn[1-2]"
    # every step exactly once: each attempt resumed where the previous one checkpointed
    assert _steps(run_dir) == list(range(1, 21))
    # both nodes' ranks ran in every attempt, as ranks 0 and 1 of a world of 2
    ranks = [
        json.loads(line) for f in sorted(run_dir.glob("ranks-*.jsonl")) for line in f.read_text().splitlines()
    ]
    assert sorted((r["RANK"], r["WORLD_SIZE"], r["SLURM_RESTART_COUNT"] or "0") for r in ranks) == [
        (str(rank), "2", str(restart)) for rank in (0, 1) for restart in (0, 1)
    ]
    # slurm.rank recorded each rank's own exit code (torchrun itself exits 1 for any failing rank)
    codes = {
        (p.parent.name, p.name): p.read_text().strip()
        for p in (run_dir / "slurm" / "attempts").glob("*/rank*")
    }
    assert codes == {(f"{job}.{a}", f"rank{r}"): ("0" if a == 1 else "75") for a in (0, 1) for r in (0, 1)}

    status = run_status(run_dir)
    assert status["finished"] and status["requeues"] == 1 and status["step"] == 20
    assert status["jobs"] == [{"label": "all", "job_id": job, "attempts": 2, "requeues": 1, "outcome": "finished",
                               "slurm": status["jobs"][0]["slurm"]}]  # fmt: skip
    assert status["jobs"][0]["slurm"]["JobState"] == "COMPLETED"
    text = format_status(status)
    assert "state      finished" in text and "requeues   1" in text and f"{job}" in text
    log = (run_dir / "slurm" / "logs" / f"{run_dir.name}-all-{job}.out").read_text()
    assert log.count("communs slurm: job") == 2  # --open-mode=append kept every attempt's output


def test_per_phase_chain_runs_in_order(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    plan, paths = fake_plan(run_dir, "per-phase", [("a", 3), ("b", 4), ("c", 2)])
    jobs = submit_plan(plan, paths, argv=["test"])
    assert len(jobs) == 3
    assert (
        f"afterok:{jobs[0]}" in job_state(jobs[1]).get("Dependency", "")
        or job_state(jobs[1])["JobState"] != "PENDING"
    )
    states = [wait_final(j, 90)["JobState"] for j in jobs]
    assert states == ["COMPLETED"] * 3
    assert _steps(run_dir) == list(range(1, 10))
    # each phase's job stopped at its phase's end (exit 75 at --stop-at-step) and counted as finished
    evs = events(run_dir)
    assert [(e["label"], e.get("outcome")) for e in evs if e["event"] == "end"] == [
        ("a", "finished"), ("b", "finished"), ("c", "finished")
    ]  # fmt: skip
    st = run_status(run_dir)
    assert (
        st["finished"] and st["chain"] == "per-phase" and [j["label"] for j in st["jobs"]] == ["a", "b", "c"]
    )


def test_failed_phase_cancels_the_rest(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    plan, paths = fake_plan(run_dir, "per-phase", [("a", 2), ("b", 2), ("c", 2)], fail_phase="b")
    jobs = submit_plan(plan, paths, argv=["test"])
    final = [wait_final(j, 90) for j in jobs]
    assert [s["JobState"] for s in final] == ["COMPLETED", "FAILED", "CANCELLED"]
    assert final[2]["Reason"] == "DependencyNeverSatisfied"
    assert _steps(run_dir) == [1, 2]
    ends = [e for e in events(run_dir) if e["event"] == "end"]
    assert [(e["label"], e["outcome"]) for e in ends] == [("a", "finished"), ("b", "failed")]
    assert ends[1]["rank_codes"] == "3"
    st = run_status(run_dir)
    assert not st["finished"] and [j["outcome"] for j in st["jobs"]] == ["finished", "failed", None]
