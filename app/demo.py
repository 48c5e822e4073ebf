"""`communs demo`: the whole pipeline on the embedded corpus, on CPU, in a few minutes.

prepare the corpus (filters, PII, dedup, opt-out, licences) → train the tokenizer → pack shards and
write the data manifest → train the tiny model through three phases (pretrain → maths → education
SFT) under DeepSpeed with 2 processes → export safetensors at each phase end → answer a question.
Every stage is the real one a GPU run uses; only the sizes are small.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from app.cli import main as communs_main
from common.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
# Worded like the education phase's tutoring dialogues, with the answer the model should reach.
SAMPLE_QUESTIONS = {
    "Peux-tu m'expliquer comment faire ce calcul ? Calcule 23 + 45.": "68",
    "Bonjour ! Mon professeur m'a donné cet exercice : Calcule 12 × 4. Comment on fait ?": "48",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded corpus (CPU, ~10 min)")
    p.add_argument("--out", default="runs/demo", help="where the data and the run go (default: runs/demo)")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"))
    p.add_argument("--sources", default=str(ROOT / "data" / "demo" / "sources.yaml"))
    p.add_argument("--nproc", type=int, default=2, help="DeepSpeed processes (default 2)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("WANDB_MODE", "offline")
    out = Path(args.out)
    data_dir, run_dir = out / "data", out / "run"
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    _banner("1/3 data: curate the corpus, train the tokenizer, pack shards, write the manifest")
    rc = communs_main(["data", "prepare", args.sources, "--out", str(data_dir)])
    if rc:
        return rc
    timings["data"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    _banner("2/3 train: three phases under DeepSpeed")
    overrides = [
        f"data.manifest={data_dir / 'manifest.json'}",
        f"tokenizer.path={data_dir / 'tokenizer' / 'tokenizer.model'}",
        *args.overrides,
    ]
    rc = communs_main(
        ["train", args.recipe, *overrides, "--run-dir", str(run_dir), "--nproc", str(args.nproc)]
    )
    if rc:
        return rc
    timings["train"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    _banner("3/3 answer: the exported model answers a question")
    summary = json.loads((run_dir / "summary.json").read_text())
    export_dir = run_dir / "export" / summary["phases"][-1]["name"]
    if not (export_dir / "model.safetensors").exists():
        raise UserError(f"{export_dir}: the last phase left no exported model")
    # torch is imported here, not at module load: `communs --help` imports every command module.
    from eval.generation import answer, load_model
    from eval.maths import is_correct

    model, tok = load_model(export_dir)
    answers = answer(model, tok, list(SAMPLE_QUESTIONS), max_new_tokens=96)
    for (q, expected), a in zip(SAMPLE_QUESTIONS.items(), answers):
        verdict = "right" if is_correct(a, expected) else f"wrong, expected {expected}"
        print(f"  Q: {q}\n  A: {a.strip()}\n     ({verdict})")
    timings["answer"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0

    _banner("summary")
    print(f"  {'phase':<12} {'loss start → end':>20} {'tokens':>10} {'tokens/s':>10}")
    for ph in summary["phases"]:
        print(
            f"  {ph['name']:<12} {ph['loss_start']:>9.3f} → {ph['loss_end']:<8.3f} "
            f"{ph['tokens']:>10,} {ph['tokens_per_s']:>10,.0f}"
        )
    print("  time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"  data manifest: {data_dir / 'manifest.json'}")
    print(f"  run directory: {run_dir}")
    print(f"  exported model: {export_dir}  (AutoModelForCausalLM.from_pretrained works on it)")
    (out / "demo.json").write_text(
        json.dumps(
            {"timings_s": timings, "answers": dict(zip(SAMPLE_QUESTIONS, answers))},
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    return 0


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)
