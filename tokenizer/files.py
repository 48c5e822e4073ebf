"""File names of a tokenizer folder, and documents for the tokenizer's command line: text files and
JSON lines, strict UTF-8 (common.io).

The corpus package has its own readers (with filtering and provenance); these are for training or encoding
straight from files. Errors name the file, the line and the byte offset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from common.errors import UserError
from common.io import iter_jsonl, read_text

MODEL_FILE = "tokenizer.model"  # the sentencepiece model in a tokenizer folder (and in every export)
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files named, and the .txt/.md/.jsonl files under folders named (sorted: a stable document order)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p for p in item.rglob("*") if p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES and p.is_file()
            )
            if not found:
                raise UserError(f"{item}: no .txt, .md or .jsonl file in this folder")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    return paths


def iter_documents(path: Path, field: str = "text") -> Iterator[str]:
    """The documents of one file: the whole text of a text file, or `field` of each line of a .jsonl file."""
    if path.suffix not in JSONL_SUFFIXES:
        yield read_text(path)
        return
    for line_no, record in iter_jsonl(path):
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise UserError(f"{path}:{line_no}: no string field {field!r} (use --field to pick another)")
        yield value
