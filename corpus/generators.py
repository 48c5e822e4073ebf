"""Sources the project generates itself, seeded (same params → same documents), in French.

- `arithmetic`: worked arithmetic, step by step (column addition and subtraction with carries,
  multiplication by place value, Euclidean division, order of operations, percentages, short word
  problems), for the maths phase. Params: n_docs, problems_per_doc, seed.
- `edu_chat`: educational question/answer dialogues as chat `messages` (user asks, assistant
  explains), built from generated arithmetic and from GSM8K *train* problems (worked answers,
  calculator annotations removed), for the education SFT phase.
  Params: n_arithmetic, gsm8k (a JSON Lines file relative to the sources file, or null), n_gsm8k, seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from common.errors import UserError

PARAMS = {
    "arithmetic": {"n_docs": 1000, "problems_per_doc": 3, "seed": 0},
    "edu_chat": {"n_arithmetic": 500, "gsm8k": None, "n_gsm8k": 500, "seed": 0},
}


def _fmt(n: int) -> str:
    """French thousands grouping with a narrow no-break space: 12 345."""
    return f"{n:,}".replace(",", "\u202f")


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


_PLACES = ["unités", "dizaines", "centaines", "milliers", "dizaines de milliers", "centaines de milliers"]


def _addition(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.randint(10, 9999), rng.randint(10, 9999)
    steps, carry = [], 0
    da, db = _digits(a), _digits(b)
    for k in range(max(len(da), len(db))):
        x, y = (da[k] if k < len(da) else 0), (db[k] if k < len(db) else 0)
        s = x + y + carry
        plus = f" + {carry} (retenue)" if carry else ""
        carry, digit = divmod(s, 10)
        keep = f"on écrit {digit} et on retient {carry}" if carry else f"on écrit {digit}"
        steps.append(f"Colonne des {_PLACES[k]} : {x} + {y}{plus} = {s}, {keep}.")
    if carry:
        steps.append(f"Il reste la retenue {carry}, on l'écrit à gauche.")
    return f"Calcule {_fmt(a)} + {_fmt(b)}.", steps, a + b


def _subtraction(rng: random.Random) -> tuple[str, list[str], int]:
    a = rng.randint(100, 9999)
    b = rng.randint(10, a - 1)
    steps, borrow = [], 0
    da, db = _digits(a), _digits(b)
    for k in range(len(da)):
        x, y = da[k], (db[k] if k < len(db) else 0) + borrow
        if x < y:
            steps.append(
                f"Colonne des {_PLACES[k]} : {x} est plus petit que {y}, on ajoute une dizaine : "
                f"{x + 10} − {y} = {x + 10 - y}, et on retient 1."
            )
            borrow = 1
        else:
            steps.append(f"Colonne des {_PLACES[k]} : {x} − {y} = {x - y}.")
            borrow = 0
    return f"Calcule {_fmt(a)} − {_fmt(b)}.", steps, a - b


def _multiplication(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.randint(12, 999), rng.randint(11, 99)
    tens, units = (b // 10) * 10, b % 10
    if units == 0:
        steps = [
            f"Multiplier par {b}, c'est multiplier par {b // 10} puis par 10.",
            f"{_fmt(a)} × {b // 10} = {_fmt(a * (b // 10))}.",
            f"{_fmt(a * (b // 10))} × 10 = {_fmt(a * b)}.",
        ]
        return f"Calcule {_fmt(a)} × {b}.", steps, a * b
    steps = [
        f"On décompose {b} en {tens} + {units}.",
        f"{_fmt(a)} × {tens} = {_fmt(a * tens)}.",
        f"{_fmt(a)} × {units} = {_fmt(a * units)}.",
        f"On additionne : {_fmt(a * tens)} + {_fmt(a * units)} = {_fmt(a * b)}.",
    ]
    return f"Calcule {_fmt(a)} × {b}.", steps, a * b


def _division(rng: random.Random) -> tuple[str, list[str], int]:
    b, q = rng.randint(2, 25), rng.randint(3, 400)
    r = rng.randint(0, b - 1)
    a = b * q + r
    steps = [
        f"On cherche le plus grand nombre q tel que {b} × q ne dépasse pas {_fmt(a)}.",
        f"{b} × {q} = {_fmt(b * q)} et {b} × {q + 1} = {_fmt(b * (q + 1))}, donc q = {q}.",
        f"Le reste est {_fmt(a)} − {_fmt(b * q)} = {r}, qui est bien plus petit que {b}.",
        f"Donc {_fmt(a)} = {b} × {q} + {r}.",
    ]
    return f"Effectue la division euclidienne de {_fmt(a)} par {b}.", steps, q


def _priorities(rng: random.Random) -> tuple[str, list[str], int]:
    a, b, c, d = rng.randint(2, 50), rng.randint(2, 12), rng.randint(5, 30), rng.randint(1, 4)
    inner = c - d
    prod = b * inner
    steps = [
        "On calcule d'abord ce qui est entre parenthèses, puis la multiplication, puis l'addition.",
        f"Parenthèses : {c} − {d} = {inner}.",
        f"Multiplication : {b} × {inner} = {prod}.",
        f"Addition : {a} + {prod} = {a + prod}.",
    ]
    return f"Calcule {a} + {b} × ({c} − {d}).", steps, a + prod


def _percentage(rng: random.Random) -> tuple[str, list[str], int]:
    p = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
    base = rng.randint(1, 60) * 20
    value = base * p // 100
    steps = [
        f"Prendre {p} % d'un nombre, c'est le multiplier par {p} puis diviser par 100.",
        f"{_fmt(base)} × {p} = {_fmt(base * p)}.",
        f"{_fmt(base * p)} ÷ 100 = {_fmt(value)}.",
    ]
    return f"Calcule {p} % de {_fmt(base)}.", steps, value


_NAMES = ["Léa", "Hugo", "Camille", "Nathan", "Chloé", "Louis", "Inès", "Jules", "Manon", "Adam"]
_ITEMS = [("cahier", "cahiers"), ("stylo", "stylos"), ("livre", "livres"), ("croissant", "croissants")]


def _word_problem(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(_NAMES)
    (_, many), (one2, _) = rng.sample(_ITEMS, 2)
    n, price, price2 = rng.randint(2, 9), rng.randint(2, 15), rng.randint(1, 9)
    total = n * price + price2
    paid = ((total // 10) + 1) * 10
    question = (
        f"{name} achète {n} {many} à {price} € l'un et un {one2} à {price2} €. "
        f"{name} paie avec un billet de {paid} €. Combien lui rend-on ?"
    )
    steps = [
        f"Prix des {many} : {n} × {price} = {n * price} €.",
        f"Prix total : {n * price} + {price2} = {total} €.",
        f"Monnaie rendue : {paid} − {total} = {paid - total} €.",
    ]
    return question, steps, paid - total


PROBLEMS: list[Callable[[random.Random], tuple[str, list[str], int]]] = [
    _addition, _subtraction, _multiplication, _division, _priorities, _percentage, _word_problem,
]  # fmt: skip


def arithmetic_problem(rng: random.Random) -> tuple[str, list[str], int]:
    """(statement, worked steps, answer) of one random problem."""
    return rng.choice(PROBLEMS)(rng)


def _rng(source_id: str, seed: int, i: int) -> random.Random:
    return random.Random(f"{source_id}:{seed}:{i}")  # str seeds are hashed with SHA-512: stable


def _arithmetic(source_id: str, params: dict, base: Path) -> Iterator[tuple[str, str, dict]]:
    for i in range(params["n_docs"]):
        rng = _rng(source_id, params["seed"], i)
        parts = []
        for k in range(params["problems_per_doc"]):
            statement, steps, answer = arithmetic_problem(rng)
            lines = "\n".join(f"- {s}" for s in steps)
            parts.append(
                f"Exercice {k + 1}. {statement}\nSolution détaillée :\n{lines}\nRéponse : {_fmt(answer)}."
            )
        yield f"{source_id}:{i:06d}", "\n\n".join(parts), {}


_ASK_ARITH = [
    "Peux-tu m'expliquer comment faire ce calcul ? {q}",
    "Je n'arrive pas à faire cet exercice : {q} Tu peux m'aider ?",
    "{q} Explique-moi les étapes, s'il te plaît.",
    "Bonjour ! Mon professeur m'a donné cet exercice : {q} Comment on fait ?",
]
_ASK_GSM8K = [
    "Voici un problème de mathématiques (en anglais) : {q}\nRésous-le étape par étape.",
    "Peux-tu m'aider à résoudre ce problème ? Il est en anglais : {q}",
    "Explique-moi comment résoudre ce problème, étape par étape : {q}",
]
_CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k_worked_answer(answer: str) -> tuple[list[str], str]:
    """GSM8K's answer → (reasoning lines without `<<…>>` calculator annotations, final answer)."""
    body, _, final = answer.rpartition("####")
    lines = [_CALCULATOR.sub("", line).strip() for line in body.strip().split("\n") if line.strip()]
    return lines, final.strip()


def _edu_chat(source_id: str, params: dict, base: Path) -> Iterator[tuple[str, list[dict], dict]]:
    seed = params["seed"]
    for i in range(params["n_arithmetic"]):
        rng = _rng(source_id, seed, i)
        statement, steps, answer = arithmetic_problem(rng)
        ask = rng.choice(_ASK_ARITH).format(q=statement)
        reply = (
            "Bien sûr, procédons étape par étape.\n"
            + "\n".join(f"{k + 1}. {s}" for k, s in enumerate(steps))
            + f"\nLa réponse est donc {_fmt(answer)}."
        )
        yield (
            f"{source_id}:arith:{i:06d}",
            [{"role": "user", "content": ask}, {"role": "assistant", "content": reply}],
            {},
        )
    if params["gsm8k"] is None or params["n_gsm8k"] == 0:
        return
    path = base / params["gsm8k"]
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                question, answer = record["question"], record["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: expected a GSM8K record {{question, answer}}") from None
            records.append((lineno, question, answer))
    # A seeded choice of problems, in file order (so the documents do not depend on the file's size).
    picked = sorted(
        random.Random(f"{source_id}:{seed}:gsm8k").sample(records, min(params["n_gsm8k"], len(records)))
    )
    for lineno, question, answer in picked:
        rng = _rng(source_id, seed, -lineno)
        lines, final = gsm8k_worked_answer(answer)
        reply = "Raisonnons étape par étape.\n" + "\n".join(lines) + f"\nLa réponse est donc {final}."
        ask = rng.choice(_ASK_GSM8K).format(q=question)
        meta = {"derived_from": f"{path.name}:{lineno}"}
        yield (
            f"{source_id}:gsm8k:{lineno:06d}",
            [{"role": "user", "content": ask}, {"role": "assistant", "content": reply}],
            meta,
        )


def check_params(source, base: Path, where: str, never_read: list[str]) -> None:
    """Validate a generator source's params (unknown keys, types, files) and fill in defaults."""
    import fnmatch

    defaults = PARAMS[source.generator]
    for key, value in source.params.items():
        if key not in defaults:
            raise UserError(
                f"{where}: unknown key {key!r} for generator {source.generator!r} (known: {sorted(defaults)})"
            )
        if key == "gsm8k":
            if value is not None and not isinstance(value, str):
                raise UserError(f"{where}.gsm8k: expected a path or null, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
    source.params = {**defaults, **source.params}
    if source.generator == "arithmetic" and source.kind != "text":
        raise UserError(f"{where}: generator 'arithmetic' makes kind 'text' documents, not {source.kind!r}")
    if source.generator == "edu_chat" and source.kind != "chat":
        raise UserError(f"{where}: generator 'edu_chat' makes kind 'chat' documents; set kind: chat")
    if source.params.get("gsm8k"):
        path = base / source.params["gsm8k"]
        if not path.is_file():
            raise UserError(f"{where}.gsm8k: {source.params['gsm8k']!r}: no such file (looked for {path})")
        source.files = [path]  # hashed into the manifest as this source's input
        resolved = str(path.resolve())
        for banned in never_read:
            if fnmatch.fnmatch(resolved, banned) or fnmatch.fnmatch(resolved, f"*/{banned.lstrip('*/')}"):
                raise UserError(
                    f"{where}.gsm8k: {path} is an evaluation set (never_read {banned!r}); never train on it"
                )


def generate(source, base: Path) -> Iterator[tuple[str, str | list[dict], dict]]:
    """(doc id, text or messages, metadata) for each generated document."""
    make = {"arithmetic": _arithmetic, "edu_chat": _edu_chat}[source.generator]
    yield from make(source.id, source.params, base)
