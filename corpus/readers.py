"""Read a source's documents: files (through HF `datasets`, or line by line for JSON Lines), a dataset
in the local HF cache, or a generator; cut long documents into chunks.

Each record read gives either a `Doc` or a problem (malformed JSON line, invalid UTF-8, missing
field, empty text) reported as `file:line`. Problems are counted and recorded in the provenance;
with `errors: fatal` the first one stops the preparation with that message instead.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from communs import UserError
from corpus.sources import Source
from corpus.stages import Doc


@dataclass
class Problem:
    """An input record that could not become a document."""

    id: str
    rule: str  # read.malformed_json | invalid_utf8 | missing_field | bad_field | empty | too_long
    where: str  # file:line
    message: str


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut `text` into pieces of at most `max_chars`, at line breaks where possible.

    Pieces are contiguous and joined back with the line break they were cut at, so that
    `"\\n".join(pieces)` rebuilds the text when every cut fell on a line break.
    """
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.split("\n"):
        while len(line) > max_chars:  # one huge line: cut at the last sentence end or space
            if current:
                pieces.append("\n".join(current))
                current, size = [], 0
            cut = max(line.rfind(". ", 0, max_chars) + 1, line.rfind(" ", 0, max_chars))
            cut = cut if cut > max_chars // 2 else max_chars
            pieces.append(line[:cut].rstrip(" "))
            line = line[cut:].lstrip(" ")
        if current and size + 1 + len(line) > max_chars:
            pieces.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + (1 if size else 0)
    if current:
        pieces.append("\n".join(current))
    pieces = [p for p in pieces if p.strip()] or [text[:max_chars]]
    # A short tail (the end of a book) would fail the length filters on its own: re-cut the last two
    # pieces at the line break nearest their middle instead.
    if len(pieces) >= 2 and len(pieces[-1]) < max_chars // 4:
        joined = pieces[-2] + "\n" + pieces[-1]
        middle = len(joined) // 2
        before, after = joined.rfind("\n", 0, middle), joined.find("\n", middle)
        cut = min((c for c in (before, after) if c > 0), key=lambda c: abs(c - middle), default=-1)
        if cut > 0 and max(cut, len(joined) - cut - 1) <= max_chars:
            pieces[-2:] = [joined[:cut], joined[cut + 1 :]]
    return pieces


def _chunks(doc_id: str, source: Source, text: str, meta: dict) -> Iterator[Doc]:
    raw_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    pieces = split_text(text, source.chunk_chars)
    if len(pieces) == 1:
        yield Doc(id=doc_id, source=source.id, parent=doc_id, raw_sha256=raw_sha, text=text, meta=meta)
        return
    for k, piece in enumerate(pieces):
        yield Doc(
            id=f"{doc_id}#{k:04d}", source=source.id, parent=doc_id, raw_sha256=raw_sha, text=piece, meta=meta
        )


def _metadata_rows(source: Source) -> dict[str, dict]:
    if source.metadata is None:
        return {}
    table = source.metadata
    with open(table.csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in [table.key, *table.fields.values()] if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{table.csv}: no column {missing[0]!r} (columns: {reader.fieldnames})")
        return {row[table.key]: {ours: row[col] for ours, col in table.fields.items()} for row in reader}


def _rel(path: Path) -> str:
    """The path as the user would type it: relative to the current directory when inside it."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


# ---------------------------------------------------------------------------------------- text


def _load_documents(files: list[Path]) -> list[str]:
    import datasets

    ds = datasets.load_dataset(
        "text", data_files=[str(p) for p in files], sample_by="document", streaming=True, split="train"
    )
    return [ex["text"] for ex in ds]


def read_text_file(path: Path) -> str:
    """One file's text exactly as the `text` format reads it (line breaks CRLF/CR → LF): the text whose
    sha256 is a document's `raw_sha256` (what `optout add --text-file` hashes)."""
    return "\n".join(_load_documents([Path(path)]))


def _read_text_files(source: Source) -> Iterator[Doc | Problem]:
    """Format `text`: one document per file; its id from `id_pattern` on the file name."""
    rows = _metadata_rows(source)
    ids = []
    for path in source.files:
        if source.id_pattern is not None:
            m = source.id_pattern.search(path.name)
            if not m:
                raise UserError(
                    f"{path}: id_pattern {source.id_pattern.pattern!r} does not match the file name"
                )
            ids.append(m.group(1))
        else:
            ids.append(f"{source.id}:{path.stem}")
    # One streaming load for all files (HF's per-load set-up costs more than reading them); if one
    # file is not UTF-8 or is empty, the counts do not line up: read them one by one to say which.
    texts: list[str | UnicodeDecodeError] | None = None
    try:
        texts = _load_documents(source.files)
    except UnicodeDecodeError:
        pass
    if texts is None or len(texts) != len(source.files):
        texts = []
        for path in source.files:
            try:
                texts.append(read_text_file(path))
            except UnicodeDecodeError as e:
                texts.append(e)
    for path, doc_id, text in zip(source.files, ids, texts):
        if isinstance(text, UnicodeDecodeError):
            yield Problem(
                doc_id,
                "read.invalid_utf8",
                f"{_rel(path)}:byte {text.start}",
                f"invalid UTF-8 ({text.reason})",
            )
            continue
        if not text.strip():
            yield Problem(doc_id, "read.empty", _rel(path), "empty document")
            continue
        meta = {"url": source.url, **rows.get(doc_id, {})}
        yield from _chunks(doc_id, source, text, meta)


# --------------------------------------------------------------------------------------- records


CHAT_ROLES = ("system", "user", "assistant")


def _check_chat(doc_id: str, source: Source, messages: list[dict], where: str) -> Problem | None:
    """A chat document the tokenizer can encode whole, or the problem with it.

    Chat documents are never cut (a piece would start mid-conversation, its answers cut off from
    their questions): one longer than `chunk_chars` is refused, naming it.
    """
    for k, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            return Problem(
                doc_id,
                "read.bad_field",
                where,
                f"message {k}: role {m['role']!r} is not one of {list(CHAT_ROLES)}",
            )
    n_chars = sum(len(m["content"]) for m in messages)
    if n_chars > source.chunk_chars:
        return Problem(
            doc_id,
            "read.too_long",
            where,
            f"chat document {doc_id!r} has {n_chars} characters, more than chunk_chars {source.chunk_chars} "
            f"(chat documents are not cut: raise sources[{source.id}].chunk_chars or split the conversation)",
        )
    return None


def _record_to_doc(record: object, source: Source, default_id: str, where: str) -> Doc | Problem | list[Doc]:
    if not isinstance(record, dict):
        return Problem(
            default_id, "read.bad_field", where, f"expected a JSON object, got {type(record).__name__}"
        )
    doc_id = default_id
    if source.id_field is not None:
        if source.id_field not in record:
            return Problem(default_id, "read.missing_field", where, f"missing id field {source.id_field!r}")
        doc_id = f"{source.id}:{record[source.id_field]}"
    meta = {"url": source.url}
    for ours, theirs in source.meta_fields.items():
        if record.get(theirs) is not None:
            meta[ours] = str(record[theirs])
    if source.kind == "chat":
        messages = record.get(source.messages_field)
        if messages is None:
            return Problem(doc_id, "read.missing_field", where, f"missing field {source.messages_field!r}")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            return Problem(
                doc_id,
                "read.bad_field",
                where,
                f"{source.messages_field!r} is not a list of {{role, content}}",
            )
        if not any(m["content"].strip() for m in messages):
            return Problem(doc_id, "read.empty", where, "empty document")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        problem = _check_chat(doc_id, source, messages, where)
        if problem:
            return problem
        raw_sha = hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode("utf-8")).hexdigest()
        return Doc(
            id=doc_id, source=source.id, parent=doc_id, raw_sha256=raw_sha, messages=messages, meta=meta
        )
    if source.template is not None:
        try:
            text = source.template.format(**record)
        except KeyError as e:
            return Problem(
                doc_id, "read.missing_field", where, f"missing field {e.args[0]!r} (used by the template)"
            )
        except (ValueError, TypeError) as e:  # a format spec that does not fit the value, e.g. {n:d} on text
            return Problem(doc_id, "read.bad_field", where, f"template: {e}")
    else:
        if source.text_field not in record:
            return Problem(doc_id, "read.missing_field", where, f"missing text field {source.text_field!r}")
        text = record[source.text_field]
        if not isinstance(text, str):
            return Problem(
                doc_id,
                "read.bad_field",
                where,
                f"field {source.text_field!r} is {type(text).__name__}, not text",
            )
    if not text.strip():
        return Problem(doc_id, "read.empty", where, "empty document")
    return list(_chunks(doc_id, source, text, meta))


def _read_jsonl(source: Source) -> Iterator[Doc | Problem]:
    # Read line by line ourselves rather than through HF's json builder: that one fails a whole
    # file on one bad line, and its text builder splits on U+2028/NEL (legal inside JSON strings),
    # so neither can report or skip a bad line by its `file:line`.
    for path in source.files:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                default_id = f"{source.id}:{path.stem}:{lineno}"
                where = f"{_rel(path)}:{lineno}"
                if not raw.strip():
                    continue  # blank lines separate nothing in JSON Lines
                try:
                    line = raw.rstrip(b"\r\n").decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Problem(default_id, "read.invalid_utf8", where, f"invalid UTF-8 at byte {e.start}")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Problem(
                        default_id,
                        "read.malformed_json",
                        where,
                        f"malformed JSON ({e.msg}, column {e.colno})",
                    )
                    continue
                out = _record_to_doc(record, source, default_id, where)
                yield from out if isinstance(out, list) else [out]


def _read_with_datasets(source: Source) -> Iterator[Doc | Problem]:
    """json (arrays / objects), parquet, arrow files and cached HF datasets, streamed."""
    import datasets

    if source.hf_dataset is not None:
        hf = source.hf_dataset
        label = f"hf:{hf['name']}"
        try:
            streams = [
                (label, datasets.load_dataset(hf["name"], hf["config"], split=hf["split"], streaming=True))
            ]
        except Exception as e:  # datasets raises many types; the message is what the user needs
            raise UserError(
                f"sources[{source.id}].hf_dataset: cannot load {hf['name']!r} offline: {e}"
            ) from None
    else:
        builder = {"json": "json", "parquet": "parquet", "arrow": "arrow"}[source.format]
        streams = [
            (_rel(p), datasets.load_dataset(builder, data_files=[str(p)], split="train", streaming=True))
            for p in source.files
        ]
    for label, stream in streams:
        stem = Path(label).stem
        try:
            for i, record in enumerate(stream):
                out = _record_to_doc(record, source, f"{source.id}:{stem}:{i + 1}", f"{label}:record {i + 1}")
                yield from out if isinstance(out, list) else [out]
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{label}: cannot read as {source.format}: {str(e).splitlines()[0]}") from None


def read_source(source: Source, base: Path) -> Iterator[Doc | Problem]:
    """Every document (chunked) and every problem of a source, in a deterministic order."""
    if source.generator is not None:
        from corpus.generators import generate

        for doc_id, content, meta in generate(source, base):
            meta = {"url": source.url, **meta}
            if isinstance(content, str):
                yield from _chunks(doc_id, source, content, meta)
            else:
                problem = _check_chat(doc_id, source, content, f"generator {source.generator}")
                if problem:
                    yield problem
                    continue
                raw_sha = hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()
                yield Doc(
                    id=doc_id,
                    source=source.id,
                    parent=doc_id,
                    raw_sha256=raw_sha,
                    messages=content,
                    meta=meta,
                )
    elif source.hf_dataset is not None:
        yield from _read_with_datasets(source)
    elif source.format == "text":
        yield from _read_text_files(source)
    elif source.format == "jsonl":
        yield from _read_jsonl(source)
    else:
        yield from _read_with_datasets(source)
