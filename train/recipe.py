"""Recipes: the typed schema of a training run, loading, validation, derived values, DeepSpeed config.

A recipe is a YAML file plus `key=value` overrides from the command line. The file is read with
omegaconf only to resolve `${...}` interpolations into a plain dict (so an override does not propagate
through an interpolation: it sets the resolved value of the key it names); the overrides are then set
on that dict, and the dict is converted into the dataclasses below by `_build` (no omegaconf structured
config or merge is involved). Every key is checked against
the schema (an unknown key gets a did-you-mean), every value against its type, and every invariant
once, here, before any process group starts. Errors are one line naming the file (or the override)
and the key path, e.g. `recipes/demo.yaml: phases[1].mixture.gsm8: not in the manifest's sources
(did you mean 'gsm8k'?)`.

Derived values (sequences per step, gradient accumulation, steps per phase, warmup steps, the model
config each phase trains, the learning rate at each step) are computed in one place: `plan_phases`.
`deepspeed_config` generates DeepSpeed's JSON from the recipe: the single source of truth for batch
size, gradient accumulation, precision and ZeRO stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.suggest import did_you_mean

PRECISIONS = ("fp32", "bf16", "fp16")
PHASE_KINDS = ("pretrain", "anneal", "sft", "context-extension")
SCHEDULES = ("wsd", "cosine", "linear", "constant")
LR_STARTS = ("restart", "continue")
OPTIMIZER_MODES = ("carry", "reset")
REQUIRED = {"required": True}
PHASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # used as a folder name (export/<phase>)


class RecipeError(UserError):
    """A recipe that cannot run: one line naming the file or override, the key and what is expected."""


# ----------------------------------------------------------------------------------------------------
# The schema


@dataclass
class ModelSpec:
    size: str = "tiny"  # a name in model.llama.SIZES
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields, e.g. vocab_size: 8192


@dataclass
class TokenizerSpec:
    path: str = field(default="", metadata=REQUIRED)  # the sentencepiece .model the data was encoded with


@dataclass
class DataSpec:
    manifest: str = field(default="", metadata=REQUIRED)  # manifest.json written by `communs data prepare`


@dataclass
class OptimizerSpec:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm clipping; 0 = off


@dataclass
class DeepSpeedSpec:
    zero_stage: int = 1
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states in CPU memory (stage >= 1)
    offload_params: bool = False  # parameters in CPU memory (stage 3 only)
    activation_checkpointing: bool = False  # recompute each block in backward
    timeout_minutes: float = 30.0  # collectives: a dead rank fails the job after this, instead of hanging


@dataclass
class CheckpointSpec:
    interval: int = 1000  # optimizer steps between checkpoints; 0 = only at phase ends and on signals
    keep_last: int = 2  # periodic checkpoints kept (the newest); phase ends are kept apart from these
    keep_phase_ends: bool = True


@dataclass
class LoggingSpec:
    interval: int = 10  # steps between metrics.jsonl lines (the first and last step of a phase always log)
    wandb_project: str | None = None  # None: no wandb; offline when no WANDB_API_KEY
    wandb_offline: bool = False
    val_interval: int = 0  # steps between per-source validation losses; 0 = only at phase ends
    val_tokens: int = 65536  # per source and evaluation (val split, in windows of seq_len); 0 = no validation


@dataclass
class StabilitySpec:
    max_bad_steps: int = 5  # non-finite loss or gradient: the step is skipped; abort after this many in a row
    spike_factor: float = 3.0  # a loss above factor x the recent mean is logged as a spike
    spike_window: int = 20  # steps in that recent mean


@dataclass
class LRSpec:
    schedule: str = "wsd"  # wsd | cosine | linear | constant (after warmup)
    start: str = "restart"  # restart: warm up to `peak`; continue: start where the previous phase ended
    peak: float | None = None  # required with start: restart
    warmup_tokens: int = 0
    decay_fraction: float = 0.2  # wsd: the last fraction of the phase decays linearly
    min_ratio: float = 0.1  # the lr at the end of the decay, as a fraction of the phase's peak


@dataclass
class Phase:
    name: str = field(default="", metadata=REQUIRED)
    kind: str = "pretrain"  # pretrain | anneal | sft | context-extension
    mixture: dict[str, float] = field(default_factory=dict, metadata=REQUIRED)  # source id -> weight
    tokens: int = field(default=0, metadata=REQUIRED)  # token budget (rounded up to whole steps)
    seq_len: int = field(default=0, metadata=REQUIRED)
    batch_tokens: int = field(default=0, metadata=REQUIRED)  # global batch, in tokens
    micro_batch_size: int = 1  # sequences per rank per forward
    rope_theta: float | None = None  # None: the previous phase's (or the model's)
    lr: LRSpec = field(default_factory=LRSpec)
    optimizer: str = "carry"  # carry the optimizer state from the previous phase, or reset it
    allow_repeat: bool = False  # may the phase see a window of a source twice (epochs > 1)?


@dataclass
class Recipe:
    name: str = field(default="", metadata=REQUIRED)
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataSpec = field(default_factory=DataSpec)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    deepspeed: DeepSpeedSpec = field(default_factory=DeepSpeedSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    stability: StabilitySpec = field(default_factory=StabilitySpec)
    phases: list[Phase] = field(default_factory=list, metadata=REQUIRED)


# ----------------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> checked dataclasses


class _Origin:
    """Names where a key came from: the recipe file, or the command-line override that set it."""

    def __init__(self, path: str, overrides: dict[str, str]):
        self.path = path
        self.overrides = overrides  # normalised key path -> "key=value" as typed

    def error(self, key: str, msg: str) -> RecipeError:
        for okey, text in self.overrides.items():
            if key == okey or key.startswith((okey + ".", okey + "[")) or okey.startswith(key + "."):
                return RecipeError(f"{self.path}: override {text!r}: {key}: {msg}")
        return RecipeError(f"{self.path}: {key}: {msg}")


def _join(key: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{key}[{name}]"
    return f"{key}.{name}" if key else name


_COUNT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([KMBT]?)\s*$")
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_count(text: str) -> int | None:
    """'2.5M' -> 2500000, '1e6' -> 1000000, '3T' -> 3 * 10**12; None when not a whole count."""
    m = _COUNT.match(text)
    if not m:
        return None
    value = Fraction(m.group(1)) * _SUFFIX[m.group(2)]
    return int(value) if value.denominator == 1 else None


def _convert(tp: Any, value: Any, key: str, origin: _Origin) -> Any:
    kind = typing.get_origin(tp)
    if kind in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(tp, value, key, origin)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, origin)
    if kind is list:
        if not isinstance(value, list):
            raise origin.error(key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, _join(key, i), origin) for i, v in enumerate(value)]
    if kind is dict:
        if not isinstance(value, dict):
            raise origin.error(key, f"expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, _join(key, str(k)), origin) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise origin.error(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and (count := parse_count(value)) is not None:
            return count
        raise origin.error(key, f"expected an integer (e.g. 1000, 1e6, 2.5M, 3B), got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise origin.error(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise origin.error(key, f"expected a string, got {value!r}")
    raise TypeError(f"schema type {tp!r} at {key} is not handled")  # a bug in the schema, not in a recipe


def _build(cls: type, raw: Any, key: str, origin: _Origin) -> Any:
    if not isinstance(raw, dict):
        raise origin.error(key or "(top level)", f"expected a mapping of {cls.__name__} keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            raise origin.error(_join(key, str(k)), f"unknown key{did_you_mean(str(k), names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _convert(hints[f.name], raw[f.name], _join(key, f.name), origin)
        elif f.metadata.get("required"):
            raise origin.error(_join(key, f.name), "missing (required)")
    return cls(**kwargs)


def _apply_override(raw: dict, text: str, path: str) -> str:
    """Set `a.b.c=value` in the raw recipe (phases addressed by index or name); return the key path."""
    if "=" not in text:
        raise RecipeError(f"{path}: override {text!r}: expected key=value")
    dotted, value_text = text.split("=", 1)
    value = _yaml_value(value_text)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"{path}: override {text!r}: empty key")
    node: Any = raw
    key = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            names = [p.get("name") if isinstance(p, dict) else None for p in node]
            if part.isdigit() and int(part) < len(node):
                index = int(part)
            elif part in names:
                index = names.index(part)
            else:
                known = [str(n) for n in names if n is not None]
                raise RecipeError(
                    f"{path}: override {text!r}: {key}: no phase {part!r} (phases: {', '.join(known)})"
                    f"{did_you_mean(part, known)}"
                )
            key = _join(key, index)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"{path}: override {text!r}: {key} is not a mapping")
        key = _join(key, part)
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    return key


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML, apply `key=value` overrides, convert and check every static invariant.

    File checks (tokenizer, manifest, data budgets, world-size divisibility) are `validate_inputs`.
    Relative tokenizer/manifest paths are taken from the current directory and made absolute.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path_str = str(path)
    if not Path(path).is_file():
        raise RecipeError(f"{path_str}: recipe file not found")
    try:
        conf = OmegaConf.load(path)
        raw = OmegaConf.to_container(conf, resolve=True)
    except (OmegaConfBaseException, ValueError) as e:  # yaml errors derive from ValueError? not always
        raise RecipeError(f"{path_str}: cannot read the recipe: {str(e).splitlines()[0]}") from e
    except Exception as e:  # a YAML syntax error: name the line
        raise RecipeError(f"{path_str}: not valid YAML: {' '.join(str(e).split())}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path_str}: expected a mapping of recipe keys at the top level")
    applied = {_apply_override(raw, text, path_str): text for text in overrides}
    origin = _Origin(path_str, applied)
    recipe = _build(Recipe, raw, "", origin)
    recipe.tokenizer.path = str(Path(recipe.tokenizer.path).expanduser().absolute())
    recipe.data.manifest = str(Path(recipe.data.manifest).expanduser().absolute())
    check_recipe(recipe, origin)
    return recipe


# ----------------------------------------------------------------------------------------------------
# Static invariants (no files needed)


def check_recipe(recipe: Recipe, origin: _Origin | str) -> None:
    """Every invariant that needs no file: raise RecipeError naming the key."""
    if isinstance(origin, str):
        origin = _Origin(origin, {})
    err = origin.error

    def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise err(key, f"{value!r} is not one of {', '.join(allowed)}{did_you_mean(value, allowed)}")

    if not recipe.name:
        raise err("name", "must not be empty")
    one_of("precision", recipe.precision, PRECISIONS)
    ds = recipe.deepspeed
    if ds.zero_stage not in (0, 1, 2, 3):
        raise err("deepspeed.zero_stage", f"{ds.zero_stage} is not one of 0, 1, 2, 3")
    if ds.offload_params and ds.zero_stage != 3:
        raise err("deepspeed.offload_params", "needs deepspeed.zero_stage: 3")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise err("deepspeed.offload_optimizer", "needs deepspeed.zero_stage >= 1")
    if not ds.timeout_minutes > 0:
        raise err("deepspeed.timeout_minutes", f"{ds.timeout_minutes} must be > 0")
    opt = recipe.optimizer
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise err("optimizer.betas", f"{opt.betas} must be two numbers in [0, 1)")
    for name in ("eps", "weight_decay", "grad_clip"):
        if getattr(opt, name) < 0:
            raise err(f"optimizer.{name}", f"{getattr(opt, name)} must be >= 0")
    ck = recipe.checkpoint
    if ck.interval < 0:
        raise err("checkpoint.interval", f"{ck.interval} must be >= 0 (0 = phase ends only)")
    if ck.keep_last < 1:
        raise err("checkpoint.keep_last", f"{ck.keep_last} must be >= 1")
    lg = recipe.logging
    if lg.interval < 1:
        raise err("logging.interval", f"{lg.interval} must be >= 1")
    if lg.val_interval < 0 or lg.val_tokens < 0:
        raise err("logging.val_interval" if lg.val_interval < 0 else "logging.val_tokens", "must be >= 0")
    st = recipe.stability
    if st.max_bad_steps < 1:
        raise err("stability.max_bad_steps", f"{st.max_bad_steps} must be >= 1")
    if not st.spike_factor > 1 or st.spike_window < 1:
        raise err("stability.spike_factor", "spike_factor must be > 1 and spike_window >= 1")

    if not recipe.phases:
        raise err("phases", "at least one phase is needed")
    seen: set[str] = set()
    for i, ph in enumerate(recipe.phases):
        key = f"phases[{i}]"
        if not PHASE_NAME.match(ph.name):
            raise err(f"{key}.name", f"{ph.name!r} must be letters, digits, '_', '-' or '.'")
        if ph.name in seen:
            raise err(f"{key}.name", f"{ph.name!r} is used by two phases")
        seen.add(ph.name)
        one_of(f"{key}.kind", ph.kind, PHASE_KINDS)
        one_of(f"{key}.optimizer", ph.optimizer, OPTIMIZER_MODES)
        if not ph.mixture:
            raise err(f"{key}.mixture", "must name at least one source")
        for src, w in ph.mixture.items():
            if not (w > 0 and math.isfinite(w)):
                raise err(f"{key}.mixture.{src}", f"weight {w} must be a positive number")
        for name in ("tokens", "seq_len", "batch_tokens", "micro_batch_size"):
            if getattr(ph, name) < 1:
                raise err(f"{key}.{name}", f"{getattr(ph, name)} must be >= 1")
        if ph.batch_tokens % ph.seq_len:
            raise err(
                f"{key}.batch_tokens",
                f"{ph.batch_tokens} is not a multiple of seq_len {ph.seq_len} (the batch is whole sequences)",
            )
        if ph.rope_theta is not None and not ph.rope_theta > 0:
            raise err(f"{key}.rope_theta", f"{ph.rope_theta} must be > 0")
        if ph.kind == "context-extension" and i > 0 and ph.seq_len <= recipe.phases[i - 1].seq_len:
            raise err(
                f"{key}.seq_len",
                f"{ph.seq_len}: a context-extension phase must be longer than the previous phase's "
                f"{recipe.phases[i - 1].seq_len}",
            )
        lr = ph.lr
        one_of(f"{key}.lr.schedule", lr.schedule, SCHEDULES)
        one_of(f"{key}.lr.start", lr.start, LR_STARTS)
        if lr.start == "restart" and not (lr.peak is not None and lr.peak > 0):
            raise err(f"{key}.lr.peak", f"{lr.peak}: start: restart needs a peak learning rate > 0")
        if lr.start == "continue":
            if i == 0:
                raise err(f"{key}.lr.start", "the first phase has no previous phase to continue")
            if lr.peak is not None:
                raise err(f"{key}.lr.peak", "start: continue takes the previous phase's last lr; remove peak")
            if lr.warmup_tokens:
                raise err(f"{key}.lr.warmup_tokens", "start: continue does not warm up; remove warmup_tokens")
        if not 0 <= lr.decay_fraction <= 1:
            raise err(f"{key}.lr.decay_fraction", f"{lr.decay_fraction} must be in [0, 1]")
        if not 0 <= lr.min_ratio <= 1:
            raise err(f"{key}.lr.min_ratio", f"{lr.min_ratio} must be in [0, 1]")
        if lr.warmup_tokens < 0:
            raise err(f"{key}.lr.warmup_tokens", f"{lr.warmup_tokens} must be >= 0")
    model_configs(recipe, origin)  # the model config of every phase is valid


def model_configs(recipe: Recipe, origin: _Origin | str = "recipe") -> list[Any]:
    """The ModelConfig each phase trains: the size + overrides, then each phase's RoPE theta and a context
    at least as long as every phase so far (a context extension stays extended in later phases)."""
    from model.llama import SIZES, ModelConfig

    if isinstance(origin, str):
        origin = _Origin(origin, {})
    if recipe.model.size not in SIZES:
        raise origin.error("model.size", f"{recipe.model.size!r} is not one of {', '.join(SIZES)}"
                           f"{did_you_mean(recipe.model.size, SIZES)}")  # fmt: skip
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    for k in recipe.model.overrides:
        if k not in names:
            raise origin.error(f"model.overrides.{k}", f"not a ModelConfig field{did_you_mean(k, names)}")
    try:
        cfg = dataclasses.replace(SIZES[recipe.model.size], **recipe.model.overrides)
    except (ValueError, TypeError) as e:
        raise origin.error("model.overrides", str(e)) from e
    if recipe.deepspeed.activation_checkpointing:
        cfg = dataclasses.replace(cfg, checkpoint_activations=True)
    out = []
    for i, ph in enumerate(recipe.phases):
        try:
            cfg = dataclasses.replace(
                cfg,
                rope_theta=ph.rope_theta if ph.rope_theta is not None else cfg.rope_theta,
                max_seq_len=max(cfg.max_seq_len, ph.seq_len),
            )
        except ValueError as e:
            raise origin.error(f"phases[{i}]", str(e)) from e
        out.append(cfg)
    return out


# ----------------------------------------------------------------------------------------------------
# Derived values, in one place


@dataclass(frozen=True)
class PhasePlan:
    index: int
    name: str
    phase: Phase
    model_cfg: Any  # model.llama.ModelConfig
    seqs_per_step: int  # global batch, in sequences
    grad_accum: int  # micro-batches per rank per step
    steps: int
    first_step: int  # global step number of the phase's first step (steps count from 0 over the run)
    warmup_steps: int
    peak_lr: float
    weights: tuple[tuple[str, Fraction], ...]  # (source, exact share), sorted by source id

    @property
    def tokens(self) -> int:
        return self.steps * self.phase.batch_tokens

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token at this phase's sequence length (6N + attention), for MFU."""
        from model.llama import flops_per_token

        return flops_per_token(self.model_cfg, self.phase.seq_len)

    @property
    def end_step(self) -> int:  # one past the phase's last global step
        return self.first_step + self.steps

    def lr_at(self, step_in_phase: int) -> float:
        """The learning rate of the phase's step `step_in_phase` (0-based): warmup, then the schedule."""
        lr, i, n = self.phase.lr, step_in_phase, self.steps
        peak, floor = self.peak_lr, self.peak_lr * lr.min_ratio
        if i < self.warmup_steps:
            return peak * (i + 1) / self.warmup_steps
        if lr.schedule == "constant":
            return peak
        if lr.schedule == "wsd":
            decay_steps = round(lr.decay_fraction * n)
            start = n - decay_steps
            if i < start or decay_steps == 0:
                return peak
            # linear from peak (at step start - 1) to floor (at the last step)
            return peak + (floor - peak) * (i - start + 1) / decay_steps
        span = n - self.warmup_steps
        u = 1.0 if span <= 1 else (i - self.warmup_steps) / (span - 1)  # 0 at the first step after warmup
        if lr.schedule == "linear":
            return peak + (floor - peak) * u
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * u))  # cosine

    @property
    def final_lr(self) -> float:
        return self.lr_at(self.steps - 1)


def mixture_shares(mixture: dict[str, float]) -> tuple[tuple[str, Fraction], ...]:
    """Exact shares of each source (weights as written, normalised), sorted by source id."""
    weights = {src: Fraction(repr(float(w))) for src, w in mixture.items()}
    total = sum(weights.values())
    return tuple((src, weights[src] / total) for src in sorted(weights))


def plan_phases(recipe: Recipe, world_size: int) -> list[PhasePlan]:
    """Derived values of every phase for `world_size` ranks (divisibility is checked by validate_inputs)."""
    plans: list[PhasePlan] = []
    first = 0
    for i, (ph, cfg) in enumerate(zip(recipe.phases, model_configs(recipe))):
        seqs = ph.batch_tokens // ph.seq_len
        steps = max(1, math.ceil(ph.tokens / ph.batch_tokens))
        warmup = min(steps, math.ceil(ph.lr.warmup_tokens / ph.batch_tokens))
        peak = plans[-1].final_lr if ph.lr.start == "continue" else float(ph.lr.peak)
        plans.append(
            PhasePlan(
                index=i, name=ph.name, phase=ph, model_cfg=cfg, seqs_per_step=seqs,
                grad_accum=max(1, seqs // (world_size * ph.micro_batch_size)), steps=steps,
                first_step=first, warmup_steps=warmup, peak_lr=peak, weights=mixture_shares(ph.mixture),
            )
        )  # fmt: skip
        first += steps
    return plans


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of what defines the training trajectory: seed, model, precision, optimizer, ZeRO stage and
    phases. Paths (the data is identified by the manifest's root hash), logging and checkpoint settings
    are left out: changing them does not make a resumed run a different run."""
    d = dataclasses.asdict(recipe)
    keep = {k: d[k] for k in ("seed", "model", "precision", "optimizer", "phases")}
    keep["zero_stage"] = recipe.deepspeed.zero_stage
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (loadable again with load_recipe)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(recipe)))


# ----------------------------------------------------------------------------------------------------
# Checks that need the files: tokenizer, manifest, data budgets, world size


def validate_inputs(
    recipe: Recipe, world_size: int, path: str = "recipe", check_files: bool = True
) -> dict | None:
    """Check the recipe against the world size and (unless check_files=False) this machine, the tokenizer
    and the data manifest: fp16 needs a GPU, vocab sizes, mixture sources and their usage conditions,
    token budgets vs data available. Returns the loaded manifest (None without file checks). Raises
    RecipeError naming the file and key."""
    err = _Origin(path, {}).error
    plans = plan_phases(recipe, world_size)
    for p in plans:
        per_step = world_size * p.phase.micro_batch_size * p.phase.seq_len
        if p.phase.batch_tokens % per_step:
            raise err(
                f"phases[{p.index}].batch_tokens",
                f"{p.phase.batch_tokens} is not divisible by world size x micro_batch_size x seq_len = "
                f"{world_size} x {p.phase.micro_batch_size} x {p.phase.seq_len} = {per_step}",
            )
    if not check_files:
        return None

    import torch

    from tokenizer import Tokenizer

    if recipe.precision == "fp16" and not torch.cuda.is_available():
        raise err("precision", "fp16 needs a CUDA GPU (DeepSpeed on CPU trains in fp32 or bf16)")

    tok_path = Path(recipe.tokenizer.path)
    if not tok_path.is_file():
        raise err("tokenizer.path", f"{tok_path}: file not found")
    try:
        tok = Tokenizer.load(tok_path)
    except Exception as e:
        raise err("tokenizer.path", f"{tok_path}: not a tokenizer model ({e})") from e
    model_vocab = plans[0].model_cfg.vocab_size
    if tok.vocab_size != model_vocab:
        raise err(
            "model.overrides.vocab_size",
            f"model vocab_size {model_vocab} != tokenizer vocab_size {tok.vocab_size} ({tok_path}); "
            f"set model.overrides.vocab_size: {tok.vocab_size}",
        )
    manifest = load_manifest_checked(recipe, path)
    m_tok = manifest.get("tokenizer", {})
    if m_tok.get("sha256") and m_tok["sha256"] != tok.sha256:
        raise err(
            "tokenizer.path",
            f"{tok_path} (sha256 {tok.sha256[:12]}) is not the tokenizer the data was encoded with "
            f"(manifest: {str(m_tok.get('path'))!r}, sha256 {m_tok['sha256'][:12]})",
        )
    sources = manifest.get("sources", {})
    for p in plans:
        for src in p.phase.mixture:
            key = f"phases[{p.index}].mixture.{src}"
            if src not in sources:
                raise err(key, f"not a source of {recipe.data.manifest}{did_you_mean(src, sources)}")
            allowed = (sources[src].get("conditions") or {}).get("phases")
            if allowed and p.phase.kind not in allowed:
                raise err(
                    key,
                    f"the usage conditions of {src!r} allow phases of kind {', '.join(allowed)} only, "
                    f"not {p.phase.kind!r}",
                )
            if p.phase.kind == "sft" and sources[src].get("kind") != "chat":
                raise err(
                    key, f"an sft phase trains on chat sources only; {src!r} is {sources[src].get('kind')!r}"
                )
        needed = windows_needed(p)
        for src, n in needed.items():
            have = available_windows(manifest, recipe.data.manifest, src, "train", p.phase.seq_len)
            if have == 0:
                raise err(
                    f"phases[{p.index}].mixture.{src}",
                    f"source {src!r} has no train windows of {p.phase.seq_len + 1} tokens",
                )
            if n > have and not p.phase.allow_repeat:
                raise err(
                    f"phases[{p.index}].tokens",
                    f"{p.phase.tokens:,} tokens need {n:,} windows of {src!r} but its train split has {have:,} "
                    f"(x{n / have:.2f}); lower the budget or the weight, or set allow_repeat: true",
                )
    return manifest


def load_manifest_checked(recipe: Recipe, path: str = "recipe") -> dict:
    from corpus.manifest import load_manifest

    m_path = Path(recipe.data.manifest)
    if not m_path.is_file():
        raise RecipeError(
            f"{path}: data.manifest: {m_path}: file not found (run `communs data prepare` first)"
        )
    try:
        return load_manifest(m_path)
    except UserError as e:
        raise RecipeError(f"{path}: data.manifest: {e}") from e
    except (OSError, ValueError, KeyError) as e:
        raise RecipeError(f"{path}: data.manifest: {m_path}: unreadable manifest ({e})") from e


def windows_needed(plan: PhasePlan) -> dict[str, int]:
    """The most windows the phase can take from each source: ceil(share x slots) (see train.mixture)."""
    slots = plan.steps * plan.seqs_per_step
    return {src: math.ceil(share * slots) for src, share in plan.weights}


def available_windows(
    manifest: dict, manifest_path: str | Path, source: str, split: str, seq_len: int
) -> int:
    """Windows of seq_len + 1 tokens a PackedReader cuts from a source's split (0 when the split is absent)."""
    from corpus.loader import PackedReader
    from corpus.manifest import shard_prefixes

    if split not in manifest["sources"][source].get("splits", {}):
        return 0
    prefixes = shard_prefixes(manifest, Path(manifest_path), source, split)
    if not prefixes:
        return 0
    return len(PackedReader(prefixes, seq_len))


# ----------------------------------------------------------------------------------------------------
# DeepSpeed


def deepspeed_config(recipe: Recipe, phase: Phase | int | str, world_size: int) -> dict:
    """DeepSpeed's JSON for one phase: the only place batch size, accumulation, precision and ZeRO are set.

    The optimizer is torch's AdamW ("torch_adam"): DeepSpeed's fused/CPU Adam JIT-compile on first use
    (70-80 s on CPU) and need a compiler on GPU nodes. The learning rate is set by train.loop each step
    from PhasePlan.lr_at (a pure function of the step), so no DeepSpeed scheduler is configured.
    """
    plans = plan_phases(recipe, world_size)
    if isinstance(phase, Phase):
        phase = phase.name
    plan = plans[phase] if isinstance(phase, int) else next(p for p in plans if p.name == phase)
    ph, ds, opt = plan.phase, recipe.deepspeed, recipe.optimizer
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    cfg: dict[str, Any] = {
        "train_batch_size": plan.seqs_per_step,
        "train_micro_batch_size_per_gpu": ph.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": opt.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": plan.peak_lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": recipe.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": recipe.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # train.telemetry logs; DeepSpeed's own progress lines are off
        "wall_clock_breakdown": False,
    }
    return cfg
