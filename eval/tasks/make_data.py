"""Build the local lm-eval tasks' data (eval/tasks/data/*.jsonl) deterministically from the repo.

    python -m eval.tasks.make_data [--roman19 DIR] [--out eval/tasks/data]

- maths_fr.jsonl: generated French arithmetic problems (corpus.generators) under a source id of
  their own, keeping only statements that no training source of data/demo/sources.yaml generates.
- arith_choice_fr.jsonl: the same kind of problems as 4-way multiple choice (3 near-miss answers).
- ppl_fr.jsonl: the first paragraphs of Alphonse Daudet, *Le Petit Chose* (1868), public domain,
  from the CLiGS textbox roman19 collection (not in the demo corpus; see data/README.md).

Same inputs → identical bytes (tests/eval/test_lm_harness.py checks it).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from corpus.generators import arithmetic_problem, generate
from corpus.sources import load_sources

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
ROMAN19 = Path("/work/shared/data/fr-public-domain/roman19/txt")
PPL_NOVEL = "Daudet_PetitChose-rd0020.txt"
N_MATHS, N_CHOICE, N_PARAGRAPHS, MIN_PARAGRAPH_CHARS = 50, 50, 20, 300


def _fmt(n: int) -> str:
    """French thousands grouping with a narrow no-break space, as the generated documents write it."""
    return f"{n:,}".replace(",", "\u202f")


def training_text(sources_yaml: Path = ROOT / "data" / "demo" / "sources.yaml") -> str:
    """Everything the demo's generator sources produce, to keep the evaluation problems out of it."""
    sources = load_sources(sources_yaml)
    parts = []
    for source in sources.sources:
        if source.generator:
            for _, doc, _ in generate(source, sources_yaml.parent):
                parts.append(doc if isinstance(doc, str) else "\n".join(m["content"] for m in doc))
    return "\n".join(parts)


def held_out_problems(task: str, n: int, seen: str) -> list[tuple[random.Random, str, list[str], int]]:
    """n problems whose statement appears neither in `seen` nor twice, each with its own rng."""
    problems, statements, i = [], set(), 0
    while len(problems) < n:
        rng = random.Random(f"{task}:{i}")  # str seeds are hashed with SHA-512: stable across runs
        statement, steps, answer = arithmetic_problem(rng)
        i += 1
        if statement in statements or statement in seen:
            continue
        statements.add(statement)
        problems.append((rng, statement, steps, answer))
    return problems


def maths_records(seen: str) -> list[dict]:
    return [
        {
            "id": f"communs_maths_fr:{k:03d}",
            "question": statement,
            "solution": "\n".join(f"- {s}" for s in steps),
            "answer": _fmt(answer),
        }
        for k, (_, statement, steps, answer) in enumerate(
            held_out_problems("communs_maths_fr", N_MATHS, seen)
        )
    ]


def choice_records(seen: str) -> list[dict]:
    records = []
    for k, (rng, statement, _, answer) in enumerate(
        held_out_problems("communs_arith_choice_fr", N_CHOICE, seen)
    ):
        # Near misses a careless calculation gives: off by one, by a carry, by a place value.
        offsets = rng.sample([d for d in (-100, -10, -2, -1, 1, 2, 10, 100) if answer + d >= 0], 3)
        options = [answer] + [answer + d for d in offsets]
        rng.shuffle(options)
        records.append(
            {
                "id": f"communs_arith_choice_fr:{k:03d}",
                "question": statement,
                "choices": [_fmt(o) for o in options],
                "label": options.index(answer),
            }
        )
    return records


def ppl_records(roman19: Path) -> list[dict]:
    path = roman19 / PPL_NOVEL
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n")]
    paragraphs = [p for p in paragraphs if len(p) >= MIN_PARAGRAPH_CHARS][:N_PARAGRAPHS]
    return [{"id": f"{PPL_NOVEL.removesuffix('.txt')}:{k:02d}", "text": p} for k, p in enumerate(paragraphs)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


def make_data(out: Path = DATA, roman19: Path | None = ROMAN19) -> list[Path]:
    """Write the data files into `out` (ppl_fr.jsonl only when `roman19` is given); return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    seen = training_text()
    files = {"maths_fr.jsonl": maths_records(seen), "arith_choice_fr.jsonl": choice_records(seen)}
    if roman19 is not None:
        files["ppl_fr.jsonl"] = ppl_records(roman19)
    for name, records in files.items():
        write_jsonl(out / name, records)
    return [out / name for name in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--roman19", type=Path, default=ROMAN19, help="the roman19 txt/ folder")
    parser.add_argument("--out", type=Path, default=DATA)
    args = parser.parse_args()
    for path in make_data(args.out, args.roman19):
        print(path)


if __name__ == "__main__":
    main()
