from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np

from corpus.dedup import find_duplicates, shingle_hashes, signature
from corpus.generators import PROBLEMS, generate, gsm8k_worked_answer

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"
NOVEL = (DEMO / "nouvelles19" / "txt" / "nd0004.txt").read_text(encoding="utf-8")


def _jaccard(a: str, b: str, size: int = 5) -> float:
    sa, sb = set(shingle_hashes(a, size).tolist()), set(shingle_hashes(b, size).tolist())
    return len(sa & sb) / len(sa | sb)


def test_minhash_estimates_jaccard():
    a = NOVEL[10000:14000]
    words = a.split()
    b = " ".join(words[:-20] + ["autre"] * 20)  # the same text with its end changed
    est = np.mean(signature(a, 256, 5) == signature(b, 256, 5))
    assert abs(est - _jaccard(a, b)) < 0.08
    assert signature(a, 128, 5).tolist() == signature(a, 128, 5).tolist()  # deterministic


def test_exact_and_near_duplicates_name_the_first_document():
    base = NOVEL[20000:24000]
    near = base.replace("la", "le", 2)
    other = NOVEL[40000:44000]
    texts = {"a": base, "b": other, "c": base, "d": near}
    import hashlib

    items = [(k, hashlib.sha256(t.encode()).hexdigest(), signature(t, 128, 5)) for k, t in texts.items()]
    assert _jaccard(base, near) > 0.8
    assert find_duplicates(items, 0.8, 128) == {2: ("dedup.exact", "a"), 3: ("dedup.near", "a")}
    # Near-dedup off for an item (no signature): only its exact duplicate goes.
    items[3] = ("d", items[3][1], None)
    assert find_duplicates(items, 0.8, 128) == {2: ("dedup.exact", "a")}


def _answer_of(statement: str) -> int:
    """Recompute a generated problem's answer from its statement alone."""
    s = statement.replace("\u202f", "").replace("×", "*").replace("−", "-")
    if m := re.match(r"Calcule (\d+) % de (\d+)\.", s):
        return int(m[1]) * int(m[2]) // 100
    if m := re.match(r"Effectue la division euclidienne de (\d+) par (\d+)\.", s):
        return int(m[1]) // int(m[2])
    if m := re.match(r"Calcule ([\d+\-* ()]+)\.", s):
        return eval(m[1], {"__builtins__": {}})  # digits and operators only (matched above)
    m = re.match(r".* achète (\d+) \w+ à (\d+) € l'un et un \w+ à (\d+) €\. .* billet de (\d+) €", s)
    return int(m[4]) - (int(m[1]) * int(m[2]) + int(m[3]))


def test_every_generated_problem_has_the_right_answer():
    rng = random.Random(0)
    for _ in range(300):
        for make in PROBLEMS:
            statement, steps, answer = make(rng)
            assert answer == _answer_of(statement), statement
            assert steps


class _Src:
    def __init__(self, generator, params, kind="text"):
        self.id, self.generator, self.params, self.kind = "gen", generator, params, kind


def test_generators_are_seeded_and_gsm8k_answers_are_kept(tmp_path):
    src = _Src("arithmetic", {"n_docs": 5, "problems_per_doc": 2, "seed": 3})
    first, again = list(generate(src, DEMO)), list(generate(src, DEMO))
    assert first == again and len(first) == 5 and first[0][1].startswith("Exercice 1. ")
    assert list(generate(_Src("arithmetic", {**src.params, "seed": 4}), DEMO)) != first
    chat = list(
        generate(
            _Src(
                "edu_chat",
                {"n_arithmetic": 2, "gsm8k": "gsm8k/train-excerpt.jsonl", "n_gsm8k": 3, "seed": 0},
                "chat",
            ),
            DEMO,
        )
    )
    assert len(chat) == 5 and all([m["role"] for m in msgs] == ["user", "assistant"] for _, msgs, _ in chat)
    records = [json.loads(line) for line in (DEMO / "gsm8k" / "train-excerpt.jsonl").open()]
    for doc_id, msgs, _ in chat[2:]:
        lineno = int(doc_id.rsplit(":", 1)[1])
        record = records[lineno - 1]
        assert record["question"] in msgs[0]["content"]
        assert msgs[1]["content"].endswith(
            f"La réponse est donc {record['answer'].split('####')[1].strip()}."
        )
        assert "<<" not in msgs[1]["content"]
    lines, final = gsm8k_worked_answer("He has 3+4 = <<3+4=7>>7 apples.\n#### 7")
    assert (lines, final) == (["He has 3+4 = 7 apples."], "7")
