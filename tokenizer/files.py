"""Reading documents for the tokenizer's command line: text files and JSON lines, strict UTF-8.

The corpus package has its own readers (with filtering and provenance); these are for training or encoding
straight from files. Errors name the file, the line and the byte offset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from communs import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)


def read_text(path: str | os.PathLike) -> str:
    """A file's text, strict UTF-8; invalid bytes give one error naming the file, byte offset and line."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return _decode(data, path)


def _decode(data: bytes, path: str | os.PathLike, line_start: int = 0, line_no: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_no + data.count(b"\n", 0, e.start)
        raise UserError(
            f"{path}: invalid UTF-8 at byte {line_start + e.start} (line {line}): {data[e.start : e.start + 4]!r}"
        ) from None


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


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, record) for each non-blank line of a JSON-lines file: strict UTF-8, split on
    '\n' only, and one error naming the file and line for a missing file, bad bytes or bad JSON."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            line = _decode(raw, path, offset, line_no)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None


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
