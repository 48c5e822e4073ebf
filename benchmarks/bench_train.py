"""What the train package costs on top of plain PyTorch, on CPU, measured side by side.

    step        train.loop.train_step through DeepSpeed (ZeRO 1, one process, gloo; torch AdamW, clipping,
                token-weighted loss, non-finite check) vs a plain PyTorch step (forward, backward, clipping,
                AdamW) on the same model (the demo's), same weights and same batch (2 micro-batches of 8 x 256)
    data        a step's micro-batches from train.mixture.step_slots + PackedReader windows vs one
                PackedReader.batch gather of the same windows
    checkpoint  DeepSpeed save_checkpoint + our commit (client.json, sha256 of every file, fsync, rename,
                `latest`) vs DeepSpeed save_checkpoint alone

Each round runs both contestants, alternating which goes first; the table gives the median of the
per-round time ratios (ours / plain) and their spread. Run: `python benchmarks/bench_train.py`.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

ROUNDS = 9
TIMES: list[dict[str, list[float]]] = []  # per contest, per contestant: seconds of each round

RECIPE = """
name: bench
model: {{size: tiny, overrides: {{dim: 128, n_layers: 4, n_heads: 4, n_kv_heads: 2, ffn_dim: 384, vocab_size: 8192,
                                 tie_embeddings: true}}}}
tokenizer: {{path: unused}}
data: {{manifest: {manifest}}}
deepspeed: {{zero_stage: 1}}
phases:
  - {{name: p, mixture: {{a: 0.6, b: 0.4}}, tokens: 1M, seq_len: 256, batch_tokens: 4096, micro_batch_size: 8,
     lr: {{peak: 1.0e-3}}}}
"""


def make_data(tmp: Path) -> Path:
    from corpus.manifest import write_manifest
    from corpus.shards import sha256_file, write_shard

    rng = np.random.default_rng(0)
    sources = {}
    for src in ("a", "b"):
        docs = [np.concatenate([[1], rng.integers(4, 8192, rng.integers(50, 2000)), [2]]) for _ in range(400)]
        rel = f"shards/{src}/train/00000"
        rec = write_shard(tmp / rel, docs)
        shard = {"path": rel, "n_docs": rec["n_docs"], "n_tokens": rec["n_tokens"], "has_mask": False,
                 "sha256": sha256_file(f"{tmp / rel}.json")}  # fmt: skip
        sources[src] = {"kind": "text", "splits": {"train": {"n_docs": rec["n_docs"], "n_tokens": rec["n_tokens"],
                                                             "shards": [shard]}}}  # fmt: skip
    path = tmp / "manifest.json"
    write_manifest({"tokenizer": {}, "sources": sources}, path)
    return path


def rounds(ours, plain, n: int = ROUNDS) -> list[float]:
    ratios = []
    TIMES.append({"ours": [], "plain": []})
    for r in range(n):
        times = {}
        for name, fn in (
            (("ours", ours), ("plain", plain)) if r % 2 == 0 else (("plain", plain), ("ours", ours))
        ):
            t0 = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t0
            TIMES[-1][name].append(times[name])
        ratios.append(times["ours"] / times["plain"])
    return ratios


def main() -> None:
    from corpus.loader import PackedReader
    from corpus.manifest import load_manifest, shard_prefixes
    from train import checkpoint, loop, mixture
    from train.recipe import load_recipe, plan_phases

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        manifest_path = make_data(tmp)
        (tmp / "r.yaml").write_text(RECIPE.format(manifest=manifest_path))
        recipe = load_recipe(tmp / "r.yaml")
        plan = plan_phases(recipe, 1)[0]
        loop.init_distributed(10)
        engine = loop.build_engine(recipe, plan, 1)
        manifest = load_manifest(manifest_path)
        readers = {
            s: PackedReader(shard_prefixes(manifest, manifest_path, s, "train"), 256) for s in ("a", "b")
        }
        n_windows = {s: len(r) for s, r in readers.items()}
        position: dict[str, int] = {}
        step = [0]

        def batches():
            slots = mixture.step_slots(
                position, plan.weights, n_windows, plan.seqs_per_step, 0, "h", "p", step[0]
            )
            step[0] += 1
            return slots, loop.rank_micro_batches(slots, readers, 0, 1, 8, torch.device("cpu"))

        # --- step: the same weights in a plain model + AdamW
        from model.llama import Transformer

        plain_model = Transformer(plan.model_cfg)
        plain_model.load_state_dict(engine.module.state_dict())
        decay = [p for p in plain_model.parameters() if p.ndim >= 2]
        no_decay = [p for p in plain_model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95))  # fmt: skip
        _, fixed = batches()

        def ours_step():
            loop.train_step(engine, fixed, 1e-3, 1)

        def plain_step():
            for mb in fixed:
                out = plain_model(mb.input_ids, position_ids=mb.position_ids, targets=mb.targets)
                (out.loss / len(fixed)).backward()
            torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        ours_step(), plain_step()  # warm-up
        results = {"step": rounds(ours_step, plain_step)}

        # --- data
        def ours_data():
            for _ in range(20):
                batches()

        def plain_data():
            rng = np.random.default_rng(step[0])
            for _ in range(20):
                for r in readers.values():
                    r.batch(rng.integers(0, len(r), 8))

        results["data"] = rounds(ours_data, plain_data)

        # --- checkpoint
        ck_root = tmp / "ckpt"

        def ours_ckpt():
            tag = checkpoint.tag_for(step[0])
            step[0] += 1
            name = checkpoint.prepare_tmp(ck_root, tag)
            engine.save_checkpoint(str(ck_root), tag=name, save_latest=False)
            checkpoint.save_rng(ck_root / name, 0)
            checkpoint.commit(ck_root, tag, {"step": step[0]})
            checkpoint.prune(ck_root, 1, False)

        def plain_ckpt():
            shutil.rmtree(ck_root / "plain", ignore_errors=True)
            engine.save_checkpoint(str(ck_root), tag="plain", save_latest=False)

        ours_ckpt(), plain_ckpt()
        results["checkpoint"] = rounds(ours_ckpt, plain_ckpt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nbench_train ({ROUNDS} rounds, alternated; ratio = ours / plain time, lower is better)")
    print(f"{'contest':<12} {'median ratio':>13} {'spread (min-max)':>18} {'ours ms':>9} {'plain ms':>9}")
    for (name, ratios), times in zip(results.items(), TIMES):
        ours_ms, plain_ms = (1000 * statistics.median(times[k]) for k in ("ours", "plain"))
        print(
            f"{name:<12} {statistics.median(ratios):>13.3f} {min(ratios):>8.3f} - {max(ratios):<8.3f} "
            f"{ours_ms:>9.1f} {plain_ms:>9.1f}"
        )
    print("(data: ms for 20 steps of 16 windows; step: one step of 2 x 8 x 256 tokens; checkpoint: one save)")
    os._exit(0)  # skip DeepSpeed / gloo teardown


if __name__ == "__main__":
    main()
