"""GPU check of the model: fast paths vs reference on the device, then MFU per size.

1. Correctness: for each attention backend (sdpa, flash when importable) x kernels (torch, liger when
   installed) x (one document per row, packed documents), a small model's loss and gradients against
   the reference model (plain maths, fp32) with the same weights.
2. Throughput: for each size (default 125m, 350m, 1b), bf16 weights, seq 2048, AdamW, the best settings
   available (attention auto, kernels auto), eager and torch.compile'd; tokens/s and
   MFU = flops_per_token(cfg, seq) x tokens/s / peak (989 TFLOP/s: H100 SXM dense bf16).

Writes OUT/gpu_check.json and OUT/gpu_check.md (the table, also printed). Runs on CPU too (small
settings, for the tests): `python benchmarks/gpu_check.py --out DIR --device cpu --sizes tiny ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model import ops  # noqa: E402
from model.llama import SIZES, ModelConfig, Transformer, flops_per_token  # noqa: E402

H100_BF16_PEAK = 989e12


def correctness_rows(device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Fast paths (in `dtype`) vs the reference model (fp32) on one small batch."""
    cfg = ModelConfig(
        dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=1000, max_seq_len=512
    )
    torch.manual_seed(0)
    ref = Transformer(dataclasses.replace(cfg, attention="reference", kernels="reference")).to(device)
    B, T = 2, 512 if device.type == "cuda" else 64
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    cut = T // 3
    pos = torch.cat([torch.arange(cut), torch.arange(T - cut)]).to(device).expand(B, T).clone()
    pos[1] = torch.cat([torch.arange(10) + 5, torch.arange(T - 10)]).to(device)  # row 1 starts mid-document
    have = ops.available()
    attentions = ["sdpa"] + (
        ["flash"] if device.type == "cuda" and have["flash_attn"] and dtype != torch.float32 else []
    )
    kernels = ["torch"] + (["liger"] if device.type == "cuda" and have["liger_kernel"] else [])
    rows = []
    for packed in (False, True):
        p = pos if packed else None
        ref.zero_grad(set_to_none=True)
        loss_ref = ref(inputs, p, targets).loss
        loss_ref.backward()
        ref_grads = {n: q.grad.float() for n, q in ref.named_parameters()}
        for attention in attentions:
            for kern in kernels:
                fast = Transformer(dataclasses.replace(cfg, attention=attention, kernels=kern)).to(device)
                fast.load_state_dict(ref.state_dict())
                fast.to(dtype)
                loss = fast(inputs, p, targets).loss
                loss.backward()
                worst_cos = min(
                    torch.nn.functional.cosine_similarity(
                        q.grad.float().flatten(), ref_grads[n].flatten(), dim=0
                    ).item()
                    for n, q in fast.named_parameters()
                )
                loss_diff = abs(loss.item() - loss_ref.item())
                tol = 1e-4 if dtype == torch.float32 else 5e-2
                ok = loss_diff <= tol and worst_cos >= (0.9999 if dtype == torch.float32 else 0.99)
                rows.append(
                    dict(
                        check=f"attention={attention} kernels={kern} {'packed' if packed else 'causal'}",
                        loss_abs_diff=loss_diff,
                        worst_grad_cosine=worst_cos,
                        ok=ok,
                    )
                )
    for name, available in (("flash-attn", have["flash_attn"]), ("liger-kernel", have["liger_kernel"])):
        if not available:
            rows.append(dict(check=f"{name} not installed: its paths not checked", ok=True))
    return rows


def throughput_row(
    size: str,
    device: torch.device,
    dtype: torch.dtype,
    seq: int,
    batch: int,
    steps: int,
    warmup: int,
    compile_: bool,
) -> dict:
    cfg = dataclasses.replace(SIZES[size], max_seq_len=seq, compile=compile_)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    while True:
        try:
            with torch.device(device):  # initialise on the device (a 1B model's init on CPU takes long)
                model = Transformer(cfg).to(dtype)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

            t0 = time.perf_counter()
            train_steps(model, opt, ids, warmup)
            sync(device)
            warm_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            train_steps(model, opt, ids, steps)
            sync(device)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            model = opt = ids = None  # free before retrying smaller
            torch.cuda.empty_cache()
            batch //= 2
    step_s = (time.perf_counter() - t0) / steps
    tokens_s = batch * seq / step_s
    flops = flops_per_token(cfg, seq) * tokens_s
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return dict(
        size=size,
        params=model.num_params(),
        compile=compile_,
        batch=batch,
        seq=seq,
        step_s=step_s,
        warmup_s=warm_s,
        tokens_per_s=tokens_s,
        tflops=flops / 1e12,
        mfu=flops / H100_BF16_PEAK,
        peak_mem_gib=peak_mem,
        attention=ops.resolve_attention(cfg.attention, device, dtype),
        kernels="liger" if device.type == "cuda" and ops.available()["liger_kernel"] else "torch",
    )


def train_steps(model: Transformer, opt: torch.optim.Optimizer, ids: torch.Tensor, n: int) -> None:
    for _ in range(n):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def render(env: dict, checks: list[dict], runs: list[dict]) -> str:
    lines = ["# GPU check", "", "```", json.dumps(env, indent=1), "```", "", "## Fast paths vs reference", ""]
    lines += ["| check | loss abs diff | worst grad cosine | ok |", "|---|---|---|---|"]
    for r in checks:
        diff = f"{r['loss_abs_diff']:.2e}" if "loss_abs_diff" in r else ""
        cos = f"{r['worst_grad_cosine']:.6f}" if "worst_grad_cosine" in r else ""
        lines.append(f"| {r['check']} | {diff} | {cos} | {'yes' if r['ok'] else 'NO'} |")
    lines += ["", "## Throughput (MFU against 989 TFLOP/s)", ""]
    lines += [
        "| size | params | compile | attention | kernels | batch x seq | step s | tokens/s | TFLOP/s | MFU | peak GiB |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['size']} | | {r['compile']} | error: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['compile']} | {r['attention']} | {r['kernels']} | "
            f"{r['batch']} x {r['seq']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | "
            f"{100 * r['mfu']:.1f}% | {r['peak_mem_gib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="125m,350m,1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="micro-batch (halved on out-of-memory)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="eager only (no torch.compile runs)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no run after this many seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        dtype=str(dtype),
        available=ops.available(),
    )
    started = time.perf_counter()
    checks = correctness_rows(device, dtype)
    runs: list[dict] = []
    # every size eager first, then compiled: the most important numbers come first if time runs out
    for compile_ in (False,) if args.no_compile else (False, True):
        for size in args.sizes.split(","):
            if time.perf_counter() - started > args.budget_s:
                runs.append(
                    dict(size=size, compile=compile_, error=f"skipped: over --budget-s {args.budget_s:.0f}")
                )
                continue
            try:
                runs.append(
                    throughput_row(
                        size, device, dtype, args.seq, args.batch, args.steps, args.warmup, compile_
                    )
                )
            except Exception as e:  # noqa: BLE001  (one failed run must not hide the others' results)
                runs.append(dict(size=size, compile=compile_, error=f"{type(e).__name__}: {e}"[:200]))
            (args.out / "gpu_check.json").write_text(
                json.dumps(dict(env=env, checks=checks, runs=runs), indent=1)
            )
    (args.out / "gpu_check.json").write_text(json.dumps(dict(env=env, checks=checks, runs=runs), indent=1))
    table = render(env, checks, runs)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    return 0 if all(r["ok"] for r in checks) and not any("error" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
