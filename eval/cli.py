"""`communs generate` (answer prompts with an exported model) and `communs eval` (local lm-eval tasks,
or maths accuracy on a question/answer file)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from common.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="answer prompts with an exported model")
    g.add_argument("model", help="an export folder (RUN/export/<phase>)")
    g.add_argument("prompts", nargs="+", help="one or more prompts")
    g.add_argument("--plain", action="store_true", help="continue raw text instead of a chat turn")
    g.add_argument("--system", help="a system message for chat prompts")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_generate)

    e = sub.add_parser(
        "eval",
        help="evaluate an exported model: local lm-eval tasks (--tasks) or maths accuracy on a jsonl file (--data)",
    )
    e.add_argument("model", help="an export folder (RUN/export/<phase>)")
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--tasks", help="comma-separated local lm-eval tasks (eval/tasks/), e.g. communs_maths_fr"
    )
    what.add_argument("--data", help='jsonl with {"question", "answer"} (GSM8K format): maths accuracy')
    e.add_argument("--limit", type=int, help="first N documents per task / questions (default: all / 50)")
    e.add_argument("--max-new-tokens", type=int, default=128, help="with --data")
    e.add_argument("--out", help="write the results here (JSON)")
    e.set_defaults(func=_eval)


def _generate(args: argparse.Namespace) -> int:
    from eval.generation import answer, load_model

    model, tok = load_model(args.model)
    outs = answer(
        model,
        tok,
        args.prompts,
        chat=not args.plain,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    for prompt, out in zip(args.prompts, outs):
        print(f"> {prompt}\n{out}\n")
    return 0


def read_qa(path: str | os.PathLike, limit: int) -> list[dict]:
    """The first `limit` question/answer records of a jsonl file, with file:line errors."""
    from common.io import iter_jsonl

    records = []
    for n, rec in iter_jsonl(path):
        if len(records) >= limit:
            break
        if not isinstance(rec, dict) or "question" not in rec or "answer" not in rec:
            raise UserError(f'{path}:{n}: expected an object with "question" and "answer"')
        records.append(rec)
    if not records:
        raise UserError(f"{path}: no questions")
    return records


def _eval(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        from eval.lm_harness import run_tasks

        run_tasks(args.model, [t.strip() for t in args.tasks.split(",") if t.strip()], args.limit, args.out)
        return 0
    from eval.generation import answer, load_model
    from eval.maths import is_correct

    records = read_qa(args.data, 50 if args.limit is None else args.limit)
    model, tok = load_model(args.model)
    outs = answer(model, tok, [r["question"] for r in records], max_new_tokens=args.max_new_tokens)
    rows = [
        {
            "question": r["question"],
            "reference": r["answer"],
            "output": o,
            "correct": is_correct(o, r["answer"]),
        }
        for r, o in zip(records, outs)
    ]
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    print(f"maths accuracy: {accuracy:.3f} ({sum(r['correct'] for r in rows)}/{len(rows)})")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(
                {"accuracy": accuracy, "n": len(rows), "results": rows}, f, indent=1, ensure_ascii=False
            )
        os.replace(tmp, out)
    return 0
