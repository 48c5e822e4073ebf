"""The opt-out list: documents whose owners asked to leave the corpus.

A JSON Lines file, one entry per line, appended by `communs data optout add`:

    {"kind": "doc_id" | "author" | "sha256" | "url" | "domain", "value": "...", "reason": "...", "date": "YYYY-MM-DD"}

`doc_id` matches a document or every chunk cut from it; `sha256` the hash of a document's final
text or of its text as read; `author` is case-insensitive; `url` and `domain` are shell-style
patterns (`*.example.org`) on a document's URL (its source's URL when it has none of its own).
"""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path

from common.errors import UserError
from corpus.stages import OptOutSet

KINDS = ("doc_id", "author", "sha256", "url", "domain")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def _check_entry(entry: object, where: str) -> dict:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a JSON object")
    unknown = set(entry) - {"kind", "value", "reason", "date"}
    if unknown:
        raise UserError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    if entry.get("kind") not in KINDS:
        raise UserError(f"{where}: kind {entry.get('kind')!r} is not one of {list(KINDS)}")
    value = entry.get("value")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: value must be a non-empty string")
    if entry["kind"] == "sha256" and not _SHA.match(value):
        raise UserError(f"{where}: value {value!r} is not a lower-case hex sha256")
    return entry


def read_entries(path: str | Path) -> list[dict]:
    from common.io import iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such opt-out file")
    return [_check_entry(entry, f"{path}:{lineno}") for lineno, entry in iter_jsonl(path)]


def optout_set(entries: list[dict]) -> OptOutSet:
    by_kind: dict[str, list[str]] = {k: [] for k in KINDS}
    for e in entries:
        by_kind[e["kind"]].append(e["value"])
    return OptOutSet(
        doc_ids=frozenset(by_kind["doc_id"]),
        sha256=frozenset(by_kind["sha256"]),
        authors=frozenset(a.casefold() for a in by_kind["author"]),
        urls=tuple(sorted(by_kind["url"])),
        domains=tuple(sorted(by_kind["domain"])),
    )


def add_entry(path: str | Path, kind: str, value: str, reason: str = "", date: str | None = None) -> dict:
    """Append one entry (validated) to the opt-out file, creating it if needed."""
    path = Path(path)
    entry = {
        "kind": kind,
        "value": value,
        "reason": reason,
        "date": date or datetime.date.today().isoformat(),
    }
    _check_entry(entry, f"{path} (new entry)")
    existing = read_entries(path) if path.exists() else []
    if any(e["kind"] == kind and e["value"] == value for e in existing):
        raise UserError(f"{path}: {kind} {value!r} is already opted out")
    # Rewrite the whole file through a temporary name: an interrupted add leaves the old list intact.
    tmp = path.with_name(f".{path.name}.tmp")
    lines = [json.dumps(e, ensure_ascii=False, sort_keys=True) for e in [*existing, entry]]
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return entry
