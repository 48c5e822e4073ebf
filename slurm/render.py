"""sbatch scripts from a profile and a launch shape, and the checks made before anything is written.

The script itself is slurm/templates/train.sbatch (one srun task per node running torchrun, c10d
rendezvous on the first node, USR1 before the wall time, requeue on the trainer's exit code 75);
this module fills it in. Everything here is pure: no Slurm command runs, so it is tested anywhere.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from slurm.profiles import Profile, format_time
from train import EXIT_REQUEUE  # the ranks' "checkpointed, not finished" code: the job requeues on it

TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass(frozen=True)
class Launch:
    """The shape of one job: nodes x processes per node, its wall time, and the cluster profile."""

    profile: Profile
    nodes: int
    procs_per_node: int
    time_limit_s: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def make_launch(
    profile: Profile, nodes: int = 1, gpus_per_node: int | None = None, time_limit_s: int | None = None
) -> Launch:
    """Check the launch shape against the profile: the node's GPUs, the QoS's time limit."""
    if nodes < 1:
        raise UserError(f"--nodes {nodes}: must be >= 1")
    procs = profile.procs_per_node
    if gpus_per_node is not None:
        if profile.gpus_per_node == 0:
            raise UserError(
                f"--gpus-per-node {gpus_per_node}: profile {profile.name} ({profile.path}) is a CPU profile "
                f"(gpus_per_node: 0)"
            )
        if not 1 <= gpus_per_node <= profile.gpus_per_node:
            raise UserError(
                f"--gpus-per-node {gpus_per_node}: profile {profile.name} ({profile.path}) has "
                f"gpus_per_node: {profile.gpus_per_node}"
            )
        procs = gpus_per_node
    # Slurm counts in whole minutes: the job gets the limit rounded up, and so do the checks.
    limit = -(-(profile.time_limit_s if time_limit_s is None else time_limit_s) // 60) * 60
    if profile.max_time_limit_s is not None and limit > profile.max_time_limit_s:
        raise UserError(
            f"--time {format_time(limit)}: above the profile {profile.name}'s max_time_limit "
            f"{format_time(profile.max_time_limit_s)} ({profile.path})"
        )
    return Launch(profile=profile, nodes=nodes, procs_per_node=procs, time_limit_s=limit)


def check_time_limit(launch: Launch, checkpoint_interval: int, step_time_s: float, where: str) -> None:
    """Refuse a wall time that cannot hold one checkpoint interval of training.

    A job spends `startup_s` (profile) before its first step and stops `signal_lead_s` before the
    wall time to checkpoint; what is left must hold `checkpoint_interval` steps (at least one step when
    the recipe checkpoints only at phase ends and on signals) at the estimated `step_time_s`.
    Otherwise every attempt would be lost work, or a periodic checkpoint would never be reached.
    """
    p = launch.profile
    window = max(0, launch.time_limit_s - p.startup_s - p.signal_lead_s)
    steps = max(1, checkpoint_interval)
    needed = steps * step_time_s
    if window < needed:
        raise UserError(
            f"time limit {format_time(launch.time_limit_s)} is too short for {where}: after startup "
            f"({p.startup_s} s, profile {p.name}) and the checkpoint lead ({p.signal_lead_s} s) it leaves "
            f"{window} s of training, but checkpoint.interval {checkpoint_interval} needs {steps} steps x "
            f"~{step_time_s:.3g} s = {needed:.0f} s; raise --time, lower checkpoint.interval, or give --step-time"
        )


def estimate_step_time(batch_tokens: int, flops_per_token: float, launch: Launch) -> float:
    """Seconds per optimizer step: the batch's training FLOPs over the job's sustained throughput."""
    flops_per_s = launch.world_size * launch.profile.sustained_tflops_per_proc * 1e12
    return batch_tokens * flops_per_token / flops_per_s


def render_template(name: str, values: dict[str, str]) -> str:
    """Fill `{{key}}` placeholders of templates/NAME; a placeholder left unfilled is a bug here."""
    text = (TEMPLATES / name).read_text(encoding="utf-8")
    missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)) - set(values))
    if missing:
        raise KeyError(f"template {name}: no value for {', '.join(missing)}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], text)


def sbatch_directives(launch: Launch) -> list[str]:
    """The profile's site-specific #SBATCH lines (the generic ones are in the template)."""
    p = launch.profile
    lines = [f"#SBATCH --partition={p.partition}"]
    if p.account is not None:
        lines.append(f"#SBATCH --account={p.account}")
    if p.qos:
        lines.append(f"#SBATCH --qos={p.qos}")
    if p.constraint:
        lines.append(f"#SBATCH --constraint={p.constraint}")
    if p.gpus_per_node:
        lines.append(f"#SBATCH --gres=gpu:{launch.procs_per_node}")
    lines += [f"#SBATCH {opt}" for opt in p.sbatch]
    return lines


def setup_lines(profile: Profile) -> list[str]:
    lines = []
    if profile.modules:
        lines.append("module purge")
        lines += [f"module load {m}" for m in profile.modules]
    lines += list(profile.setup)
    return lines


def env_lines(profile: Profile, code_dir: Path) -> list[str]:
    # The code's checkout first on the path: `-m train` and `-m slurm.rank` import from it.
    lines = [f'export PYTHONPATH={shlex.quote(str(code_dir))}"${{PYTHONPATH:+:$PYTHONPATH}}"']
    lines += [f"export {k}={shlex.quote(v)}" for k, v in profile.env.items()]
    return lines


def render_train_script(
    launch: Launch,
    *,
    run_dir: Path,
    code_dir: Path,
    python: str,
    label: str,
    job_name: str,
    command: list[str],
    done_step: int = 0,
    header: str = "",
    recipe: str = "",
) -> str:
    """The sbatch script of one training job. `command` = MODULE ARGS… that each rank runs
    (`train RECIPE --run-dir RUN --resume auto …`). `done_step`: the job's work is done once the run's
    latest checkpoint reaches this global step, although the ranks exit 75 there (a per-phase job
    stops at its phase's end with --stop-at-step); 0 = run to the end of the recipe."""
    p = launch.profile
    q = shlex.quote
    values = {
        "header": header or f"communs training job {job_name}",
        "recipe": recipe or "(none)",
        "profile": f"{p.name} ({p.path})",
        "job_name": job_name,
        "nodes": str(launch.nodes),
        "cpus_per_node": str(p.cpus_per_node),
        "time_limit": format_time(launch.time_limit_s),
        "signal_lead_s": str(p.signal_lead_s),
        "log": str(run_dir / "slurm" / "logs" / "%x-%j.out"),
        "sbatch_lines": "\n".join(sbatch_directives(launch)),
        "procs_per_node": str(launch.procs_per_node),
        "run_dir": q(str(run_dir)),
        "label": label,
        "workdir": q(str(code_dir)),
        "setup_lines": "\n".join(setup_lines(p)),
        "env_lines": "\n".join(env_lines(p, code_dir)),
        "max_requeues": str(p.max_requeues),
        "python": q(python),
        "train_command": " ".join(q(c) for c in command),
        "done_step": str(int(done_step)),
        "exit_requeue": str(EXIT_REQUEUE),
    }
    return render_template("train.sbatch", values)


def render_prepare_script(
    profile: Profile,
    *,
    sources: Path,
    out: Path,
    code_dir: Path,
    python: str,
    time_limit_s: int,
    job_name: str,
    extra_args: list[str],
) -> str:
    """The sbatch script of `communs data prepare` on one CPU node (the profile's CPU partition if any)."""
    q = shlex.quote
    # The profile's CPU partition when it has one (with its account and QoS), else the training
    # partition without GPUs.
    partition = profile.cpu_partition or profile.partition
    account = (profile.cpu_account or profile.account) if profile.cpu_partition else profile.account
    qos = profile.cpu_qos if profile.cpu_partition else profile.qos
    lines = [f"#SBATCH --partition={partition}"]
    if account is not None:
        lines.append(f"#SBATCH --account={account}")
    if qos:
        lines.append(f"#SBATCH --qos={qos}")
    if profile.constraint and not profile.cpu_partition:
        lines.append(f"#SBATCH --constraint={profile.constraint}")
    lines += [f"#SBATCH {opt}" for opt in profile.sbatch]
    values = {
        "header": f"communs data preparation {job_name}",
        "profile": f"{profile.name} ({profile.path})",
        "job_name": job_name,
        "cpus": str(profile.cpus_per_node),
        "time_limit": format_time(time_limit_s),
        "log": str(out / "slurm" / "%x-%j.out"),
        "sbatch_lines": "\n".join(lines),
        "workdir": q(str(code_dir)),
        "setup_lines": "\n".join(setup_lines(profile)),
        "env_lines": "\n".join(env_lines(profile, code_dir)),
        "python": q(python),
        "sources": q(str(sources)),
        "out": q(str(out)),
        "extra_args": " ".join(q(a) for a in extra_args),
    }
    return render_template("prepare.sbatch", values)
