"""Cluster profiles: what a Slurm site needs in an sbatch script (account, partition, QoS, GPUs, modules).

A profile is a YAML file: `slurm/profiles/<name>.yaml` for the shipped ones (`--profile jean-zay-h100`),
or any path (`--profile my-site.yaml`). Values may use `${VAR}` from the environment of the submitting
shell (Jean Zay's `${IDRPROJ}@h100`); an unset variable is an error, never an empty string. Every
field is checked here, once, naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    description: str
    # None: a cluster without accounts (the key must still be written, as `account: null`).
    account: str | None
    partition: str
    gpus_per_node: int
    cpus_per_node: int
    # Wall time of one job, in seconds (a requeued job gets it again).
    time_limit_s: int
    # USR1 reaches the ranks this long before the wall time (Slurm rounds to its ~30 s tick).
    signal_lead_s: int
    # Seconds from job start to the first training step (modules, rendezvous, init, checkpoint load).
    startup_s: int
    # Sustained training throughput of one process, in TFLOP/s: only for estimating a step's time.
    sustained_tflops_per_proc: float
    # Processes per node: the GPUs on a GPU profile; explicit on a CPU one (gpus_per_node: 0).
    procs_per_node: int
    qos: str | None = None
    constraint: str | None = None
    max_time_limit_s: int | None = None
    max_requeues: int = 50
    modules: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # Interpreter on the compute nodes; None = the Python that submits (a shared-filesystem venv).
    python: str | None = None
    sbatch: tuple[str, ...] = ()
    # Where CPU-only jobs (data preparation) go, when not to the GPU partition; None = the same as above.
    cpu_partition: str | None = None
    cpu_account: str | None = None
    cpu_qos: str | None = None

    def replace(self, **changes: Any) -> Profile:
        return dataclasses.replace(self, **changes)


REQUIRED = (
    "account",
    "partition",
    "gpus_per_node",
    "cpus_per_node",
    "time_limit",
    "signal_lead_s",
    "startup_s",
    "sustained_tflops_per_proc",
)
OPTIONAL = (
    "description",
    "procs_per_node",
    "qos",
    "constraint",
    "max_time_limit",
    "max_requeues",
    "modules",
    "setup",
    "env",
    "python",
    "sbatch",
    "cpu_partition",
    "cpu_account",
    "cpu_qos",
)


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def resolve_profile_path(name_or_path: str) -> Path:
    """A shipped profile's name, or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"profile file {path} does not exist")
        return path
    shipped = PROFILE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(name_or_path, list_profiles(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (shipped: {', '.join(list_profiles())})"
    raise UserError(f"unknown profile {name_or_path!r}{hint}")


def load_profile(name_or_path: str, environ: dict[str, str] | None = None) -> Profile:
    """Read and validate a profile; `environ` (default os.environ) fills `${VAR}` references."""
    path = resolve_profile_path(name_or_path)
    env = dict(os.environ if environ is None else environ)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"profile {path}: not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise UserError(f"profile {path}: expected a mapping of keys, got {type(raw).__name__}")
    return profile_from_dict(raw, path, env)


def profile_from_dict(raw: dict[str, Any], path: Path, environ: dict[str, str]) -> Profile:
    where = f"profile {path}"
    for key in raw:
        if key not in REQUIRED + OPTIONAL:
            close = difflib.get_close_matches(str(key), REQUIRED + OPTIONAL, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{where}: unknown key {key!r}{hint}")
    for key in REQUIRED:
        if key not in raw:
            extra = " (write `account: null` for a cluster without accounts)" if key == "account" else ""
            raise UserError(f"{where}: missing key {key!r}{extra}")

    def text(key: str, optional: bool = False) -> str | None:
        value = raw.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
        return _expand(value, f"{where}: {key!r}", environ)

    def integer(key: str, minimum: int, default: int | None = None) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"{where}: {key!r} must be an integer >= {minimum}, got {value!r}")
        return value

    def str_list(key: str) -> tuple[str, ...]:
        value = raw.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where}: {key!r} must be a list of strings, got {value!r}")
        return tuple(value)

    gpus = integer("gpus_per_node", 0)
    if gpus == 0 and "procs_per_node" not in raw:
        raise UserError(f"{where}: 'procs_per_node' is required when gpus_per_node is 0 (a CPU profile)")
    procs = integer("procs_per_node", 1, default=gpus)
    if gpus and procs > gpus:
        raise UserError(f"{where}: 'procs_per_node' {procs} is more than the node's {gpus} GPUs")
    tflops = raw["sustained_tflops_per_proc"]
    if isinstance(tflops, bool) or not isinstance(tflops, (int, float)) or tflops <= 0:
        raise UserError(f"{where}: 'sustained_tflops_per_proc' must be a positive number, got {tflops!r}")
    env_raw = raw.get("env") or {}
    if not isinstance(env_raw, dict):
        raise UserError(f"{where}: 'env' must be a mapping NAME: value, got {env_raw!r}")
    env: dict[str, str] = {}
    for name, value in env_raw.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
            raise UserError(f"{where}: env name {name!r} is not a valid variable name")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"{where}: env {name!r} must be a string or a number, got {value!r}")
        env[str(name)] = str(value)
    time_limit_s = parse_time(raw["time_limit"], f"{where}: 'time_limit'")
    max_time = raw.get("max_time_limit")
    max_time_s = parse_time(max_time, f"{where}: 'max_time_limit'") if max_time is not None else None
    if max_time_s is not None and time_limit_s > max_time_s:
        raise UserError(
            f"{where}: 'time_limit' {format_time(time_limit_s)} is above max_time_limit {format_time(max_time_s)}"
        )
    signal_lead = integer("signal_lead_s", 0)
    if signal_lead >= time_limit_s:
        raise UserError(
            f"{where}: 'signal_lead_s' {signal_lead} is not below the time limit {time_limit_s} s"
        )
    return Profile(
        name=path.stem,
        path=path.resolve(),
        description=str(raw.get("description") or path.stem),
        account=text("account", optional=True),
        partition=text("partition") or "",
        gpus_per_node=gpus,
        cpus_per_node=integer("cpus_per_node", 1),
        time_limit_s=time_limit_s,
        signal_lead_s=signal_lead,
        startup_s=integer("startup_s", 0),
        sustained_tflops_per_proc=float(tflops),
        procs_per_node=procs,
        qos=text("qos", optional=True),
        constraint=text("constraint", optional=True),
        max_time_limit_s=max_time_s,
        max_requeues=integer("max_requeues", 0, default=50),
        modules=str_list("modules"),
        setup=str_list("setup"),
        env=env,
        python=text("python", optional=True),
        sbatch=str_list("sbatch"),
        cpu_partition=text("cpu_partition", optional=True),
        cpu_account=text("cpu_account", optional=True),
        cpu_qos=text("cpu_qos", optional=True),
    )


def _expand(value: str, where: str, environ: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if not environ.get(name):
            raise UserError(f"{where} uses ${{{name}}}, which is not set in the environment")
        return environ[name]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, value)


_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?$")


def parse_time(value: Any, where: str) -> int:
    """A Slurm time limit ("20:00:00", "1-12:00:00", "90:00" = minutes:seconds, or minutes) → seconds."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value * 60
    m = _TIME.match(str(value).strip()) if isinstance(value, str) else None
    if not m:
        raise UserError(f"{where}: {value!r} is not a Slurm time limit (e.g. 20:00:00, 1-00:00:00, 90)")
    days, a, b, c = m.groups()
    # HH:MM:SS with a third field, else MM:SS (Slurm's reading of "90:00").
    seconds = int(a) * 3600 + int(b) * 60 + int(c) if c is not None else int(a) * 60 + int(b)
    seconds += int(days or 0) * 86400
    if seconds <= 0:
        raise UserError(f"{where}: {value!r} is not a positive time limit")
    return seconds


def format_time(seconds: int) -> str:
    """Seconds → Slurm's D-HH:MM:SS, rounded up to whole minutes (Slurm's resolution)."""
    minutes = -(-seconds // 60)
    days, rest = divmod(minutes, 24 * 60)
    text = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{text}" if days else text
