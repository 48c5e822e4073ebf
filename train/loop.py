"""The training loop: one process per rank (torchrun, srun + torchrun, or a single plain process).

`run(recipe, run_dir)` trains every phase of the recipe, resuming from the newest valid checkpoint.
Each phase gets its own DeepSpeed engine (batch size, accumulation and sequence length may change
between phases); the weights, and the optimizer state unless the phase resets it, come from the
previous phase's end checkpoint, so a run that stops at a phase boundary and resumes goes through
exactly the same code as one that does not. `train_step` is the whole optimisation step, in view.

Data: each step's global batch is `train.mixture.step_slots` (a pure function of seed, manifest root
hash, phase and step); rank r takes slots [r * per_rank, (r + 1) * per_rank), cut into micro-batches.
The loss is the mean cross-entropy over every scored target token of the global batch (targets of
document starts and, for chat data, of non-assistant tokens are not scored).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from model.ops import IGNORE_INDEX
from train import EXIT_OK, EXIT_REQUEUE, checkpoint, mixture, telemetry
from train.export import consolidated_state_dict, export_hf
from train.recipe import (
    PhasePlan,
    Recipe,
    deepspeed_config,
    load_manifest_checked,
    plan_phases,
    recipe_hash,
    to_yaml,
)

FAULT_ENV = (
    "COMMUNS_FAULT_KILL_IN_CHECKPOINT"  # tests: SIGKILL rank 0 in the middle of this step's checkpoint
)


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why."""


# ----------------------------------------------------------------------------------------------------
# Process group and engine


def init_distributed(timeout_minutes: float) -> tuple[int, int, torch.device]:
    """torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU), with the recipe's collective timeout."""
    import importlib

    import deepspeed

    # (`import deepspeed.comm.torch as m` would bind the `torch` attribute of deepspeed.comm: torch itself)
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(
                f"{var} is not set: run under torchrun (communs train does) or set RANK/WORLD_SIZE/..."
            )
    if not torch.cuda.is_available():
        # DeepSpeed JIT-compiles a shared-memory all-reduce op on the first CPU init (~40 s, a C++ compiler
        # needed). gloo is enough for CPU runs: skip the op.
        ds_comm_torch.build_shm_op = lambda: None
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo",
        timeout=timedelta(minutes=timeout_minutes),
    )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def all_reduce_host(t: torch.Tensor, op=None) -> torch.Tensor:
    """all_reduce of a small host tensor, returned on the host. NCCL reduces CUDA tensors only: under it
    the tensor makes a round trip through the current GPU (gloo reduces it in place)."""
    dist = torch.distributed
    op = dist.ReduceOp.SUM if op is None else op
    if dist.get_backend() == "nccl":
        on_device = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=op)
        return on_device.cpu()
    dist.all_reduce(t, op=op)
    return t


def build_engine(recipe: Recipe, plan: PhasePlan, world: int):
    """A DeepSpeed engine around a fresh Transformer for this phase (same seed: same initial weights)."""
    import deepspeed

    from model.llama import Transformer

    ds_cfg = deepspeed_config(recipe, plan.index, world)
    torch.manual_seed(recipe.seed)
    # Built whole on every rank, then partitioned by deepspeed.initialize. (Under deepspeed.zero.Init the
    # parameters are partitioned as each layer is built, and Transformer.init_weights would see empty
    # tensors.) Host memory holds one fp32 copy per rank while the engine starts.
    model = Transformer(plan.model_cfg)
    # no weight decay on norm gains (1-D parameters)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": recipe.optimizer.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg)
    return engine


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16): where lr and Adam's state live."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


# ----------------------------------------------------------------------------------------------------
# Batches


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T) int64
    position_ids: torch.Tensor  # (B, T) int64, restarting at 0 at each document start
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX where not scored
    n_scored: int


def make_batch(
    tokens: np.ndarray, positions: np.ndarray, scored: np.ndarray, device: torch.device
) -> MicroBatch:
    """A micro-batch from stacked windows (`PackedReader.batch`): tokens (B, T+1), position_ids (B, T),
    loss mask (B, T). The arrays are used as they are (no copy on the host)."""
    tokens, scored = torch.from_numpy(tokens), torch.from_numpy(scored)
    targets = torch.where(scored, tokens[:, 1:], IGNORE_INDEX)
    return MicroBatch(
        tokens[:, :-1].to(device),
        torch.from_numpy(positions).to(device),
        targets.to(device),
        int(scored.sum()),
    )


def gather_windows(readers: dict, picks: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows (source, window index) stacked in this order: one `batch` call per source; a micro-batch
    drawn from one source (the usual case) is that call's arrays as they are."""
    by_source: dict[str, list[int]] = {}
    for j, (src, _) in enumerate(picks):
        by_source.setdefault(src, []).append(j)
    if len(by_source) == 1:
        return readers[picks[0][0]].batch([w for _, w in picks])
    out = None
    for src, js in by_source.items():
        part = readers[src].batch([picks[j][1] for j in js])
        if out is None:
            out = [np.empty((len(picks), *a.shape[1:]), dtype=a.dtype) for a in part]
        for whole, a in zip(out, part):
            whole[js] = a
    return tuple(out)


def rank_micro_batches(
    slots: list[mixture.Slot], readers: dict, rank: int, world: int, mbs: int, device
) -> list[MicroBatch]:
    """This rank's part of the step's slots (the r-th contiguous share), as micro-batches of `mbs` windows."""
    per_rank = len(slots) // world
    mine = slots[rank * per_rank : (rank + 1) * per_rank]
    return [
        make_batch(*gather_windows(readers, [(s.source, s.window) for s in mine[i : i + mbs]]), device)
        for i in range(0, per_rank, mbs)
    ]


# ----------------------------------------------------------------------------------------------------
# The training step


@dataclass
class StepResult:
    loss: float  # mean over the scored tokens of the global batch
    grad_norm: float  # before clipping; nan when the step was skipped
    skipped: bool  # non-finite loss or gradient, or nothing scored: no update was applied
    empty: bool = False  # the global batch had no scored target token (nothing to learn from)


def train_step(engine, micro_batches: list[MicroBatch], lr: float, zero_stage: int) -> StepResult:
    """One optimizer step over this rank's micro-batches of the global batch.

    The model returns the mean loss of each micro-batch; rescaling it by its share of the global batch's
    scored tokens makes the gradient (which DeepSpeed averages over micro-batches and ranks) the gradient
    of the mean over every scored token. A non-finite loss on any micro-batch poisons its gradient with
    NaN, so DeepSpeed's overflow check (ZeRO 1-3) skips the update on every rank; at ZeRO 0, where
    DeepSpeed steps unchecked, the gradients are dropped here instead (AdamW skips gradient-less params).
    A global batch with no scored target at all (possible in SFT: every window user text) is skipped
    whole: no forward, no update (`empty`).

    The losses and the finiteness flag stay on the device until the step's end: one host sync per step
    (the final all-reduce), not one per micro-batch.
    """
    dist = torch.distributed
    world = dist.get_world_size()
    for group in torch_optimizer(engine).param_groups:
        group["lr"] = lr
    n_local = torch.tensor([float(sum(mb.n_scored for mb in micro_batches))], dtype=torch.float64)
    n_local = all_reduce_host(n_local)
    n_global = n_local.item()  # from host-side counts: no device sync
    if n_global == 0:  # the same decision on every rank (all-reduced)
        return StepResult(loss=float("nan"), grad_norm=float("nan"), skipped=True, empty=True)
    share = len(micro_batches) * world / n_global  # each micro-batch's loss is a mean over its tokens

    device = micro_batches[0].input_ids.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    nan = torch.tensor(float("nan"), device=device)
    for i, mb in enumerate(micro_batches):
        targets, weight = mb.targets, mb.n_scored
        if weight == 0:  # nothing scored (e.g. a chat window of user text): one dummy target, zero weight
            targets = targets.clone()
            targets[0, 0] = mb.input_ids[0, 1] if mb.input_ids.shape[1] > 1 else mb.input_ids[0, 0]
        out = engine(mb.input_ids, position_ids=mb.position_ids, targets=targets)
        finite = torch.isfinite(out.loss)
        bad |= ~finite
        # x 1.0 is exact (the same loss and gradients bit for bit); x nan poisons the gradient of a
        # non-finite loss, without asking the host whether it is finite
        poison = torch.where(finite, torch.ones_like(nan), nan).to(out.loss.dtype)
        engine.backward(out.loss * (weight * share) * poison)
        loss_sum += torch.where(finite, out.loss.detach().double(), 0.0) * weight
        last = i == len(micro_batches) - 1
        grad_norm = None
        if last and zero_stage == 0:
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            grad_norm = (
                float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])))
                if grads
                else 0.0
            )
            if not math.isfinite(grad_norm):
                for p in engine.module.parameters():
                    p.grad = None
                # DeepSpeed's ZeRO-0 clipping indexes the first gradient: with none, clip nothing this step
                clip, engine._config.gradient_clipping = engine._config.gradient_clipping, 0.0
                engine.step()
                engine._config.gradient_clipping = clip
                continue
        engine.step()

    if zero_stage == 0:
        applied = grad_norm is not None and math.isfinite(grad_norm)
    else:
        applied = engine.was_step_applied()
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    stats = torch.stack([loss_sum, bad.double()]).cpu()  # the step's one host sync
    stats = all_reduce_host(stats)
    skipped = (not applied) or stats[1].item() > 0
    loss = stats[0].item() / n_global if stats[1].item() == 0 else float("nan")
    return StepResult(loss=loss, grad_norm=grad_norm if applied else float("nan"), skipped=skipped)


@torch.no_grad()
def evaluate(engine, readers: dict, seq_len: int, mbs: int, max_tokens: int, device) -> dict[str, float]:
    """Mean loss per source over the first ceil(max_tokens / seq_len) windows of its val split. Every rank
    runs the same number of forwards (ZeRO-3 gathers parameters collectively), padding with unscored rows."""
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    engine.eval()
    out = {}
    for src in sorted(readers):
        reader = readers[src]
        n = min(len(reader), math.ceil(max_tokens / seq_len))
        mine = list(range(rank, n, world))
        n_batches = math.ceil(math.ceil(n / world) / mbs)
        sums = torch.zeros(2, dtype=torch.float64)
        for b in range(n_batches):
            idx = mine[b * mbs : (b + 1) * mbs]
            pad = mbs - len(idx)
            tokens, positions, scored = reader.batch(idx + [0] * pad)
            scored[len(idx) :] = False  # unscored filler rows
            mb = make_batch(tokens, positions, scored, device)
            targets = mb.targets
            if mb.n_scored == 0:
                targets = targets.clone()
                targets[0, 0] = mb.input_ids[0, 0]
            loss = engine(mb.input_ids, position_ids=mb.position_ids, targets=targets).loss
            if mb.n_scored:
                sums += torch.tensor([loss.double().item() * mb.n_scored, mb.n_scored], dtype=torch.float64)
        sums = all_reduce_host(sums)
        if sums[1] > 0:
            out[src] = sums[0].item() / sums[1].item()
    engine.train()
    return out


# ----------------------------------------------------------------------------------------------------
# Signals


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    """SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) ask the run to finish its step, checkpoint and exit EXIT_REQUEUE.

    Installed first thing in `run`, so that a signal during start-up (process group, checkpoint hashing,
    the FLOP/s measurement) is not fatal either: the run then stops before its first step."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (ranks may get the signal at different steps)."""
        flag = torch.tensor([float(self.signum)])
        flag = all_reduce_host(flag, torch.distributed.ReduceOp.MAX)
        return flag.item() > 0


# ----------------------------------------------------------------------------------------------------
# The run


@dataclass
class State:
    step: int = 0  # optimizer steps done over the run (skipped ones included)
    phase_index: int = 0
    step_in_phase: int = 0
    tokens: int = 0  # tokens consumed over the run
    data_position: dict[str, int] = field(default_factory=dict)  # windows taken per source in this phase
    bad_in_a_row: int = 0
    skipped_total: int = 0
    recent_losses: list[float] = field(default_factory=list)


def open_readers(manifest: dict, manifest_path: str, sources, split: str, seq_len: int) -> dict:
    from corpus.loader import PackedReader
    from corpus.manifest import shard_prefixes

    readers = {}
    for src in sources:
        if split not in manifest["sources"][src].get("splits", {}):
            continue
        prefixes = shard_prefixes(manifest, Path(manifest_path), src, split)
        if prefixes:
            reader = PackedReader(prefixes, seq_len)
            if len(reader):
                readers[src] = reader
    return readers


def record_environment(run_dir: Path, world: int, resumed_from: str | None = None) -> Path | None:
    """env.json: the environment of the run's first start, written once and kept. Each resume adds
    env-<n>.json (n = 1, 2, ...: the n-th resume), with `resumed_from` set to the checkpoint tag."""
    first = run_dir / "env.json"
    if not first.exists():
        telemetry.write_json(first, telemetry.environment(world))
        return first
    if resumed_from is None:
        return None
    n = 1
    while (run_dir / f"env-{n}.json").exists():
        n += 1
    path = run_dir / f"env-{n}.json"
    telemetry.write_json(path, {**telemetry.environment(world), "resumed_from": resumed_from})
    return path


def prepare_run_dir(recipe: Recipe, run_dir: Path, world: int) -> None:
    """The files describing the run: recipe.yaml, deepspeed/<phase>.json, env.json (if absent)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    tmp = run_dir / ".recipe.yaml.tmp"
    tmp.write_text(to_yaml(recipe))
    os.replace(tmp, run_dir / "recipe.yaml")
    (run_dir / "deepspeed").mkdir(exist_ok=True)
    for plan in plan_phases(recipe, world):
        telemetry.write_json(
            run_dir / "deepspeed" / f"{plan.name}.json", deepspeed_config(recipe, plan.index, world)
        )
    record_environment(run_dir, world)


def check_world_size(point: checkpoint.ResumePoint, world: int, zero_stage: int) -> None:
    """Refuse to resume ZeRO partitions written by another number of ranks (they cannot be re-split)."""
    written = point.client.get("world_size")
    if written != world and zero_stage > 0:
        raise UserError(
            f"{point.dir}: written by {written} ranks, this run has {world}: ZeRO stage {zero_stage} "
            f"partitions cannot be re-split; resume with --nproc {written}"
        )


def run(recipe: Recipe, run_dir: str | Path, resume: str = "auto", stop_at_step: int | None = None) -> int:
    """Train every phase of `recipe` in `run_dir` (this process is one rank); return the exit code."""
    stop = StopFlag()  # before anything slow: a stop signal during start-up must not kill the rank
    try:
        return _run(recipe, Path(run_dir).absolute(), resume, stop_at_step, stop)
    finally:
        stop.close()


def _run(recipe: Recipe, run_dir: Path, resume: str, stop_at_step: int | None, stop: StopFlag) -> int:
    # DeepSpeed's ZeRO calls a collective torch has renamed; the warning says nothing to a user.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    rank, world, device = init_distributed(recipe.deepspeed.timeout_minutes)
    dist = torch.distributed
    plans = plan_phases(recipe, world)
    manifest = load_manifest_checked(recipe)
    root_hash = manifest["root_hash"]
    rhash = recipe_hash(recipe)
    ckpt_root = run_dir / "checkpoints"

    # Every rank takes the same resume decision; each hashes 1/world of a candidate checkpoint's files.
    def check_in_parallel(ckpt_dir: Path) -> str | None:
        problems: list = [None] * world
        dist.all_gather_object(problems, checkpoint.verify(ckpt_dir, rank, world))
        return next((p for p in problems if p), None)

    point = checkpoint.find_resume(
        ckpt_root,
        rhash,
        root_hash,
        resume,
        check=check_in_parallel,
        log=None if rank == 0 else (lambda msg: None),
    )
    if point is not None:
        check_world_size(point, world, recipe.deepspeed.zero_stage)
    if rank == 0:
        if resume == "never":
            moved = checkpoint.set_aside_unusable(ckpt_root)
            if moved:
                print(
                    f"train: set aside unusable checkpoints: {', '.join(moved)}", file=sys.stderr, flush=True
                )
        if point is not None:
            checkpoint.restore(ckpt_root, point.tag)  # a `.tmp-old-<tag>` left by a cut re-commit
        prepare_run_dir(recipe, run_dir, world)
        record_environment(run_dir, world, resumed_from=None if point is None else point.tag)
    dist.barrier()

    state = State()
    if point is not None:
        c = point.client
        state = State(
            step=c["step"], phase_index=c["phase_index"], step_in_phase=c["step_in_phase"], tokens=c["tokens"],
            data_position=dict(c["data_position"]), bad_in_a_row=c.get("bad_in_a_row", 0),
            skipped_total=c.get("skipped_total", 0), recent_losses=list(c.get("recent_losses", [])),
        )  # fmt: skip
        if c.get("phase_end"):
            state = dataclasses.replace(
                state, phase_index=state.phase_index + 1, step_in_phase=0, data_position={}
            )

    tel = telemetry.Telemetry(run_dir, rank, plans[-1].end_step, recipe, resumed_step=state.step)
    if rank == 0:
        telemetry.update_run_json(
            run_dir, recipe=recipe.name, recipe_hash=rhash, manifest=recipe.data.manifest,
            manifest_root_hash=root_hash, world_size=world, status="running",
            resumed_from=None if point is None else point.tag,
        )  # fmt: skip
        tel.message(
            f"train: {recipe.name}: {len(plans)} phase(s), {plans[-1].end_step} steps, world size {world}, ZeRO "
            f"{recipe.deepspeed.zero_stage}, {recipe.precision}; "
            + (f"resuming from {point.tag}" if point else "starting fresh")
        )
    try:
        peak_local, peak_src = telemetry.peak_flops(device, recipe.precision)
        peak = torch.tensor([peak_local], dtype=torch.float64)
        peak = all_reduce_host(peak)
        if stop.agreed():  # signalled during start-up: nothing trained, the resume point is unchanged
            tel.message(
                f"stop signal before the first step ({signal.Signals(stop.signum).name if stop.signum else 'another rank'}):"
                f" nothing trained; exit {EXIT_REQUEUE} to requeue"
            )
            code = EXIT_REQUEUE
        else:
            code = _train(recipe, run_dir, plans, manifest, root_hash, rhash, state, point, rank, world, device,
                          tel, peak.item(), stop, stop_at_step)  # fmt: skip
    except TrainingAborted as e:
        if rank == 0:
            telemetry.update_run_json(run_dir, status="failed", error=str(e))
        raise
    finally:
        tel.close()
    if rank == 0:
        if code == EXIT_OK:
            summary = telemetry.summarize(run_dir / "metrics.jsonl", [p.name for p in plans])
            summary.update(
                recipe=recipe.name, steps=plans[-1].end_step, peak_flops=peak.item(), peak_source=peak_src
            )
            telemetry.write_json(run_dir / "summary.json", summary)
            print_summary(summary)
        telemetry.update_run_json(
            run_dir, status="finished" if code == EXIT_OK else "preempted", step=state.step
        )
    dist.barrier()
    return code


def _train(recipe, run_dir, plans, manifest, root_hash, rhash, state, point, rank, world, device, tel, peak, stop,
           stop_at_step) -> int:  # fmt: skip
    ckpt_root = run_dir / "checkpoints"
    stage = recipe.deepspeed.zero_stage
    window = recipe.stability.spike_window
    recent = deque(state.recent_losses, maxlen=window)

    def save(plan: PhasePlan, phase_end: bool) -> str:
        tag = checkpoint.tag_for(state.step)
        tmp = [checkpoint.prepare_tmp(ckpt_root, tag) if rank == 0 else None]
        torch.distributed.broadcast_object_list(tmp, src=0)
        engine.save_checkpoint(str(ckpt_root), tag=tmp[0], save_latest=False)
        checkpoint.save_rng(ckpt_root / tmp[0], rank)
        torch.distributed.barrier()
        shares: list = [None] * world
        torch.distributed.all_gather_object(shares, checkpoint.hash_share(ckpt_root / tmp[0], rank, world))
        if rank == 0:
            if os.environ.get(FAULT_ENV) == str(state.step):
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection (tests): die mid-commit
            hashes = {rel: meta for share in shares for rel, meta in share.items()}
            checkpoint.commit(ckpt_root, tag, hashes=hashes, client={
                "step": state.step, "phase": plan.name, "phase_index": plan.index,
                "step_in_phase": state.step_in_phase, "phase_end": phase_end, "tokens": state.tokens,
                "data_position": state.data_position, "recipe_hash": rhash, "manifest_root_hash": root_hash,
                "world_size": world, "zero_stage": stage, "bad_in_a_row": state.bad_in_a_row,
                "skipped_total": state.skipped_total, "recent_losses": list(recent),
            })  # fmt: skip
            checkpoint.prune(ckpt_root, recipe.checkpoint.keep_last, recipe.checkpoint.keep_phase_ends)
        torch.distributed.barrier()
        return tag

    engine = None
    for plan in plans[state.phase_index :]:
        ph = plan.phase
        engine = build_engine(recipe, plan, world)
        if (
            point is not None
            and not point.client.get("phase_end")
            and point.client["phase_index"] == plan.index
        ):
            engine.load_checkpoint(str(ckpt_root), tag=point.tag, load_lr_scheduler_states=False)
            checkpoint.load_rng(ckpt_root / point.tag, rank)
        elif plan.index > 0:
            prev_tag = checkpoint.tag_for(plans[plan.index - 1].end_step)
            if not (ckpt_root / prev_tag).is_dir():
                raise TrainingAborted(
                    f"{ckpt_root / prev_tag}: the previous phase's end checkpoint is missing"
                )
            engine.load_checkpoint(str(ckpt_root), tag=prev_tag, load_lr_scheduler_states=False)
            checkpoint.load_rng(ckpt_root / prev_tag, rank)
            if ph.optimizer == "reset":
                torch_optimizer(engine).state.clear()
            if rank == 0 and not (run_dir / "export" / plans[plan.index - 1].name).exists():
                export_phase(recipe, plans[plan.index - 1], ckpt_root, prev_tag, run_dir, tel)
        point = None
        train_readers = open_readers(manifest, recipe.data.manifest, ph.mixture, "train", ph.seq_len)
        missing = sorted(set(ph.mixture) - set(train_readers))
        if missing:
            raise UserError(
                f"{recipe.data.manifest}: phase {plan.name}: no train windows for {', '.join(missing)}"
            )
        val_readers = (
            open_readers(manifest, recipe.data.manifest, ph.mixture, "val", ph.seq_len)
            if recipe.logging.val_tokens
            else {}
        )
        n_windows = {src: len(r) for src, r in train_readers.items()}
        flops_per_token = plan.flops_per_token
        step_seconds, tokens_since_log = 0.0, 0
        shown: dict[str, float] = {}

        while state.step_in_phase < plan.steps:
            t_step = time.perf_counter()  # data loading included: tokens/s and MFU are end-to-end
            slots = mixture.step_slots(
                state.data_position, plan.weights, n_windows, plan.seqs_per_step,
                recipe.seed, root_hash, plan.name, state.step_in_phase,
            )  # fmt: skip
            batches = rank_micro_batches(slots, train_readers, rank, world, ph.micro_batch_size, device)
            lr = plan.lr_at(state.step_in_phase)
            abort = None
            result = train_step(engine, batches, lr, stage)
            step_seconds += time.perf_counter() - t_step
            state.step += 1
            state.step_in_phase += 1
            state.tokens += ph.batch_tokens
            tokens_since_log += ph.batch_tokens

            if result.empty:
                # not an instability: counted as skipped, without touching the non-finite streak
                state.skipped_total += 1
                tel.message(
                    f"step {state.step} ({plan.name}): no scored target token in the whole global batch: "
                    f"nothing to learn from, update skipped ({state.skipped_total} skipped in all)"
                )
            elif result.skipped:
                state.skipped_total += 1
                state.bad_in_a_row += 1
                tel.message(
                    f"step {state.step} ({plan.name}): non-finite loss or gradient (loss {result.loss}, grad norm "
                    f"{result.grad_norm}): update skipped ({state.bad_in_a_row} in a row)"
                )
                if state.bad_in_a_row >= recipe.stability.max_bad_steps:
                    abort = TrainingAborted(
                        f"phase {plan.name} step {state.step}: {state.bad_in_a_row} steps in a row with a non-finite "
                        f"loss or gradient (stability.max_bad_steps={recipe.stability.max_bad_steps}); the last good "
                        f"checkpoint is in {ckpt_root}; lower the learning rate or check the data"
                    )
            else:
                state.bad_in_a_row = 0
                if len(recent) >= window and result.loss > recipe.stability.spike_factor * (
                    sum(recent) / len(recent)
                ):
                    tel.log({"kind": "spike", "phase": plan.name, "step": state.step, "loss": result.loss,
                             "recent_mean": sum(recent) / len(recent)})  # fmt: skip
                    tel.message(f"step {state.step} ({plan.name}): loss spike {result.loss:.4f} "
                                f"(recent mean {sum(recent) / len(recent):.4f})")  # fmt: skip
                recent.append(result.loss)

            last_of_phase = state.step_in_phase == plan.steps
            if (
                state.step_in_phase == 1
                or last_of_phase
                or abort
                or state.step % recipe.logging.interval == 0
            ):
                tps = (
                    tokens_since_log / step_seconds if step_seconds > 0 else 0.0
                )  # checkpoints, val excluded
                record = {
                    "kind": "train", "phase": plan.name, "step": state.step, "step_in_phase": state.step_in_phase,
                    "tokens": state.tokens, "phase_tokens": state.step_in_phase * ph.batch_tokens,
                    "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens_per_s": tps,
                    "mfu": flops_per_token * tps / peak, "mem_mb": telemetry.memory_mb(device),
                    "skipped_total": state.skipped_total, "time": time.time(),
                }  # fmt: skip
                tel.log(record)
                step_seconds, tokens_since_log = 0.0, 0
                shown = {"tok_s": tps, "mfu": record["mfu"]}
            tel.progress(plan.name, loss=result.loss, lr=lr, gnorm=result.grad_norm, **shown)
            if abort:
                raise abort

            if (
                val_readers
                and recipe.logging.val_interval
                and state.step % recipe.logging.val_interval == 0
                and not last_of_phase
            ):
                _validate(engine, val_readers, plan, state, tel, device, recipe)

            state.recent_losses = list(recent)
            if last_of_phase:
                break
            periodic = recipe.checkpoint.interval and state.step % recipe.checkpoint.interval == 0
            stopping = stop.agreed() or (stop_at_step is not None and state.step >= stop_at_step)
            if periodic or stopping:
                tag = save(plan, phase_end=False)
                tel.message(f"checkpoint {tag} committed")
            if stopping:
                tel.message(
                    f"stopping at step {state.step} (signal or --stop-at-step): exit {EXIT_REQUEUE} to requeue"
                )
                return EXIT_REQUEUE

        # phase end: validation, the phase-end checkpoint, the exported weights
        if val_readers:
            _validate(engine, val_readers, plan, state, tel, device, recipe)
        tag = save(plan, phase_end=True)
        tel.message(f"phase {plan.name} done: checkpoint {tag}")
        if rank == 0:
            export_phase(recipe, plan, ckpt_root, tag, run_dir, tel)
        torch.distributed.barrier()
        state.phase_index = plan.index + 1
        state.step_in_phase = 0
        state.data_position = {}
        if hasattr(engine, "destroy"):
            engine.destroy()
        engine = None
        if stop.agreed() or (stop_at_step is not None and state.step >= stop_at_step):
            if plan.index + 1 < len(plans):
                tel.message(f"stopping at the end of phase {plan.name}: exit {EXIT_REQUEUE} to requeue")
                return EXIT_REQUEUE
    # a run stopped between its last checkpoint and its last export (resumed with nothing left to train)
    last = plans[-1]
    if rank == 0 and not (run_dir / "export" / last.name).exists():
        export_phase(recipe, last, ckpt_root, checkpoint.tag_for(last.end_step), run_dir, tel)
    torch.distributed.barrier()
    return EXIT_OK


def _validate(engine, val_readers, plan, state, tel, device, recipe) -> None:
    losses = evaluate(
        engine,
        val_readers,
        plan.phase.seq_len,
        plan.phase.micro_batch_size,
        recipe.logging.val_tokens,
        device,
    )
    tel.log({"kind": "val", "phase": plan.name, "step": state.step, "losses": losses, "time": time.time()})
    tel.message(
        f"val step {state.step} ({plan.name}): " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
    )


def export_phase(recipe: Recipe, plan: PhasePlan, ckpt_root: Path, tag: str, run_dir: Path, tel) -> Path:
    """Rank 0: the phase's consolidated fp32 weights as a Hugging Face folder, RUN/export/<phase>/."""
    state_dict = consolidated_state_dict(ckpt_root, tag, recipe.deepspeed.zero_stage)
    out = export_hf(
        state_dict, plan.model_cfg, recipe.tokenizer.path, run_dir / "export" / plan.name,
        provenance={"recipe": recipe.name, "phase": plan.name, "checkpoint": tag, "recipe_hash": recipe_hash(recipe)},
    )  # fmt: skip
    tel.message(f"exported {plan.name} to {out}")
    return out


def print_summary(summary: dict) -> None:
    print(f"\n{'phase':<14} {'loss start → end':>22} {'tokens':>12} {'tokens/s':>10}", flush=True)
    for ph in summary["phases"]:
        print(f"{ph['name']:<14} {ph['loss_start']:>10.4f} → {ph['loss_end']:<9.4f} {ph['tokens']:>12,} "
              f"{ph['tokens_per_s']:>10,.0f}", flush=True)  # fmt: skip
