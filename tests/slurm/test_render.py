"""Rendering and the checks before submission, without a cluster: the sbatch script's directives, its
multi-node launch (run under recorded SLURM_* variables with stand-ins for srun/scontrol/torchrun), the
requeue decision, and each bad input (GPUs per node, wall time, dirty tree) as one clear error."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.errors import UserError
from slurm.profiles import load_profile
from slurm.render import check_time_limit, estimate_step_time, make_launch, render_train_script
from slurm.submit import (
    GitState,
    JobPlan,
    RunPlan,
    check_clean,
    git_state,
    render_jobs,
    sbatch_commands,
    write_plan,
)

ROOT = Path(__file__).resolve().parents[2]


def _script(
    tmp_path: Path, profile: str = "generic-gpu", nodes: int = 2, gpus: int | None = None, **kw
) -> str:
    launch = make_launch(load_profile(profile, environ={"IDRPROJ": "abc"}), nodes, gpus)
    args = dict(run_dir=tmp_path / "run", code_dir=ROOT, python="/opt/py/bin/python", label="all",
                job_name="demo-all", command=["train", "/r.yaml", "--run-dir", str(tmp_path / "run")])  # fmt: skip
    return render_train_script(launch, **{**args, **kw})


def test_directives_jean_zay(tmp_path):
    text = _script(tmp_path, "jean-zay-h100", nodes=4)
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=96",
        "#SBATCH --time=20:00:00",
        "#SBATCH --signal=USR1@600",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --partition=gpu_p6",
        "#SBATCH --account=abc@h100",
        "#SBATCH --qos=qos_gpu_h100-t3",
        "#SBATCH --constraint=h100",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --hint=nomultithread",
        "module purge",
        "module load arch/h100",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
    ]:
        assert line in text.splitlines(), line
    assert (
        "--nproc_per_node=4" in text
        and "--rdzv_backend=c10d" in text
        and "--cpus-per-task=96 --wait=600" in text
        and not any(l.lstrip().startswith("ssh") for l in text.splitlines())
    )
    assert "{{" not in text
    # bash accepts it
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_cpu_profile_has_no_gres_nor_account_when_null(tmp_path):
    text = _script(tmp_path, "local-cpu", nodes=1)
    assert "--gres" not in text and "#SBATCH --account=communs-ci" in text
    assert "export DS_ACCELERATOR=cpu" in text and "--nproc_per_node=2" in text
    assert "--account" not in _script(tmp_path, "generic-gpu")


def test_more_gpus_per_node_than_the_profile_has():
    with pytest.raises(
        UserError,
        match=r"--gpus-per-node 8: profile jean-zay-h100 \(.*jean-zay-h100.yaml\) has gpus_per_node: 4",
    ):
        make_launch(load_profile("jean-zay-h100", environ={"IDRPROJ": "abc"}), 2, 8)
    with pytest.raises(UserError, match=r"--gpus-per-node 1: profile local-cpu .* is a CPU profile"):
        make_launch(load_profile("local-cpu"), 1, 1)
    assert make_launch(load_profile("jean-zay-h100", environ={"IDRPROJ": "abc"}), 2, 2).world_size == 4


def test_time_limit_above_the_qos():
    with pytest.raises(
        UserError, match=r"--time 1-00:00:00: above the profile jean-zay-h100's max_time_limit 20:00:00"
    ):
        make_launch(load_profile("jean-zay-h100", environ={"IDRPROJ": "abc"}), 1, None, 24 * 3600)


def test_time_limit_too_short_for_the_checkpoint_interval():
    launch = make_launch(load_profile("jean-zay-h100", environ={"IDRPROJ": "abc"}), 1, None, 2 * 3600)
    # 2 h - 900 s startup - 600 s lead = 5700 s of training; 1000 steps x 6 s = 6000 s do not fit.
    with pytest.raises(UserError) as e:
        check_time_limit(launch, 1000, 6.0, "phase 'pretrain' of r.yaml")
    assert str(e.value) == (
        "time limit 02:00:00 is too short for phase 'pretrain' of r.yaml: after startup (900 s, profile "
        "jean-zay-h100) and the checkpoint lead (600 s) it leaves 5700 s of training, but "
        "checkpoint.interval 1000 needs 1000 steps x ~6 s = 6000 s; raise --time, lower checkpoint.interval, "
        "or give --step-time"
    )
    check_time_limit(launch, 1000, 5.6, "ok")  # 5600 s fits
    # interval 0 (phase ends and signals only) still needs one step to fit
    with pytest.raises(UserError, match=r"checkpoint.interval 0 needs 1 steps x ~6e\+03 s"):
        check_time_limit(launch, 0, 6000.0, "x")


def test_step_time_estimate_is_flops_over_throughput():
    launch = make_launch(load_profile("jean-zay-h100", environ={"IDRPROJ": "abc"}), 2, None)  # 8 ranks
    # 4M tokens x 6e10 FLOP/token over 8 x 350 TFLOP/s
    assert estimate_step_time(4 * 2**20, 6e10, launch) == pytest.approx(
        4 * 2**20 * 6e10 / (8 * 350e12), rel=1e-12
    )


# ------------------------------------------------------------------------------------------------------
# The script run under recorded SLURM_* variables: 2 emulated nodes, stand-ins for srun/scontrol/torchrun


FAKE_SRUN = """#!/bin/bash
# srun stand-in: one task per node, in parallel, with the variables slurmstepd sets
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURMD_NODENAME=cn$((i + 1)) "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'cn1\\ncn2\\n' ;;
  "show node") echo "NodeName=$4 Arch=x86_64 NodeAddr=10.0.0.${4#cn} NodeHostName=$4 State=ALLOCATED" ;;
  *) echo "scontrol $*" >>"$FAKE_LOG" ;;
esac
"""

# The python of the profile: records what each node's "torchrun" got, writes each rank's exit code as
# slurm.rank would, and exits like torchrun (1 when any rank failed).
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
argv = sys.argv[1:]
ignored = int([l for l in open("/proc/self/status") if l.startswith("SigIgn:")][0].split()[1], 16)
keep = ("SLURM_NODEID", "TORCHELASTIC_SIGNALS_TO_HANDLE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "PYTHONPATH", "OMP_NUM_THREADS")
rec = {{"argv": argv, "env": {{k: os.environ.get(k) for k in keep}}, "cwd": os.getcwd(),
       "usr1_ignored": bool(ignored >> ({signal.SIGUSR1} - 1) & 1), "term_ignored": bool(ignored >> ({signal.SIGTERM} - 1) & 1)}}
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(rec) + "\\n")
opt = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
attempt = argv[argv.index("slurm.rank") + 1]
nproc, node = int(opt["--nproc_per_node"]), int(os.environ["SLURM_NODEID"])
code = os.environ["FAKE_RANK_CODE"]
os.makedirs(attempt, exist_ok=True)
for local in range(nproc):
    open(os.path.join(attempt, f"rank{{node * nproc + local}}"), "w").write(code + "\\n")
sys.exit(0 if code == "0" else 1)
"""


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON),
                       ("scancel", "#!/bin/bash\necho \"scancel $*\" >>\"$FAKE_LOG\"\n")):  # fmt: skip
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run_job(tmp_path: Path, rank_code: int, restart: int = 0, gpus: int | None = None):
    bin_dir = _fake_bin(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    text = _script(tmp_path, "generic-gpu", nodes=2, gpus=gpus, python=str(bin_dir / "python"))
    script = run_dir / "slurm" / "all.sbatch"
    script.write_text(text)
    log = tmp_path / "fake.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
           "FAKE_RANK_CODE": str(rank_code), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "cn[1-2]",
           "SLURM_NNODES": "2", "SLURM_RESTART_COUNT": str(restart)}  # fmt: skip
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    lines = log.read_text().splitlines() if log.exists() else []
    launches = [json.loads(x) for x in lines if x.startswith("{")]
    others = [x for x in lines if not x.startswith("{")]
    evs = [json.loads(x) for x in (run_dir / "slurm" / "events.jsonl").read_text().splitlines()]
    return res, launches, others, evs


def test_two_node_launch_from_recorded_environment(tmp_path):
    res, launches, others, evs = _run_job(tmp_path, 0, gpus=4)
    assert res.returncode == 0, res.stderr
    assert sorted(r["env"]["SLURM_NODEID"] for r in launches) == ["0", "1"]  # one torchrun per node
    port = 20000 + (4242 * 7) % 20000
    for r in launches:
        argv = r["argv"]
        assert argv[:2] == ["-m", "torch.distributed.run"]
        assert {"--nnodes=2", "--nproc_per_node=4", "--rdzv_id=4242", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=10.0.0.1:{port}", "--max_restarts=0"} <= set(argv)  # fmt: skip
        i = argv.index("slurm.rank")
        assert argv[i + 1] == str(tmp_path / "run" / "slurm" / "attempts" / "4242.0")
        assert argv[i + 2 :] == ["train", "/r.yaml", "--run-dir", str(tmp_path / "run")]
        assert r["env"]["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGINT,SIGHUP,SIGQUIT"
        assert r["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and r["env"]["OMP_NUM_THREADS"] == "8"
        assert r["env"]["PYTHONPATH"].split(":")[0] == str(ROOT) and r["cwd"] == str(ROOT)
        # torchrun must not die on (or act on) the signals the ranks checkpoint on
        assert r["usr1_ignored"] and r["term_ignored"]
    assert others == []  # no requeue, no scancel
    assert [e["event"] for e in evs] == ["start", "end"] and evs[1]["outcome"] == "finished"
    assert evs[0]["rendezvous"] == f"10.0.0.1:{port}" and evs[0]["job"] == 4242


def test_exit_75_requeues_the_job(tmp_path):
    res, launches, others, evs = _run_job(tmp_path, 75, restart=2)
    assert res.returncode == 0, res.stderr
    assert others == ["scontrol requeue 4242"]
    assert evs[-1]["outcome"] == "requeue" and evs[-1]["restart"] == 2
    assert launches[0]["argv"][launches[0]["argv"].index("slurm.rank") + 1].endswith("attempts/4242.2")


def test_other_exit_codes_fail_the_job(tmp_path):
    res, _, others, evs = _run_job(tmp_path, 3)
    assert res.returncode == 1
    assert others == [] and evs[-1]["outcome"] == "failed" and evs[-1]["rank_codes"] == "3"
    assert "training failed (srun exit 1, rank exit codes: 3 )" in res.stderr


def test_too_many_requeues_give_up(tmp_path):
    res, launches, others, evs = _run_job(tmp_path, 75, restart=51)  # generic-gpu: max_requeues 50
    assert res.returncode == 1 and launches == [] and others == []
    assert evs[-1]["reason"] == "requeued more than 50 times"


# ------------------------------------------------------------------------------------------------------
# Plans, chains and the git tree


def _plan(tmp_path: Path, chain: str) -> tuple[RunPlan, list[Path]]:
    launch = make_launch(load_profile("local-cpu"), 1)
    jobs = [
        JobPlan("a", ("train", "r.yaml", "--stop-at-step", "5"), done_step=5),
        JobPlan("b", ("train", "r.yaml")),
    ]
    if chain == "one-job":
        jobs = [JobPlan("all", ("train", "r.yaml"))]
    plan = RunPlan(tmp_path / "run", launch, chain, jobs, GitState("abc", True, (" M x.py",), "diff --git x"))
    render_jobs(plan, python=sys.executable, code_dir=ROOT)
    return plan, write_plan(plan)


def test_per_phase_chain_scripts_and_dependencies(tmp_path):
    plan, paths = _plan(tmp_path, "per-phase")
    assert [p.name for p in paths] == ["00-a.sbatch", "01-b.sbatch"]
    assert "DONE_STEP=5" in paths[0].read_text() and "DONE_STEP=0" in paths[1].read_text()
    cmds = sbatch_commands(plan, paths)
    assert cmds[0] == ["sbatch", "--parsable", str(paths[0])]
    assert cmds[1] == [
        "sbatch",
        "--parsable",
        "--dependency=afterok:{prev}",
        "--kill-on-invalid-dep=yes",
        str(paths[1]),
    ]
    assert (plan.slurm_dir / "git.diff").read_text() == "diff --git x"  # a dirty tree's diff is kept
    assert os.access(paths[0], os.X_OK)


def test_dirty_tree_is_refused_unless_allowed(tmp_path):
    repo = tmp_path / "code"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    clean = git_state(repo)
    assert clean.commit and not clean.dirty
    check_clean(clean, allow_dirty=False, code_dir=repo)
    (repo / "a.py").write_text("x = 2\n")
    (repo / "new.py").write_text("")
    dirty = git_state(repo)
    assert dirty.dirty and dirty.commit == clean.commit and "+x = 2" in dirty.diff
    with pytest.raises(UserError) as e:
        check_clean(dirty, allow_dirty=False, code_dir=repo)
    assert str(e.value) == (
        f"the code in {repo} has uncommitted changes (M a.py and 1 more): commit them so the run records what "
        f"it ran, or pass --allow-dirty (the diff is then kept in RUN/slurm/git.diff)"
    )
    check_clean(dirty, allow_dirty=True, code_dir=repo)
    assert git_state(tmp_path / "not-a-repo-dir") == GitState(commit=None, dirty=False)


def test_cli_overrides_may_follow_options():
    import argparse

    from slurm.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["slurm", "submit", "r.yaml", "seed=1", "--profile", "local-cpu", "name=x", "--dry-run"]
    )
    assert (args.recipe, args.overrides, args.profile, args.dry_run) == (
        "r.yaml",
        ["seed=1", "name=x"],
        "local-cpu",
        True,
    )


def test_prepare_data_script(tmp_path):
    from slurm.render import render_prepare_script

    jz = load_profile("jean-zay-h100", environ={"IDRPROJ": "abc"})
    text = render_prepare_script(jz, sources=Path("/d/sources.yaml"), out=tmp_path / "data", code_dir=ROOT,
                                 python="python", time_limit_s=3600, job_name="prep", extra_args=["--vocab-size", "8192"])  # fmt: skip
    lines = text.splitlines()
    assert {"#SBATCH --partition=cpu_p1", "#SBATCH --account=abc@cpu", "#SBATCH --qos=qos_cpu-t3",
            "#SBATCH --cpus-per-task=96", "#SBATCH --time=01:00:00", "#SBATCH --no-requeue"} <= set(lines)  # fmt: skip
    assert "--gres" not in text and "--constraint" not in text
    assert (
        f"exec python -m communs data prepare /d/sources.yaml --out {tmp_path / 'data'} "
        '--workers "$SLURM_CPUS_PER_TASK" --no-progress --vocab-size 8192' in lines
    )
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_rank_records_the_exit_code(tmp_path):
    mod = tmp_path / "exiter.py"
    mod.write_text(
        textwrap.dedent("""
        import sys
        def main(argv):
            if argv[0] == "raise":
                raise RuntimeError("boom")
            if argv[0] == "sysexit":
                sys.exit(int(argv[1]))
            return int(argv[0])
    """)
    )
    for args, code in ((["75"], 75), (["0"], 0), (["sysexit", "4"], 4), (["raise"], 1)):
        env = {**os.environ, "RANK": "3", "PYTHONPATH": f"{tmp_path}:{ROOT}"}
        attempt = tmp_path / f"att-{code}"
        res = subprocess.run([sys.executable, "-m", "slurm.rank", str(attempt), "exiter", *args], env=env,
                             capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert res.returncode == code, res.stderr
        assert (attempt / "rank3").read_text() == f"{code}\n"
    assert "RuntimeError: boom" in res.stderr


def test_prepare_data_dry_run(tmp_path, capsys):
    import communs

    out = tmp_path / "data"
    rc = communs.main(["slurm", "prepare-data", str(ROOT / "data/demo/sources.yaml"), "--profile", "local-cpu",
                       "--out", str(out), "--time", "30", "--dry-run"])  # fmt: skip
    assert rc == 0
    script = out / "slurm" / "prepare.sbatch"
    assert f"would run: sbatch --parsable {script}" in capsys.readouterr().out
    text = script.read_text()
    assert "#SBATCH --partition=debug" in text and "#SBATCH --time=00:30:00" in text
    assert f"-m communs data prepare {ROOT / 'data/demo/sources.yaml'} --out {out}" in text
    assert not (out / "slurm" / "prepare.json").exists()
    assert communs.main(["slurm", "prepare-data", str(tmp_path / "nope.yaml"), "--profile", "local-cpu",
                         "--out", str(out)]) == 2  # fmt: skip
    assert (
        capsys.readouterr().err.strip()
        == f"communs slurm: error: sources file {tmp_path / 'nope.yaml'} does not exist"
    )
