"""Maths answer checking: pull the final number out of a worked solution and compare it.

GSM8K solutions end with ``#### 72``; the project's own maths and chat data end with a French
sentence such as ``La réponse est 72.``; a model's free text may do neither, so the last number
written is the fallback. Numbers are compared as exact decimals after normalising thousands
separators (``1,000`` / ``1 000``), French decimal commas (``3,5``) and a trailing ``.0``.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = r"-?\d[\d\u202f\u00a0 ,.]*"
_MARKED = [
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(
        r"(?:réponse|reponse|resultat|résultat)\s+(?:finale\s+)?(?:est|:)\s*(?:de\s+)?(" + _NUMBER + ")", re.I
    ),
    re.compile(r"answer\s+(?:is|:)\s*(" + _NUMBER + ")", re.I),
]
_ANY = re.compile(_NUMBER)


def parse_number(text: str) -> Decimal | None:
    """'1,234' → 1234, '3,5' → 3.5, '1 000' → 1000, '12.' → 12; None when it is not a number."""
    s = text.strip().rstrip(".,").replace("\u202f", "").replace("\u00a0", "").replace(" ", "")
    if "," in s and "." in s:  # 1,234.5 (English thousands)
        s = s.replace(",", "")
    elif s.count(",") == 1 and len(s.split(",")[1]) != 3:  # 3,5 (French decimal comma)
        s = s.replace(",", ".")
    else:  # 1,234 or 1,234,567
        s = s.replace(",", "")
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def extract_answer(text: str) -> Decimal | None:
    """The final answer of a worked solution: a marked answer first, else the last number."""
    for pattern in _MARKED:
        found = pattern.findall(text)
        if found:
            return parse_number(found[-1])
    numbers = _ANY.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def is_correct(prediction: str, reference: str) -> bool:
    """True when both texts yield a final number and the numbers are equal."""
    want, got = extract_answer(reference), extract_answer(prediction)
    return want is not None and got is not None and want == got
