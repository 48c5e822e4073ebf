"""Read a source's documents: text files (one document each), JSON Lines line by line, json/parquet/arrow
files or a dataset in the local HF cache through HF `datasets`, or a generator; cut long documents
into chunks.

Each record read gives either a `Doc` or a problem (malformed JSON line, invalid UTF-8, missing
field, empty text) reported as `file:line`. Problems are counted and recorded in the provenance;
with `errors: fatal` the first one stops the preparation with that message instead.

Reading is split in two so that the expensive half runs in the worker processes: `read_units`
(main process, lazy, cheap) cuts a source into `ReadUnit`s — blocks of raw JSON lines with their
line numbers, groups of text files, batches of records from HF `datasets` or of generated
documents — and `parse_unit` (a worker) decodes, parses, checks and chunks one of them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
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


# About this much raw input per unit: large enough to amortise sending it to a worker, small enough
# that a window of units in flight stays a few MB.
UNIT_BYTES = 1 << 18


@dataclass
class ReadUnit:
    """A slice of a source, in corpus order, for `parse_unit`.

    kind `jsonl`: items (line number, raw line bytes) of `path`; `text`: (path, doc id, metadata) of
    whole files; `records`: (record number, record) from HF `datasets`, `path` the label used in
    messages; `generated`: (doc id, text or messages, metadata) from a generator; `docs`: documents
    (chunks of one large text file) and problems already read.
    """

    source: str
    kind: str
    path: str = ""
    items: list = field(default_factory=list)


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


def read_text_file(path: Path) -> str:
    """One file's text exactly as the `text` format reads it (line breaks CRLF/CR → LF, as HF datasets'
    text builder and Python's universal newlines do): the text whose sha256 is a document's
    `raw_sha256` (what `optout add --text-file` hashes)."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def _text_units(source: Source) -> Iterator[ReadUnit]:
    """Format `text`: one document per file; its id from `id_pattern` on the file name. Every id is
    checked before the first unit goes out (a file name that does not match is an error)."""
    rows = _metadata_rows(source)
    files = []
    for path in source.files:
        if source.id_pattern is not None:
            m = source.id_pattern.search(path.name)
            if not m:
                raise UserError(
                    f"{path}: id_pattern {source.id_pattern.pattern!r} does not match the file name"
                )
            doc_id = m.group(1)
        else:
            doc_id = f"{source.id}:{path.stem}"
        files.append((str(path), doc_id, {"url": source.url, **rows.get(doc_id, {})}))
    unit, size = ReadUnit(source.id, "text"), 0
    for item in files:
        file_size = os.path.getsize(item[0])
        if file_size > 4 * UNIT_BYTES:
            # A large file (a book) is read and cut here, so that its chunks spread over the workers
            # rather than all going through the one that would read it; reading and cutting cost
            # little next to the stages.
            if unit.items:
                yield unit
                unit, size = ReadUnit(source.id, "text"), 0
            yield from _docs_units(
                source, _parse_text_files(ReadUnit(source.id, "text", items=[item]), source)
            )
            continue
        unit.items.append(item)
        size += file_size
        if size >= UNIT_BYTES:
            yield unit
            unit, size = ReadUnit(source.id, "text"), 0
    if unit.items:
        yield unit


def _packed_units(source: Source, kind: str, items: Iterable, size_of: Callable) -> Iterator[ReadUnit]:
    """`items` packed into units of `kind` of about UNIT_BYTES (`size_of(item)` characters each)."""
    unit, size = ReadUnit(source.id, kind), 0
    for item in items:
        unit.items.append(item)
        size += size_of(item)
        if size >= UNIT_BYTES:
            yield unit
            unit, size = ReadUnit(source.id, kind), 0
    if unit.items:
        yield unit


def _docs_units(source: Source, items: Iterator[Doc | Problem]) -> Iterator[ReadUnit]:
    return _packed_units(
        source, "docs", items, lambda item: len(item.content()) if isinstance(item, Doc) else 0
    )


def _parse_text_files(unit: ReadUnit, source: Source) -> Iterator[Doc | Problem]:
    for path, doc_id, meta in unit.items:
        try:
            text = read_text_file(Path(path))
        except UnicodeDecodeError as e:
            yield Problem(
                doc_id,
                "read.invalid_utf8",
                f"{_rel(Path(path))}:byte {e.start}",
                f"invalid UTF-8 ({e.reason})",
            )
            continue
        if not text.strip():
            yield Problem(doc_id, "read.empty", _rel(Path(path)), "empty document")
            continue
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


def _jsonl_units(source: Source) -> Iterator[ReadUnit]:
    # Read line by line ourselves rather than through HF's json builder: that one fails a whole
    # file on one bad line, and its text builder splits on U+2028/NEL (legal inside JSON strings),
    # so neither can report or skip a bad line by its `file:line`. Only b"\n" ends a line here.
    for path in source.files:
        with open(path, "rb") as f:
            lineno = 0
            while lines := f.readlines(UNIT_BYTES):
                yield ReadUnit(source.id, "jsonl", str(path), list(enumerate(lines, start=lineno + 1)))
                lineno += len(lines)


def _parse_jsonl(unit: ReadUnit, source: Source) -> Iterator[Doc | Problem]:
    path = Path(unit.path)
    for lineno, raw in unit.items:
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
                default_id, "read.malformed_json", where, f"malformed JSON ({e.msg}, column {e.colno})"
            )
            continue
        out = _record_to_doc(record, source, default_id, where)
        yield from out if isinstance(out, list) else [out]


_RECORDS_PER_UNIT = 256


def _dataset_units(source: Source) -> Iterator[ReadUnit]:
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
        unit = ReadUnit(source.id, "records", label)
        try:
            for i, record in enumerate(stream):
                unit.items.append((i + 1, record))
                if len(unit.items) >= _RECORDS_PER_UNIT:
                    yield unit
                    unit = ReadUnit(source.id, "records", label)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{label}: cannot read as {source.format}: {str(e).splitlines()[0]}") from None
        if unit.items:
            yield unit


def _parse_records(unit: ReadUnit, source: Source) -> Iterator[Doc | Problem]:
    stem = Path(unit.path).stem
    for n, record in unit.items:
        out = _record_to_doc(record, source, f"{source.id}:{stem}:{n}", f"{unit.path}:record {n}")
        yield from out if isinstance(out, list) else [out]


def _generated_units(source: Source, base: Path) -> Iterator[ReadUnit]:
    from corpus.generators import generate

    def size_of(item) -> int:
        content = item[1]
        return len(content) if isinstance(content, str) else sum(len(m["content"]) for m in content)

    return _packed_units(source, "generated", generate(source, base), size_of)


def _parse_generated(unit: ReadUnit, source: Source) -> Iterator[Doc | Problem]:
    for doc_id, content, meta in unit.items:
        meta = {"url": source.url, **meta}
        if isinstance(content, str):
            yield from _chunks(doc_id, source, content, meta)
            continue
        problem = _check_chat(doc_id, source, content, f"generator {source.generator}")
        if problem:
            yield problem
            continue
        raw_sha = hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()
        yield Doc(id=doc_id, source=source.id, parent=doc_id, raw_sha256=raw_sha, messages=content, meta=meta)


def read_units(source: Source, base: Path) -> Iterator[ReadUnit]:
    """A source cut into units, lazily, in corpus order (files as listed, then records)."""
    if source.generator is not None:
        return _generated_units(source, base)
    if source.hf_dataset is None and source.format == "text":
        return _text_units(source)
    if source.hf_dataset is None and source.format == "jsonl":
        return _jsonl_units(source)
    return _dataset_units(source)


def _parse_docs(unit: ReadUnit, source: Source) -> Iterator[Doc | Problem]:
    return iter(unit.items)


_PARSERS = {
    "jsonl": _parse_jsonl,
    "text": _parse_text_files,
    "records": _parse_records,
    "generated": _parse_generated,
    "docs": _parse_docs,
}


def parse_unit(unit: ReadUnit, source: Source) -> list[Doc | Problem]:
    """The documents (chunked) and problems of one unit, in order."""
    return list(_PARSERS[unit.kind](unit, source))
