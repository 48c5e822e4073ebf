"""Python hooks of the local tasks (named with `!function utils.…` in their YAML files)."""

from __future__ import annotations

from pathlib import Path

import datasets

from common.io import iter_jsonl
from eval.maths import is_correct

DATA = Path(__file__).resolve().parent / "data"


def load_jsonl(file: str, **_metadata) -> datasets.DatasetDict:
    """A task's data as a single "test" split, read from eval/tasks/data/ (no download, no cache).
    The harness passes the task's metadata (version…) along with `file`; they are not needed here."""
    records = [record for _, record in iter_jsonl(DATA / file)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def maths_exact_match(doc: dict, results: list[str]) -> dict[str, float]:
    """1.0 when the final number of the generated solution equals the reference answer."""
    return {"exact_match": float(is_correct(results[0], doc["answer"]))}
