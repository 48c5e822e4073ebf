"""`communs slurm render|submit` on the tiny demo recipe: the plan of each chain, and each bad input
refused with one error line (exit 2) before anything is written or submitted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import communs
from common.errors import UserError
from slurm.profiles import load_profile
from slurm.render import make_launch
from slurm.submit import plan_training

from .conftest import tiny_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe(demo_data, tmp_path_factory) -> Path:
    return tiny_recipe(demo_data, tmp_path_factory.mktemp("slurm-cli") / "tiny.yaml")


def _error(capsys, argv: list[str]) -> str:
    assert communs.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_render_per_phase_chain(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    rc = communs.main(["slurm", "render", str(recipe), "--profile", "local-cpu", "--run-dir", str(run),
                       "--chain", "per-phase", "seed=3"])  # fmt: skip
    assert rc == 0
    names = sorted(p.name for p in (run / "slurm").glob("*.sbatch"))
    assert names == ["00-pretrain.sbatch", "01-maths.sbatch", "02-education.sbatch"]
    texts = [(run / "slurm" / n).read_text() for n in names]
    # phases end at global steps 8 and 11 (8 + 3 + 3 steps): each job stops at its phase's end
    assert "--stop-at-step 8" in texts[0] and "DONE_STEP=8" in texts[0]
    assert "--stop-at-step 11" in texts[1] and "DONE_STEP=11" in texts[1]
    assert "--resume auto &\n" in texts[2] and "DONE_STEP=0" in texts[2]  # the last phase runs to the end
    for t in texts:
        assert f"train {run / 'slurm' / 'recipe.yaml'} --run-dir {run} --resume auto" in t
    resolved = (run / "slurm" / "recipe.yaml").read_text()
    assert "seed: 3" in resolved  # overrides are applied in the recipe the jobs train
    assert not (run / "slurm" / "submissions.jsonl").exists()  # render submits nothing
    assert "3 job(s), 1 node(s) x 2 rank(s), chain per-phase" in capsys.readouterr().out


def test_dry_run_submits_nothing(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    rc = communs.main(["slurm", "submit", str(recipe), "--profile", "local-cpu", "--run-dir", str(run),
                       "--nodes", "2", "--dry-run", "--allow-dirty"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert f"would run: sbatch --parsable {run / 'slurm' / 'all.sbatch'}" in out
    assert not (run / "slurm" / "submissions.jsonl").exists()
    assert "#SBATCH --nodes=2" in (run / "slurm" / "all.sbatch").read_text()


def test_time_limit_too_short_for_the_recipe(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["slurm", "submit", str(recipe), "--profile", "local-cpu", "--run-dir", str(run), "--allow-dirty"]
    err = _error(capsys, [*argv, "--time", "00:01:00"])
    # 60 s - 60 s startup - 30 s lead: no time to train (the estimate: the tiny model's FLOPs at 5 GFLOP/s)
    assert err.startswith(
        f"communs slurm: error: time limit 00:01:00 is too short for phase 'pretrain' of {recipe}: after startup "
        "(60 s, profile local-cpu) and the checkpoint lead (30 s) it leaves 0 s of training, but "
        "checkpoint.interval 3 needs 3 steps x ~"
    )
    # with a given step time: 3 min leaves 90 s, and 3 steps x 40 s do not fit
    err = _error(capsys, [*argv, "--time", "3", "--step-time", "40"])
    assert err.endswith(
        "it leaves 90 s of training, but checkpoint.interval 3 needs 3 steps x ~40 s = 120 s; raise --time, "
        "lower checkpoint.interval, or give --step-time"
    )
    assert not run.exists()


def test_bad_inputs_are_refused_before_anything_is_written(recipe, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("IDRPROJ", "abc")
    err = _error(capsys, ["slurm", "submit", str(recipe), "--profile", "jean-zay-h100", "--gpus-per-node", "8",
                          "--run-dir", str(run)])  # fmt: skip
    assert "--gpus-per-node 8: profile jean-zay-h100" in err and "has gpus_per_node: 4" in err
    bad = tmp_path / "site.yaml"
    bad.write_text(
        (Path(communs.__file__).parent / "slurm/profiles/local-cpu.yaml")
        .read_text()
        .replace("account: communs-ci\n", "")
    )
    err = _error(capsys, ["slurm", "submit", str(recipe), "--profile", str(bad), "--run-dir", str(run)])
    assert (
        err
        == f"communs slurm: error: profile {bad}: missing key 'account' (write `account: null` for a cluster without accounts)"
    )
    err = _error(capsys, ["slurm", "render", str(recipe), "--profile", "local-cpu", "--run-dir", str(run),
                          "phases.pretrain.batch_tokens=1000"])  # fmt: skip
    assert "phases[0].batch_tokens" in err  # the recipe's own checks, for this job's world size
    assert not run.exists()


def test_dirty_tree_refused_then_recorded(recipe, tmp_path):
    repo = tmp_path / "code"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    (repo / "a.py").write_text("x = 2\n")
    launch = make_launch(load_profile("local-cpu"))
    with pytest.raises(
        UserError, match=r"has uncommitted changes \(M a.py\): commit them .* or pass --allow-dirty"
    ):
        plan_training(str(recipe), [], launch, tmp_path / "run", "one-job", code_dir=repo)
    assert not (tmp_path / "run").exists()

    from slurm.submit import record_submission, write_plan

    plan = plan_training(
        str(recipe), [], launch, tmp_path / "run", "one-job", allow_dirty=True, code_dir=repo
    )
    paths = write_plan(plan)
    record_submission(plan, paths, [123], ["communs", "slurm", "submit"])
    assert "+x = 2" in (tmp_path / "run" / "slurm" / "git.diff").read_text()
    rec = json.loads((tmp_path / "run" / "slurm" / "submissions.jsonl").read_text())
    assert rec["git"]["dirty"] is True and rec["git"]["changes"] == [" M a.py"]
    assert rec["jobs"] == [{"label": "all", "job_id": 123, "script": str(paths[0])}]
