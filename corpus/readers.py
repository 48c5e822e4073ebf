"""Read a source's documents: text files (one document each), JSON Lines line by line, json/parquet/arrow
files or a dataset in the local HF cache through HF `datasets`, or a generator; cut long documents
into chunks.

Each record read gives either a `Doc` or a problem (malformed JSON line, invalid UTF-8, missing
field, empty text) reported as `file:line`. Problems are counted and recorded in the provenance;
with `errors: fatal` the first one stops the preparation with that message instead.

Reading is split in two so that the expensive half runs in the worker processes: `read_units`
(main process, lazy, cheap) cuts a source into `ReadUnit`s — blocks of raw JSON lines with their
line numbers, groups of text files, row ranges of parquet/arrow files (from their headers), whole
json files, batches of generated documents — and `parse_unit` (a worker) decodes, parses, checks and
chunks one of them. Structured records are decoded as HF `datasets` streaming decodes them (the same
Python values); only a json file over JSON_UNIT_BYTES and a cached dataset that is not local
parquet/arrow files are still streamed by HF `datasets` in the main process.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
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
    whole files; `table`: row ranges (record number of the first row, part, first row, end row) of the
    parquet row groups or arrow record batches (parts) of `file`, decoded by the worker; `json`: the whole
    json `file`, decoded by the worker; `records`: (record number, record) already decoded by HF
    `datasets`; `generated`: (doc id, text or messages, metadata) from a generator; `docs`: documents
    (chunks of one large text file) and problems already read. `path` is the label used in messages
    and default ids (the file as the user wrote it, or `hf:<dataset>`).
    """

    source: str
    kind: str
    path: str = ""
    items: list = field(default_factory=list)
    file: str = ""  # table, json: the file to read
    format: str = ""  # table: parquet | arrow
    features: object = None  # table: the HF `Features` to cast to and decode with (None: none needed)


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


# ----------------------------------------------------------------------------- structured records
#
# parquet and arrow files are cut in the main process from what their headers say (parquet row groups
# from the footer, arrow record batches from their message headers, memory-mapped: no data is decoded)
# into `table` units — row ranges with the record number of their first row — that the workers read and
# decode. A json file (one array, or one object per line, as HF's json builder reads it) cannot be cut
# without parsing it: it is one `json` unit, read by a worker with HF `datasets`, up to
# JSON_UNIT_BYTES; a larger one, and a cached HF dataset that does not resolve to local parquet or
# arrow files, are streamed by HF `datasets` in this process and sent as batches of `records`.

# A parquet row group is decoded from its first page whichever rows are wanted (pages are not indexed),
# so a large group is cut into at most this many row ranges: at ~340 MB per CPU-second of decoding (text
# records, snappy) against ~1 MB/s of stages per core, decoding each group ~8.5 times on average costs
# ~3% of the work (arrow slices are free: no limit).
MAX_ROW_GROUP_PIECES = 16
# Past this size a json file is streamed here in batches rather than sent whole to one worker, whose
# result (every document of the file) would sit in memory twice (worker and main process).
JSON_UNIT_BYTES = 64 << 20
_RECORDS_PER_UNIT = 256


def _cannot_read(label: str, fmt: str, e: Exception) -> UserError:
    """One line naming the file; pyarrow's messages may quote raw bytes of the file: escaped."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    line = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in line)
    return UserError(f"{label}: cannot read as {fmt}: {line}")


def _open_ipc(source) -> tuple[object, Iterator]:
    """An arrow file's schema and record batches (in order), opened as HF's arrow builder opens it: an
    IPC stream (what `Dataset.save_to_disk` writes), else an IPC file."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except (OSError, pa.lib.ArrowInvalid):
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _table_parts(path: Path, fmt: str) -> tuple[object, list[tuple[int, int]]]:
    """The schema of a parquet or arrow file and (rows, uncompressed bytes) of each of its parts (row
    groups or record batches), from its headers alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        with pq.ParquetFile(path) as pf:  # reads the footer only
            groups = [pf.metadata.row_group(i) for i in range(pf.metadata.num_row_groups)]
            return pf.schema_arrow, [(g.num_rows, g.total_byte_size) for g in groups]
    with pa.memory_map(str(path)) as source:  # zero-copy: reading a batch touches its header only
        schema, batches = _open_ipc(source)
        return schema, [(b.num_rows, b.nbytes) for b in batches]


def _table_units(
    source: Source, fmt: str, label: str, path: Path, parts: list[tuple[int, int]], first: int, features
) -> Iterator[ReadUnit]:
    """The parts of one file as units of about UNIT_BYTES (small parts packed together, large ones cut
    into row ranges); items (record number of the range's first row, part, first row, end row)."""

    def new() -> ReadUnit:
        return ReadUnit(source.id, "table", label, file=str(path), format=fmt, features=features)

    unit, size = new(), 0
    for part, (rows, nbytes) in enumerate(parts):
        pieces = max(1, min(rows, -(-nbytes // UNIT_BYTES)))
        if fmt == "parquet":
            pieces = min(pieces, MAX_ROW_GROUP_PIECES)
        step = -(-rows // pieces) if rows else 1
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            unit.items.append((first + start, part, start, stop))
            size += nbytes * (stop - start) // rows
            if size >= UNIT_BYTES:
                yield unit
                unit, size = new(), 0
        first += rows
    if unit.items:
        yield unit


def _parquet_ranges(path: str, items: list[tuple[int, int, int, int]]) -> list[tuple[int, object]]:
    """Worker: the arrow table of each row range of `items` in a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    with pq.ParquetFile(path) as pf:
        for first, part, start, stop in items:
            if start == 0 and stop == pf.metadata.row_group(part).num_rows:
                tables.append((first, pf.read_row_group(part, use_threads=False)))
                continue
            # The rows before `start` are decoded and dropped (see MAX_ROW_GROUP_PIECES); batches are
            # sliced by counting rows rather than by trusting their size.
            seen, pieces = 0, []
            for batch in pf.iter_batches(batch_size=stop - start, row_groups=[part], use_threads=False):
                lo, hi = max(start - seen, 0), min(stop - seen, batch.num_rows)
                if hi > lo:
                    pieces.append(batch.slice(lo, hi - lo))
                seen += batch.num_rows
                if seen >= stop:
                    break
            tables.append((first, pa.Table.from_batches(pieces, schema=pf.schema_arrow)))
        return tables


def _arrow_ranges(path: str, items: list[tuple[int, int, int, int]]) -> list[tuple[int, object]]:
    """Worker: the arrow table of each row range of `items` in an arrow file (zero-copy slices of the
    memory-mapped batches; a stream's batches before the wanted ones cost a header each)."""
    import pyarrow as pa

    wanted = {part for _, part, _, _ in items}
    found = {}
    with pa.memory_map(path) as source:  # the buffers keep their part of the map alive once it is closed
        schema, batches = _open_ipc(source)
        for part, batch in enumerate(batches):
            if part not in wanted:
                continue
            batch.validate(full=True)  # as HF's arrow builder does: a corrupt batch fails, naming the file
            found[part] = batch
            if len(found) == len(wanted):
                break
    return [
        (first, pa.Table.from_batches([found[part].slice(start, stop - start)], schema=schema))
        for first, part, start, stop in items
    ]


def _hf_features(schema, features=None):
    """The HF `Features` a worker casts a table of `schema` to and decodes it with, as HF `datasets`
    does (`features`: the dataset's; by default those its parquet and arrow builders infer from the
    schema). None when that changes nothing — the schema is the features' own and no column needs
    decoding (images, audio…) — as for plain text, numbers, lists and structs: HF's rows are then
    `table.to_pydict()`'s, and the worker takes them without importing `datasets` (~1 CPU-second)."""
    import datasets
    from datasets.features.features import require_decoding

    features = features or datasets.Features.from_arrow_schema(schema)
    if schema == features.arrow_schema and not any(require_decoding(f) for f in features.values()):
        return None
    return features


def _table_records(unit: ReadUnit) -> list[tuple[int, object]]:
    """Decode a `table` unit's rows as HF `datasets` streams them: each table cast to the unit's features
    (`table_cast`) and its rows as HF's `PythonFormatter` gives them; without features, the rows of
    `to_pydict()` (what that formatter extracts)."""
    try:
        read = _parquet_ranges if unit.format == "parquet" else _arrow_ranges
        tables = read(unit.file, unit.items)
        if unit.features is None:
            batches = [(first, table.num_rows, table.to_pydict()) for first, table in tables]
        else:
            from datasets.formatting import PythonFormatter
            from datasets.table import table_cast

            formatter = PythonFormatter(features=unit.features)
            schema = unit.features.arrow_schema
            batches = [
                (first, table.num_rows, formatter.format_batch(table_cast(table, schema)))
                for first, table in tables
            ]
    except Exception as e:  # pyarrow and datasets raise several types; the message is what the user needs
        raise _cannot_read(_file_label(unit), unit.format, e) from None
    records = []
    for first, n_rows, batch in batches:
        columns = list(batch.items())
        records += [(first + i, {c: values[i] for c, values in columns}) for i in range(n_rows)]
    return records


def _file_label(unit: ReadUnit) -> str:
    """The unit's file as messages name it: its label, and the file when the label is a dataset's."""
    rel = _rel(Path(unit.file))
    return unit.path if unit.path == rel else f"{unit.path} ({rel})"


def _json_records(unit: ReadUnit) -> list[tuple[int, object]]:
    """A whole json file through HF's json builder, its records numbered from 1."""
    import datasets

    try:
        stream = datasets.load_dataset("json", data_files=[unit.file], split="train", streaming=True)
        return list(enumerate(stream, start=1))
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise _cannot_read(unit.path, "json", e) from None


def unit_records(unit: ReadUnit) -> list[tuple[int, object]]:
    """(record number, record) of a `table`, `json` or `records` unit, decoded (in a worker for the
    first two): the values HF `datasets` streaming gives."""
    if unit.kind == "table":
        return _table_records(unit)
    if unit.kind == "json":
        return _json_records(unit)
    return unit.items


def _streamed_units(source: Source, label: str, stream) -> Iterator[ReadUnit]:
    """A dataset streamed by HF `datasets` here, in batches of `records` numbered from 1."""
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
        raise _cannot_read(label, source.format, e) from None
    if unit.items:
        yield unit


def _file_units(source: Source) -> Iterator[ReadUnit]:
    """Formats json, parquet and arrow: each file in turn, its records numbered from 1."""
    import datasets

    for path in source.files:
        label = _rel(path)
        if source.format == "json":
            if os.path.getsize(path) <= JSON_UNIT_BYTES:
                yield ReadUnit(source.id, "json", label, file=str(path), format="json")
            else:
                try:
                    stream = datasets.load_dataset(
                        "json", data_files=[str(path)], split="train", streaming=True
                    )
                except Exception as e:  # datasets raises many types; the message is what the user needs
                    raise _cannot_read(label, "json", e) from None
                yield from _streamed_units(source, label, stream)
            continue
        try:
            schema, parts = _table_parts(path, source.format)
        except Exception as e:  # not a parquet / arrow file, truncated, unreadable
            raise _cannot_read(label, source.format, e) from None
        yield from _table_units(source, source.format, label, path, parts, 1, _hf_features(schema))


def _hf_local_files(hf: dict) -> tuple[str, list[Path], object] | None:
    """A cached HF dataset that resolves to local parquet or arrow files: (format, files in the order
    HF streams them, the features HF casts them to or None when it casts nothing); None for anything
    else (streamed by HF `datasets` as before)."""
    import datasets
    from datasets.naming import filenames_for_dataset_split
    from datasets.packaged_modules.arrow.arrow import Arrow
    from datasets.packaged_modules.cache.cache import Cache
    from datasets.packaged_modules.parquet.parquet import Parquet

    builder = datasets.load_dataset_builder(hf["name"], hf["config"])
    if isinstance(builder, Cache):
        # A hub dataset downloaded before, read offline from the datasets cache: arrow streams named
        # by its split info, cast to the features recorded there.
        split = (builder.info.splits or {}).get(hf["split"])
        if split is None:
            return None
        files = filenames_for_dataset_split(
            builder.cache_dir, builder.dataset_name, split.name, "arrow", split.shard_lengths
        )
        fmt, features = "arrow", builder.info.features
    elif isinstance(builder, (Parquet, Arrow)):
        # A local dataset folder (or a snapshot resolved to local files): HF casts every file to the
        # dataset's declared features, else to those of its first file.
        config = builder.config
        if any(getattr(config, key, None) is not None for key in ("columns", "filters", "batch_size")):
            return None
        fmt = "parquet" if isinstance(builder, Parquet) else "arrow"
        files = (config.data_files or {}).get(hf["split"])
        if not files:
            return None
        features = builder.info.features
        if features is None and all(os.path.isfile(f) for f in files):
            features = datasets.Features.from_arrow_schema(_table_parts(Path(files[0]), fmt)[0])
    else:
        return None
    if not all(os.path.isfile(f) for f in files):
        return None  # remote files
    return fmt, [Path(f) for f in files], features


def _hf_dataset_units(source: Source) -> Iterator[ReadUnit]:
    """A dataset in the local HF cache (or a local dataset folder): its local parquet / arrow files cut
    into `table` units, records numbered from 1 over the whole split as HF streams it; otherwise
    streamed by HF `datasets` here."""
    import datasets

    hf = source.hf_dataset
    label = f"hf:{hf['name']}"
    try:
        local = _hf_local_files(hf)
        if local is None:
            stream = datasets.load_dataset(hf["name"], hf["config"], split=hf["split"], streaming=True)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise UserError(f"sources[{source.id}].hf_dataset: cannot load {hf['name']!r} offline: {e}") from None
    if local is None:
        yield from _streamed_units(source, label, stream)
        return
    fmt, files, features = local
    first = 1
    for path in files:
        try:
            schema, parts = _table_parts(path, fmt)
        except Exception as e:
            raise _cannot_read(f"{label} ({_rel(path)})", fmt, e) from None
        # HF's `Cache` builder casts nothing when the cache records no features: neither does the worker.
        file_features = _hf_features(schema, features) if features is not None else None
        yield from _table_units(source, fmt, label, path, parts, first, file_features)
        first += sum(rows for rows, _ in parts)


def _parse_records(unit: ReadUnit, source: Source) -> Iterator[Doc | Problem]:
    """`table`, `json` and `records` units: each record a document (or a problem), named
    `label:record n`, default id `source:stem:n`."""
    stem = Path(unit.path).stem
    for n, record in unit_records(unit):
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
    if source.hf_dataset is not None:
        return _hf_dataset_units(source)
    return _file_units(source)


def _parse_docs(unit: ReadUnit, source: Source) -> Iterator[Doc | Problem]:
    return iter(unit.items)


_PARSERS = {
    "jsonl": _parse_jsonl,
    "text": _parse_text_files,
    "table": _parse_records,
    "json": _parse_records,
    "records": _parse_records,
    "generated": _parse_generated,
    "docs": _parse_docs,
}


def parse_unit(unit: ReadUnit, source: Source) -> list[Doc | Problem]:
    """The documents (chunked) and problems of one unit, in order."""
    return list(_PARSERS[unit.kind](unit, source))
