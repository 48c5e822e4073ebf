import json
from decimal import Decimal
from pathlib import Path

import pytest

from eval.maths import extract_answer, is_correct, parse_number

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text, value",
    [
        ("1,234", "1234"),
        ("1,234,567", "1234567"),
        ("3,5", "3.5"),
        ("1 000", "1000"),
        ("1\u202f000", "1000"),
        ("12.", "12"),
        ("-4", "-4"),
        ("0.25", "0.25"),
        ("1,234.5", "1234.5"),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == Decimal(value)


def test_marked_answer_wins_over_last_number():
    assert extract_answer("She has 3 + 4 = 7 apples.\n#### 7\nThen 12 more") == Decimal(7)
    assert extract_answer("12 + 7 = 19. La réponse est 19. (vérifié en 2 étapes)") == Decimal(19)
    assert extract_answer("The answer is 42 but 43 was close") == Decimal(42)


def test_falls_back_to_last_number_and_to_none():
    assert extract_answer("5 puis 6 puis 11") == Decimal(11)
    assert extract_answer("aucun nombre ici") is None


def test_is_correct_on_real_gsm8k_answers():
    lines = (ROOT / "data/demo/gsm8k/train-excerpt.jsonl").read_text().splitlines()[:200]
    for line in lines:
        rec = json.loads(line)
        final = rec["answer"].split("####")[-1].strip()
        assert is_correct(f"Donc la réponse est {final}.", rec["answer"]), rec["answer"]
        assert not is_correct(f"La réponse est {final}1.", rec["answer"])


def test_no_number_is_never_correct():
    assert not is_correct("je ne sais pas", "#### 3")
    assert not is_correct("#### 3", "pas de nombre")
