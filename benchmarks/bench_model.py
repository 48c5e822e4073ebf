"""Training step of our Transformer vs transformers' LlamaForCausalLM on CPU, side by side in one run.

Same config (~25M parameters: vocab 16384, d 384, 6 layers, 6 heads, 2 KV heads, SwiGLU 1024), same
weights (copied through model.hf.to_hf, logits and loss checked equal first), fp32, 2 threads, batch 8 x
seq 256, AdamW. Contestants alternate within each round and the order rotates every round; each figure
is a per-round paired ratio (median and min-max over rounds), because this machine is noisy and shared.
Times are reported twice: wall clock, and this process's CPU time (user + system over its threads),
which is less disturbed when other jobs compete for the cores.

Printed:
- step speed: HF step time / our step time (eager, and with ModelConfig.compile=True);
- "CPU MFU": model FLOP/s (flops_per_token x tokens / step time) / fp32 matmul FLOP/s, the matmul (a
  2048^3 fp32 matmul) timed in the same rounds;
- the ceiling: HF's step time / the time the model's FLOPs take at that matmul speed, i.e. how much
  faster than HF any implementation of the same maths could be on this machine (if every FLOP ran as
  fast as a large square matmul and nothing else took time);
- where one step's CPU time goes (torch.profiler self time): matmuls, the attention kernel, the rest
  (elementwise ops, the loss's softmax, the optimizer);
- peak memory: the rise of peak RSS during one training step (VmHWM reset through /proc/self/clear_refs,
  freed memory returned with malloc_trim first), ours / HF, each contestant measured in a fresh
  subprocess (same seed, same weights, 2 warm-up steps, median of 3 steps), so that one contestant's
  allocator history does not count against the other. Twice: with glibc's default malloc (whose dynamic
  mmap threshold keeps freed blocks resident, so the figure includes allocator slack), and with
  MALLOC_MMAP_THRESHOLD_=65536 (large tensors are mapped and unmapped, so RSS follows the live tensors);
- the loss alone at vocab 65024 (2048 tokens, d 384): fused chunked linear + cross-entropy vs the naive
  logits + F.cross_entropy, forward + backward, peak memory and time.

Run: `python benchmarks/bench_model.py [--rounds 5] [--steps 2] [--no-compile]` (a few minutes).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from model.hf import hf_config, to_hf  # noqa: E402
from model.llama import ModelConfig, Transformer, cross_entropy_reference, flops_per_token  # noqa: E402
from model.ops import linear_cross_entropy  # noqa: E402

CFG = ModelConfig(
    dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024, vocab_size=16384, max_seq_len=256
)
BATCH, SEQ = 8, 256
LIBC = ctypes.CDLL("libc.so.6")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_rss_rise_mib(fn: Callable[[], None]) -> float:
    """How far the process's resident memory rises above its starting point while fn runs."""
    gc.collect()
    LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


class Contestant:
    def __init__(self, name: str, model: torch.nn.Module, step_loss: Callable[[], torch.Tensor]):
        self.name, self.model, self.step_loss = name, model, step_loss
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step(self) -> torch.Tensor:
        loss = self.step_loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def build(compile_ours: bool, quiet: bool = False) -> tuple[list[Contestant], torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1))
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    ours = Transformer(CFG)
    d = hf_config(CFG, torch_dtype="float32")
    d.pop("architectures"), d.pop("model_type")
    hf = LlamaForCausalLM(LlamaConfig(**d, attn_implementation="sdpa"))
    hf.load_state_dict(to_hf(ours.state_dict(), CFG))
    hf.config.use_cache = False
    with torch.no_grad():  # same weights, same function: check before timing anything
        diff = (ours(inputs).logits - hf(inputs).logits).abs().max().item()
        loss_ours = ours(inputs, targets=targets).loss.item()
        loss_hf = hf(inputs, labels=targets, shift_labels=targets).loss.item()
    assert diff < 1e-4 and abs(loss_ours - loss_hf) < 1e-5, (diff, loss_ours, loss_hf)
    if not quiet:
        print(f"same weights: max |logits diff| {diff:.1e}, loss {loss_ours:.6f} vs {loss_hf:.6f}")
    contestants = [
        Contestant("ours", ours, lambda: ours(inputs, targets=targets).loss),
        # same inputs, same targets (shift_labels: already shifted, as ours)
        Contestant("hf", hf, lambda: hf(inputs, labels=targets, shift_labels=targets).loss),
    ]
    if compile_ours:
        compiled = Transformer(dataclasses.replace(CFG, compile=True))
        compiled.load_state_dict(ours.state_dict())
        contestants.append(
            Contestant("ours+compile", compiled, lambda: compiled(inputs, targets=targets).loss)
        )
    return contestants, ids


def time_matmul() -> tuple[float, float]:
    """fp32 matmul FLOP/s on this machine now (2048^3, best of 3): per wall second, per CPU second
    of this process (x threads: the comparable figure for a step's CPU time)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best_wall = best_cpu = float("inf")
    for _ in range(3):
        t, p = time.perf_counter(), time.process_time()
        a @ b
        best_wall, best_cpu = min(best_wall, time.perf_counter() - t), min(best_cpu, time.process_time() - p)
    return 2 * 2048**3 / best_wall, 2 * 2048**3 / best_cpu


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f}  [{min(values):.2f} - {max(values):.2f}]"


def loss_memory() -> dict[str, tuple[float, float]]:
    """Peak RSS rise (MiB) and time (s) of the loss alone, forward + backward, at vocab 65024."""
    V, N, D = 65024, BATCH * SEQ, CFG.dim
    torch.manual_seed(0)
    w = (torch.randn(V, D) * 0.02).requires_grad_(True)
    h = torch.randn(N, D).requires_grad_(True)
    t = torch.randint(0, V, (N,))
    fns = {
        "fused": lambda: linear_cross_entropy(h, w, t, "torch").backward(),
        "naive": lambda: cross_entropy_reference(h, w, t).backward(),
    }
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for r in range(3):
        for name in list(fns)[r % 2 :] + list(fns)[: r % 2]:
            w.grad = h.grad = None
            start = time.perf_counter()
            mib = peak_rss_rise_mib(fns[name])
            out[name].append((mib, time.perf_counter() - start))
    return {
        k: (statistics.median(m for m, _ in v), statistics.median(s for _, s in v)) for k, v in out.items()
    }


ALLOCATORS = {"default malloc": {}, "mmap >= 64 KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def memory_child(name: str) -> None:
    """Run in a fresh subprocess: peak RSS rise (MiB) of one step of contestant `name`, median of 3."""
    contestants, _ = build(compile_ours=name == "ours+compile", quiet=True)
    (c,) = [c for c in contestants if c.name == name]
    del contestants
    c.step()
    c.step()
    print(statistics.median(peak_rss_rise_mib(c.step) for _ in range(3)))


def step_memory(names: list[str]) -> dict[str, dict[str, float]]:
    """{allocator: {contestant: peak RSS rise MiB}}, each contestant in its own fresh process."""
    out: dict[str, dict[str, float]] = {a: {} for a in ALLOCATORS}
    for i, (alloc, env) in enumerate(ALLOCATORS.items()):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            run = subprocess.run(
                [sys.executable, __file__, "--memory-child", name],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            )
            out[alloc][name] = float(run.stdout.strip().splitlines()[-1])
    return out


def time_breakdown(contestants: list[Contestant]) -> dict[str, dict[str, float]]:
    """Seconds per step in matmuls, in the attention kernel and in everything else, from one profiled
    step per contestant (torch.profiler self CPU time, divided by the threads that ran it)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for c in contestants:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            c.step()
        parts = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
        for e in prof.key_averages():
            key = e.key
            part = "matmul" if key in MATMUL_OPS else "attention" if "scaled_dot_product" in key else "other"
            parts[part] += e.self_cpu_time_total / 1e6
        total = sum(parts.values())
        out[c.name] = {k: v / total for k, v in parts.items()}
    return out


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul"}


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per contestant per round")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contestant")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: one contestant's memory
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    print(f"start: {load()}")
    n_params = sum(p.numel() for p in Transformer(CFG).parameters())
    print(f"config: {n_params / 1e6:.1f}M params, batch {BATCH} x seq {SEQ}, fp32, 2 threads, AdamW")

    contestants, _ = build(compile_ours=not args.no_compile)
    first_loss = {}
    for c in contestants:  # warm-up: allocator, optimizer state, compilation
        t = time.perf_counter()
        first_loss[c.name] = c.step().item()  # same weights everywhere before this first update
        c.step()
        print(f"warm-up {c.name}: {time.perf_counter() - t:.1f} s, first-step loss {first_loss[c.name]:.6f}")
    spread = max(first_loss.values()) - min(first_loss.values())
    assert spread < 1e-4, f"contestants disagree before timing: {first_loss}"

    flops_per_step = flops_per_token(CFG, SEQ) * BATCH * SEQ
    wall: dict[str, list[float]] = {c.name: [] for c in contestants}
    cpu: dict[str, list[float]] = {c.name: [] for c in contestants}
    matmul_wall: list[float] = []
    matmul_cpu: list[float] = []
    for r in range(args.rounds):
        order = contestants[r % len(contestants) :] + contestants[: r % len(contestants)]
        flops, flops_cpu = time_matmul()
        matmul_wall.append(flops)
        matmul_cpu.append(flops_cpu)
        for c in order:
            t, p = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                c.step()
            wall[c.name].append((time.perf_counter() - t) / args.steps)
            cpu[c.name].append((time.process_time() - p) / args.steps)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in wall.items()) + f"; {load()}")

    breakdown = time_breakdown(contestants)
    names = [c.name for c in contestants]
    del contestants
    gc.collect()
    memory = step_memory(names)
    loss_mem = loss_memory()
    print(f"end: {load()}")

    rows = []
    for clock, times, mm in (("wall", wall, matmul_wall), ("cpu", cpu, matmul_cpu)):
        for name, goal in (("ours", "goal >= 1.3"), ("ours+compile", "stretch 1.5")):
            if name in times:
                ratios = [h / o for h, o in zip(times["hf"], times[name])]
                rows.append((f"step speed hf / {name} ({clock} time)", ratios, goal))
        for name in times:
            mfu = [flops_per_step / t / m for t, m in zip(times[name], mm)]
            rows.append(
                (f"model / matmul FLOP/s: {name} ({clock})", mfu, "goal >= 0.7" if name != "hf" else "")
            )
    print()
    print(f"{'measure (per-round ratios)':<58} {'median  [min - max]':<22} goal")
    for label, values, goal in rows:
        print(f"{label:<58} {summary(values):<22} {goal}")
    for alloc, mem in memory.items():
        for name in ("ours", "ours+compile"):
            if name in mem:
                label = f"peak step memory {name} / hf ({alloc})"
                m, h = mem[name], mem["hf"]
                print(f"{label:<58} {m / h:6.2f}  ({m:.0f} vs {h:.0f} MiB)  goal <= 0.6")
    (fm, ft), (nm, nt) = loss_mem["fused"], loss_mem["naive"]
    print(f"{'loss V=65024: memory fused / naive':<58} {fm / nm:6.2f}  ({fm:.0f} vs {nm:.0f} MiB)")
    print(f"{'loss V=65024: time naive / fused':<58} {nt / ft:6.2f}  ({nt:.2f} vs {ft:.2f} s)")
    # A model running every FLOP at the matmul's speed would be 1 / (hf's ratio) times faster than hf:
    # the most any implementation of the same maths can gain here.
    ceiling = [mm / (flops_per_step / h) for h, mm in zip(wall["hf"], matmul_wall)]
    print(f"{'ceiling: hf step / (model FLOPs at matmul FLOP/s) (wall)':<58} {summary(ceiling)}")
    print("\nshare of one step's CPU time (torch.profiler):  matmul  attention  other")
    for name, parts in breakdown.items():
        print(f"  {name:<45} {parts['matmul']:6.0%}  {parts['attention']:9.0%}  {parts['other']:5.0%}")
    print(
        f"matmul fp32 2048^3: {statistics.median(matmul_wall) / 1e9:.0f} GFLOP/s wall, "
        f"{statistics.median(matmul_cpu) / 1e9:.0f} per CPU-second (medians over rounds)"
    )


if __name__ == "__main__":
    main()
