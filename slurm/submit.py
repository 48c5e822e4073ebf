"""Plan, write and submit the Slurm jobs of a training run; the git state that goes with them.

    RUN/slurm/recipe.yaml            the resolved recipe every job trains (overrides applied, paths absolute)
    RUN/slurm/<label>.sbatch         one script per job: `all` (chain one-job) or one per phase
    RUN/slurm/submissions.jsonl      one line per `submit`: profile, shape, git state, job ids in order
    RUN/slurm/git.diff               the uncommitted changes, when a dirty tree was allowed (--allow-dirty)
    RUN/slurm/events.jsonl           written by the jobs: start and end (finished/requeue/failed) of attempts
    RUN/slurm/attempts/<job>.<n>/    the ranks' exit codes of attempt n of a job (slurm.rank)
    RUN/slurm/logs/<name>-<job>.out  the jobs' output, appended across requeues

Chains: `one-job` runs every phase in one job that requeues itself until the recipe is done; `per-phase`
submits one job per phase, each `--dependency=afterok` on the previous one and `--kill-on-invalid-dep=yes`,
so a failed phase cancels the rest of the chain (on any cluster, whatever its DependencyParameters).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from slurm.profiles import format_time
from slurm.render import Launch, check_time_limit, estimate_step_time, render_train_script

CODE_DIR = Path(__file__).resolve().parent.parent
CHAINS = ("one-job", "per-phase")


@dataclass(frozen=True)
class GitState:
    commit: str | None  # None: the code is not a git checkout
    dirty: bool
    changes: tuple[str, ...] = ()  # `git status --porcelain` lines
    diff: str = ""


def git_state(code_dir: Path = CODE_DIR) -> GitState:
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(code_dir), *args], capture_output=True, text=True)

    try:
        head = git("rev-parse", "HEAD")
    except FileNotFoundError:
        return GitState(commit=None, dirty=False)
    if head.returncode != 0:
        return GitState(commit=None, dirty=False)
    # Untracked files count: a new module changes what the job runs as much as an edited one.
    status = git("status", "--porcelain", "--untracked-files=all")
    changes = tuple(line for line in status.stdout.splitlines() if line.strip())
    diff = git("diff", "HEAD", "--binary").stdout if changes else ""
    return GitState(commit=head.stdout.strip(), dirty=bool(changes), changes=changes, diff=diff)


def check_clean(state: GitState, allow_dirty: bool, code_dir: Path = CODE_DIR) -> None:
    if state.dirty and not allow_dirty:
        first = state.changes[0].strip()
        more = f" and {len(state.changes) - 1} more" if len(state.changes) > 1 else ""
        raise UserError(
            f"the code in {code_dir} has uncommitted changes ({first}{more}): commit them so the run "
            f"records what it ran, or pass --allow-dirty (the diff is then kept in RUN/slurm/git.diff)"
        )


@dataclass(frozen=True)
class JobPlan:
    label: str  # "all" or the phase's name
    command: tuple[str, ...]  # MODULE ARGS… run by every rank
    done_step: int = 0  # see render_train_script
    script: str = ""


@dataclass
class RunPlan:
    run_dir: Path
    launch: Launch
    chain: str
    jobs: list[JobPlan]
    git: GitState
    recipe_text: str | None = None  # written to RUN/slurm/recipe.yaml
    recipe_source: str = ""
    notes: dict = field(default_factory=dict)  # extra facts for submissions.jsonl (step-time estimates)

    @property
    def slurm_dir(self) -> Path:
        return self.run_dir / "slurm"

    def script_path(self, job: JobPlan, index: int) -> Path:
        prefix = f"{index:02d}-" if self.chain == "per-phase" else ""
        return self.slurm_dir / f"{prefix}{job.label}.sbatch"


def render_jobs(plan: RunPlan, python: str | None = None, code_dir: Path = CODE_DIR) -> None:
    """Fill each job's script text (the run's paths, the profile's python or the submitting one)."""
    py = python or plan.launch.profile.python or sys.executable
    rendered = []
    for i, job in enumerate(plan.jobs):
        text = render_train_script(
            plan.launch,
            run_dir=plan.run_dir,
            code_dir=code_dir,
            python=py,
            label=job.label,
            job_name=f"{plan.run_dir.name}-{job.label}",
            command=list(job.command),
            done_step=job.done_step,
            header=f"communs run {plan.run_dir.name}: job {i + 1}/{len(plan.jobs)} ({plan.chain}), {job.label}",
            recipe=plan.recipe_source,
        )
        rendered.append(JobPlan(job.label, job.command, job.done_step, text))
    plan.jobs = rendered


def plan_training(
    recipe_path: str,
    overrides: list[str],
    launch: Launch,
    run_dir: Path | None,
    chain: str,
    step_time_s: float | None = None,
    allow_dirty: bool = False,
    code_dir: Path = CODE_DIR,
) -> RunPlan:
    """Validate the recipe for this launch (files, data budgets, batch divisibility, the wall time) and
    plan its jobs. Nothing is written; every error is raised here, before anything is submitted."""
    from train.recipe import load_recipe, plan_phases, to_yaml, validate_inputs

    if chain not in CHAINS:
        raise UserError(f"--chain {chain!r}: expected one of {', '.join(CHAINS)}")
    gitst = git_state(code_dir)
    check_clean(gitst, allow_dirty, code_dir)
    recipe = load_recipe(recipe_path, overrides)
    validate_inputs(recipe, launch.world_size, recipe_path)
    phases = plan_phases(recipe, launch.world_size)
    run_dir = (run_dir or Path("runs") / recipe.name).resolve()
    recipe_copy = run_dir / "slurm" / "recipe.yaml"

    estimates = {}
    for ph in phases:
        est = step_time_s
        if est is None:
            est = estimate_step_time(ph.phase.batch_tokens, ph.flops_per_token, launch)
        estimates[ph.name] = est
        check_time_limit(launch, recipe.checkpoint.interval, est, f"phase {ph.name!r} of {recipe_path}")

    base = ("train", str(recipe_copy), "--run-dir", str(run_dir), "--resume", "auto")
    if chain == "one-job":
        jobs = [JobPlan("all", base)]
    else:
        jobs = [
            # Every phase but the last stops at its end step; the next job resumes from that checkpoint.
            JobPlan(ph.name, base + (("--stop-at-step", str(ph.end_step)) if i < len(phases) - 1 else ()),
                    done_step=ph.end_step if i < len(phases) - 1 else 0)
            for i, ph in enumerate(phases)
        ]  # fmt: skip
    plan = RunPlan(
        run_dir=run_dir,
        launch=launch,
        chain=chain,
        jobs=jobs,
        git=gitst,
        recipe_text=to_yaml(recipe),
        recipe_source=str(Path(recipe_path).resolve()),
        notes={
            "recipe": recipe.name,
            "overrides": list(overrides),
            "phases": [{"name": p.name, "steps": p.steps, "end_step": p.end_step} for p in phases],
            "step_time_s": estimates,
            "step_time_given": step_time_s is not None,
            "checkpoint_interval": recipe.checkpoint.interval,
        },
    )
    render_jobs(plan, code_dir=code_dir)
    return plan


def write_plan(plan: RunPlan) -> list[Path]:
    """RUN/slurm/: the resolved recipe, the scripts, the diff of a dirty tree. Returns the script paths."""
    sd = plan.slurm_dir
    (sd / "logs").mkdir(parents=True, exist_ok=True)
    if plan.recipe_text is not None:
        _write(sd / "recipe.yaml", plan.recipe_text)
    if plan.git.dirty:
        _write(sd / "git.diff", plan.git.diff)
    paths = []
    for i, job in enumerate(plan.jobs):
        path = plan.script_path(job, i)
        _write(path, job.script)
        path.chmod(0o755)
        paths.append(path)
    return paths


def sbatch_commands(plan: RunPlan, paths: list[Path]) -> list[list[str]]:
    """The sbatch command of each job; `{prev}` stands for the previous job's id in a per-phase chain."""
    cmds = []
    for i, path in enumerate(paths):
        cmd = ["sbatch", "--parsable"]
        if plan.chain == "per-phase" and i > 0:
            cmd += ["--dependency=afterok:{prev}", "--kill-on-invalid-dep=yes"]
        cmds.append(cmd + [str(path)])
    return cmds


def submit_plan(plan: RunPlan, paths: list[Path], argv: list[str] | None = None) -> list[int]:
    """Submit the jobs in order (each per-phase job depends on the previous one); record the submission."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: submit from a Slurm login node (or run `communs slurm render`)")
    job_ids: list[int] = []
    try:
        for cmd in sbatch_commands(plan, paths):
            cmd = [c.replace("{prev}", str(job_ids[-1])) if job_ids else c for c in cmd]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise UserError(f"{' '.join(cmd)} failed: {' '.join(res.stderr.split()) or res.returncode}")
            job_ids.append(int(res.stdout.strip().split(";")[0]))
    except BaseException:
        # Half a chain is worse than none: cancel what was submitted, then report.
        if job_ids:
            subprocess.run(["scancel", *map(str, job_ids)], capture_output=True)
        raise
    record_submission(plan, paths, job_ids, argv)
    return job_ids


def record_submission(plan: RunPlan, paths: list[Path], job_ids: list[int], argv: list[str] | None) -> None:
    p = plan.launch.profile
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": argv if argv is not None else sys.argv,
        "profile": {"name": p.name, "path": str(p.path), "account": p.account, "partition": p.partition,
                    "qos": p.qos, "constraint": p.constraint},
        "nodes": plan.launch.nodes,
        "procs_per_node": plan.launch.procs_per_node,
        "time_limit": format_time(plan.launch.time_limit_s),
        "chain": plan.chain,
        "jobs": [{"label": j.label, "job_id": jid, "script": str(path)}
                 for j, jid, path in zip(plan.jobs, job_ids, paths)],
        "git": {"commit": plan.git.commit, "dirty": plan.git.dirty, "changes": list(plan.git.changes)},
        **plan.notes,
    }  # fmt: skip
    with open(plan.slurm_dir / "submissions.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
