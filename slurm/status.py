"""`communs slurm status RUN`: where a run stands, from its run directory (and Slurm, when it answers).

Read: RUN/run.json and RUN/summary.json (the trainer's status), RUN/metrics.jsonl (last logged phase, step, loss), RUN/checkpoints/
latest and its client.json (last committed checkpoint), RUN/slurm/submissions.jsonl (job ids) and
RUN/slurm/events.jsonl (attempts, requeues, failures). `scontrol show job` adds the live state of each
job when a controller answers; without one the view is the run directory's alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from common.errors import UserError


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written, or torn by a killed job
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def live_job_state(job_id: int) -> dict[str, str] | None:
    """JobState, Reason, RunTime, Restarts, NodeList of a job from `scontrol show job`; None if unknown."""
    if shutil.which("scontrol") is None:
        return None
    try:
        res = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0 or not res.stdout.strip():
        return None
    fields = dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)
    keep = ("JobState", "Reason", "RunTime", "Restarts", "NodeList", "ExitCode", "Dependency")
    return {k: fields[k] for k in keep if k in fields}


def last_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    root = run_dir / "checkpoints"
    try:
        tag = (root / "latest").read_text().strip()
    except OSError:
        return None
    info: dict[str, Any] = {"tag": tag, "path": str(root / tag)}
    client = _read_json(root / tag / "client.json")
    if client:
        for key in ("phase", "phase_index", "step", "global_step", "tokens"):
            if key in client:
                info[key] = client[key]
    return info


def run_status(run_dir: Path, query_slurm: bool = True) -> dict[str, Any]:
    """Everything `status` shows, as a dict (the CLI prints it; --json prints this)."""
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    summary = _read_json(run_dir / "summary.json") or {}
    run_json = _read_json(run_dir / "run.json") or {}
    metrics = [m for m in _read_jsonl(run_dir / "metrics.jsonl") if "step" in m]
    last = metrics[-1] if metrics else None
    submissions = _read_jsonl(run_dir / "slurm" / "submissions.jsonl")
    events = _read_jsonl(run_dir / "slurm" / "events.jsonl")

    jobs = []
    if submissions:
        for job in submissions[-1].get("jobs", []):
            jid = job.get("job_id")
            mine = [e for e in events if e.get("job") == jid]
            outcomes = [e.get("outcome") for e in mine if e.get("event") == "end"]
            entry = {
                "label": job.get("label"),
                "job_id": jid,
                "attempts": sum(1 for e in mine if e.get("event") == "start"),
                "requeues": outcomes.count("requeue"),
                "outcome": outcomes[-1] if outcomes else None,
            }
            if query_slurm and jid is not None:
                entry["slurm"] = live_job_state(int(jid))
            jobs.append(entry)
    return {
        "run_dir": str(run_dir),
        # The trainer's own word (run.json: running | preempted | finished | failed), summary.json's as well.
        "finished": run_json.get("status") == "finished" or summary.get("status") == "finished",
        "trainer_status": run_json.get("status"),
        "error": run_json.get("error"),
        "phase": last.get("phase") if last else None,
        "step": last.get("step") if last else None,
        "loss": last.get("loss") if last else None,
        "last_checkpoint": last_checkpoint(run_dir),
        "requeues": sum(1 for e in events if e.get("outcome") == "requeue"),
        "chain": submissions[-1].get("chain") if submissions else None,
        "jobs": jobs,
        "submissions": len(submissions),
        "git": submissions[-1].get("git") if submissions else None,
    }


def format_status(st: dict[str, Any]) -> str:
    lines = [f"run        {st['run_dir']}"]
    if st["finished"]:
        state = "finished"
    elif st["phase"] is not None:
        state = f"phase {st['phase']}, step {st['step']}"
        if st["loss"] is not None:
            state += f", loss {st['loss']:.4f}" if isinstance(st["loss"], float) else f", loss {st['loss']}"
    else:
        state = "no training step logged yet"
    if st["trainer_status"] and not st["finished"]:
        state += f" (trainer: {st['trainer_status']})"
    lines.append(f"state      {state}")
    if st["error"]:
        lines.append(f"error      {st['error']}")
    ck = st["last_checkpoint"]
    if ck:
        extra = ", ".join(f"{k} {ck[k]}" for k in ("phase", "step", "tokens") if k in ck)
        lines.append(f"checkpoint {ck['tag']}" + (f" ({extra})" if extra else ""))
    else:
        lines.append("checkpoint none yet")
    lines.append(f"requeues   {st['requeues']}")
    if st["git"]:
        g = st["git"]
        lines.append(
            f"code       {g.get('commit') or 'not a git checkout'}" + (" (dirty)" if g.get("dirty") else "")
        )
    if st["jobs"]:
        lines.append(f"jobs       ({st['chain']}, submission {st['submissions']})")
        for j in st["jobs"]:
            live = j.get("slurm")
            where = (
                f"{live.get('JobState')} {live.get('Reason', '')}".strip() if live else "not known to Slurm"
            )
            lines.append(
                f"  {j['job_id']:>8}  {j['label']:<16} attempts {j['attempts']}, requeues {j['requeues']}, "
                f"last attempt {j['outcome'] or '-'}; slurm: {where}"
            )
    else:
        lines.append("jobs       none submitted from this run directory")
    return "\n".join(lines)
