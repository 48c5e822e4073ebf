"""`communs slurm …`: render and submit a recipe's jobs, see where a run stands, prepare data on a node.

    communs slurm render RECIPE [k=v …] --profile P [--nodes N] [--gpus-per-node G] [--time T]
                         [--run-dir DIR] [--chain one-job|per-phase] [--step-time S]
    communs slurm submit RECIPE [k=v …] --profile P … [--dry-run] [--allow-dirty]
    communs slurm status RUN_DIR [--json] [--no-slurm]
    communs slurm prepare-data SOURCES --profile P --out DIR [--time T] [--dry-run] [--allow-dirty]

Everything is validated (profile, recipe and data, GPUs per node, the wall time against the
checkpoint interval, the git tree) before a script is written or a job submitted. docs/slurm.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.errors import UserError


class _IntermixedParser(argparse.ArgumentParser):
    """Lets `k=v` overrides come after options too (`submit RECIPE --profile P lr=1e-3`)."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inner:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="render/submit Slurm jobs for a recipe, show a run's status")
    ss = p.add_subparsers(
        dest="slurm_command", metavar="SUBCOMMAND", required=True, parser_class=_IntermixedParser
    )

    for name, help_text in (
        ("render", "write the sbatch scripts of a run into RUN/slurm/ (nothing is submitted)"),
        ("submit", "validate, write the scripts and submit the jobs (a chain of one job or one per phase)"),
    ):
        q = ss.add_parser(name, help=help_text)
        q.add_argument("recipe", help="recipe YAML")
        q.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
        _launch_options(q)
        q.add_argument("--run-dir", type=Path, help="run directory (default: runs/<recipe name>)")
        q.add_argument("--chain", choices=("one-job", "per-phase"), default="one-job",
                       help="one job for all phases (requeued until done), or one job per phase with "
                            "afterok dependencies (default: one-job)")  # fmt: skip
        q.add_argument("--step-time", type=float, metavar="S",
                       help="seconds per optimizer step, for the wall-time check (default: estimated "
                            "from the model's FLOPs and the profile's sustained_tflops_per_proc)")  # fmt: skip
        q.add_argument("--allow-dirty", action="store_true",
                       help="submit from a tree with uncommitted changes (recorded, diff kept in RUN/slurm/)")  # fmt: skip
        if name == "submit":
            q.add_argument("--dry-run", action="store_true", help="validate and write the scripts, print the "
                           "sbatch commands, submit nothing")  # fmt: skip
        q.set_defaults(func=_render_or_submit, submit=name == "submit")

    q = ss.add_parser("status", help="phase, step, last checkpoint, requeues and jobs of a run")
    q.add_argument("run_dir", type=Path)
    q.add_argument("--json", action="store_true", help="print the status as JSON")
    q.add_argument("--no-slurm", action="store_true", help="read the run directory only (no scontrol)")
    q.set_defaults(func=_status)

    q = ss.add_parser("prepare-data", help="run `communs data prepare` as a job on one CPU node")
    q.add_argument("sources", type=Path, help="sources.yaml")
    q.add_argument("--out", type=Path, required=True, help="data directory (shards, tokenizer, manifest)")
    q.add_argument("--profile", required=True, help="cluster profile: a shipped name or a YAML path")
    q.add_argument("--time", help="wall time (default: the profile's time_limit)")
    q.add_argument("--vocab-size", type=int, help="passed to `communs data prepare`")
    q.add_argument("--tokenizer", type=Path, help="an existing tokenizer .model (passed on)")
    q.add_argument("--dry-run", action="store_true", help="write the script, print the sbatch command")
    q.add_argument("--allow-dirty", action="store_true", help="submit from a tree with uncommitted changes")
    q.set_defaults(func=_prepare_data)


def _launch_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--profile", required=True, help="cluster profile: a shipped name (jean-zay-h100, "
                   "generic-gpu, local-cpu) or a YAML path")  # fmt: skip
    q.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    q.add_argument(
        "--gpus-per-node", type=int, help="GPUs (= ranks) per node (default: all of the profile's)"
    )
    q.add_argument("--time", help="wall time of each job, e.g. 02:00:00 (default: the profile's time_limit)")


def _render_or_submit(args: argparse.Namespace) -> int:
    from slurm.profiles import load_profile, parse_time
    from slurm.render import make_launch
    from slurm.submit import plan_training, sbatch_commands, submit_plan, write_plan

    profile = load_profile(args.profile)
    limit = parse_time(args.time, "--time") if args.time else None
    launch = make_launch(profile, args.nodes, args.gpus_per_node, limit)
    # Rendering runs nothing: only a submission must say exactly which code it ran.
    allow_dirty = args.allow_dirty or not args.submit
    plan = plan_training(
        args.recipe, args.overrides, launch, args.run_dir, args.chain, args.step_time, allow_dirty
    )
    paths = write_plan(plan)
    est = ", ".join(f"{k} ~{v:.3g} s" for k, v in plan.notes["step_time_s"].items())
    print(f"communs slurm: {plan.run_dir}: {len(paths)} job(s), {launch.nodes} node(s) x {launch.procs_per_node} "
          f"rank(s), chain {plan.chain}; step time {est}")  # fmt: skip
    for path in paths:
        print(f"  {path}")
    if plan.git.dirty:
        print(f"  (uncommitted changes: diff kept in {plan.slurm_dir / 'git.diff'})")
    if not args.submit:
        return 0
    if args.dry_run:
        for cmd in sbatch_commands(plan, paths):
            print("  would run: " + " ".join(cmd))
        return 0
    job_ids = submit_plan(plan, paths, argv=["communs", *sys.argv[1:]])
    for job, jid in zip(plan.jobs, job_ids):
        print(f"  submitted {job.label}: job {jid}")
    print(f"  follow it: communs slurm status {plan.run_dir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from slurm.status import format_status, run_status

    st = run_status(args.run_dir.resolve(), query_slurm=not args.no_slurm)
    print(json.dumps(st, indent=1) if args.json else format_status(st))
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    from slurm.profiles import load_profile, parse_time
    from slurm.render import render_prepare_script
    from slurm.submit import CODE_DIR, check_clean, git_state

    profile = load_profile(args.profile)
    if not args.sources.is_file():
        raise UserError(f"sources file {args.sources} does not exist")
    if args.tokenizer is not None and not args.tokenizer.is_file():
        raise UserError(f"--tokenizer {args.tokenizer}: file not found")
    gitst = git_state()
    if not args.dry_run:
        check_clean(gitst, args.allow_dirty)
    limit = parse_time(args.time, "--time") if args.time else profile.time_limit_s
    out = args.out.resolve()
    extra = []
    if args.vocab_size is not None:
        extra += ["--vocab-size", str(args.vocab_size)]
    if args.tokenizer is not None:
        extra += ["--tokenizer", str(args.tokenizer.resolve())]
    text = render_prepare_script(
        profile,
        sources=args.sources.resolve(),
        out=out,
        code_dir=CODE_DIR,
        python=profile.python or sys.executable,
        time_limit_s=limit,
        job_name=f"prepare-{out.name}",
        extra_args=extra,
    )
    (out / "slurm").mkdir(parents=True, exist_ok=True)
    script = out / "slurm" / "prepare.sbatch"
    script.write_text(text, encoding="utf-8")
    if gitst.dirty:
        (out / "slurm" / "git.diff").write_text(gitst.diff, encoding="utf-8")
    cmd = ["sbatch", "--parsable", str(script)]
    print(f"communs slurm: {script}")
    if args.dry_run:
        print("  would run: " + " ".join(cmd))
        return 0
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: submit from a Slurm login node")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"{' '.join(cmd)} failed: {' '.join(res.stderr.split())}")
    job_id = int(res.stdout.strip().split(";")[0])
    record = {"job_id": job_id, "sources": str(args.sources.resolve()), "profile": profile.name,
              "git": {"commit": gitst.commit, "dirty": gitst.dirty, "changes": list(gitst.changes)}}  # fmt: skip
    (out / "slurm" / "prepare.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"  submitted: job {job_id} (log in {out / 'slurm'})")
    return 0
