"""Bad input: each case is reported as file:line (or file:byte), counted, and skipped or fatal by policy."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from common.errors import UserError
from corpus.pipeline import curate
from corpus.readers import split_text
from corpus.sources import load_sources
from corpus.stages import normalise_text

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"
NOVEL = (DEMO / "roman19" / "txt" / "Maupassant_UneVie-rd0056.txt").read_text(encoding="utf-8")


def _sources(tmp: Path, body: str, errors: str = "skip") -> Path:
    path = tmp / "sources.yaml"
    path.write_text(
        f"release: {{licence: Apache-2.0}}\npipeline: {{errors: {errors}, chunk_chars: 4000}}\n"
        + textwrap.dedent(body)
    )
    return path


JSONL_SOURCE = """\
sources:
  - id: docs
    format: jsonl
    paths: [docs.jsonl]
    id_field: key
    licence: CC-BY-4.0
    language: fr
    domain: web
    url: https://example.org
    stages: {quality: false, langid: false}
"""


def _paragraph(k: int) -> str:
    return NOVEL[3000 + 700 * k : 3000 + 700 * k + 600]


def _write_bad_jsonl(tmp: Path) -> None:
    lines = [
        json.dumps({"key": "a", "text": _paragraph(0)}).encode(),
        b'{"key": "b", "text": "unterminated',  # line 2: malformed
        json.dumps({"key": "c", "text": _paragraph(1)}, ensure_ascii=False).encode()[:-30]
        + b"\xff\xfe"
        + b'"}',  # 3
        json.dumps({"key": "d", "text": "   "}).encode(),  # line 4: empty
        json.dumps({"key": "e", "body": _paragraph(2)}).encode(),  # line 5: no text field
        b"",  # line 6: blank, ignored
        json.dumps({"key": "f", "text": _paragraph(3)}).encode(),
    ]
    (tmp / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def test_bad_jsonl_lines_are_skipped_counted_and_recorded(tmp_path):
    _write_bad_jsonl(tmp_path)
    result = curate(load_sources(_sources(tmp_path, JSONL_SOURCE)))
    assert [d.id for d in result.docs["docs"]] == ["docs:a", "docs:f"]
    assert result.counts["docs"]["removed"] == {
        "read.empty": 1, "read.invalid_utf8": 1, "read.malformed_json": 1, "read.missing_field": 1,
    }  # fmt: skip
    assert result.counts["docs"]["read"] == 6
    problems = {r["rule"]: r for r in result.provenance if r["fate"] == "removed"}
    assert problems["read.malformed_json"]["where"].endswith("docs.jsonl:2")
    assert problems["read.invalid_utf8"]["where"].endswith("docs.jsonl:3")
    assert problems["read.empty"]["id"] == "docs:d"
    assert problems["read.missing_field"]["message"] == "missing text field 'text'"


def test_bad_jsonl_line_is_fatal_by_policy(tmp_path):
    _write_bad_jsonl(tmp_path)
    with pytest.raises(
        UserError,
        match=r"docs\.jsonl:2: malformed JSON \(Unterminated string.*\(sources\[docs\]\.errors is 'fatal'\)",
    ):
        curate(load_sources(_sources(tmp_path, JSONL_SOURCE, errors="fatal")))


TEXT_SOURCE = """\
sources:
  - id: books
    format: text
    paths: [books/*.txt]
    id_pattern: '-(bk\\d+)\\.txt$'
    licence: public-domain
    language: fr
    domain: literature
    url: https://example.org
"""


def test_text_files_invalid_utf8_empty_and_huge(tmp_path):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a-bk1.txt").write_text(NOVEL[:30000], encoding="utf-8")  # huge: split in chunks
    (tmp_path / "books" / "b-bk2.txt").write_bytes(
        NOVEL[:3000].encode() + b"\xc3\x28" + NOVEL[3000:6000].encode()
    )
    (tmp_path / "books" / "c-bk3.txt").write_text("\n  \n", encoding="utf-8")
    result = curate(load_sources(_sources(tmp_path, TEXT_SOURCE)))
    records = {r["id"]: r for r in result.provenance}
    assert records["bk2"]["rule"] == "read.invalid_utf8" and records["bk2"]["where"].endswith(
        f"b-bk2.txt:byte {len(NOVEL[:3000].encode())}"
    )
    assert records["bk3"]["rule"] == "read.empty"
    chunks = [d for d in result.docs["books"]]
    assert len(chunks) >= 8 and all(len(d.text) <= 4000 for d in chunks)
    assert [d.id for d in chunks][:2] == ["bk1#0000", "bk1#0001"] and {d.parent for d in chunks} == {"bk1"}
    assert result.counts["books"]["read"] == len(chunks) + 2


def test_split_text_rebuilds_on_line_breaks():
    pieces = split_text(NOVEL[:50000], 5000)
    assert all(len(p) <= 5000 for p in pieces)
    assert "\n".join(pieces) == NOVEL[:50000].strip("\n") or "\n".join(pieces) == NOVEL[:50000]
    tail = split_text(NOVEL[:41000], 10000)  # 4 full pieces and a ~1,000-character tail, rebalanced
    assert len(tail) == 5 and min(map(len, tail)) > 2500 and "\n".join(tail) == NOVEL[:41000].strip("\n")
    long_line = "mot " * 3000  # one 12,000-character line: cut at spaces
    cut = split_text(long_line, 5000)
    assert all(len(p) <= 5000 for p in cut) and " ".join(cut).split() == long_line.split()


def test_parquet_through_hf_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [_paragraph(k) for k in range(3)]
    pq.write_table(pa.table({"id": ["x", "y", "z"], "content": texts}), tmp_path / "part.parquet")
    body = JSONL_SOURCE.replace("jsonl", "parquet").replace("docs.parquet", "part.parquet")
    body = body.replace("id_field: key", "id_field: id\n    text_field: content")
    result = curate(load_sources(_sources(tmp_path, body)))
    assert [(d.id, d.text) for d in result.docs["docs"]] == [
        ("docs:x", normalise_text(texts[0])), ("docs:y", normalise_text(texts[1])), ("docs:z", normalise_text(texts[2]))
    ]  # fmt: skip


def test_chat_records_and_missing_messages(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Combien font 2 + 2 ?"},
                {"role": "assistant", "content": "2 + 2 = 4."},
            ]
        },
        {"conversation": []},
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    body = JSONL_SOURCE.replace("docs.jsonl", "chat.jsonl").replace("    id_field: key\n", "    kind: chat\n")
    body = body.replace("stages: {quality: false, langid: false}", "stages: {quality: false, langid: false}")
    result = curate(load_sources(_sources(tmp_path, body)))
    assert [d.messages for d in result.docs["docs"]] == [rows[0]["messages"]]
    assert [r["rule"] for r in result.provenance] == [None, "read.missing_field"]


def test_json_arrow_and_hf_dataset_sources(tmp_path):
    import datasets

    texts = [_paragraph(k) for k in range(4)]
    (tmp_path / "arr.json").write_text(
        json.dumps([{"key": "j1", "text": texts[0]}, {"key": "j2", "text": texts[1]}])
    )
    ds = datasets.Dataset.from_dict({"key": ["a1"], "text": [texts[2]]})
    ds.to_parquet(str(tmp_path / "unused.parquet"))
    arrow_dir = tmp_path / "saved"
    ds.save_to_disk(str(arrow_dir))
    arrow_file = next(arrow_dir.glob("*.arrow"))
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text(json.dumps({"key": "h1", "text": texts[3]}) + "\n")
    body = "sources:\n"
    for sid, origin in (
        ("js", "format: json\n    paths: [arr.json]"),
        ("ar", f"format: arrow\n    paths: [{arrow_file.relative_to(tmp_path)}]"),
        ("hf", f"hf_dataset: {{name: {tmp_path / 'hub'}}}"),
    ):
        body += (
            f"  - id: {sid}\n    {origin}\n    id_field: key\n    licence: CC-BY-4.0\n    language: fr\n"
            "    domain: web\n    url: https://example.org\n    stages: {quality: false, langid: false}\n"
        )
    result = curate(load_sources(_sources(tmp_path, body)))
    assert [d.id for d in result.docs["js"]] == ["js:j1", "js:j2"]
    assert [d.id for d in result.docs["ar"]] == ["ar:a1"]
    assert [(d.id, d.text) for d in result.docs["hf"]] == [("hf:h1", normalise_text(texts[3]))]


def _licence_corpus(tmp: Path, release: str, source_licence: str, licences: list[str | None]) -> Path:
    rows = []
    for k, lic in enumerate(licences):
        row = {"key": f"d{k}", "text": _paragraph(k)}
        if lic is not None:
            row["lic"] = lic
        rows.append(json.dumps(row, ensure_ascii=False))
    (tmp / "docs.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    body = JSONL_SOURCE.replace(
        "licence: CC-BY-4.0", f"licence: {source_licence}\n    meta_fields: {{licence: lic}}"
    )
    path = _sources(tmp, body)
    path.write_text(path.read_text().replace("licence: Apache-2.0", f"licence: {release}", 1))
    return path


def test_licence_stage_checks_each_documents_own_licence(tmp_path):
    # Source CC-BY-4.0 (commercial, attribution), model released under Apache-2.0.
    licences = [None, "CC0-1.0", "Foo-1.0", "CC-BY-NC-4.0", "CC-BY-SA-4.0", " MIT "]
    result = curate(load_sources(_licence_corpus(tmp_path, "Apache-2.0", "CC-BY-4.0", licences)))
    got = [(r["id"], r["licence"], r["rule"]) for r in result.provenance]
    assert got == [
        ("docs:d0", "CC-BY-4.0", None),  # no licence of its own: its source's, accepted at load
        ("docs:d1", "CC0-1.0", None),  # looser than the source's conditions: fine
        ("docs:d2", "Foo-1.0", "licence.unknown"),
        ("docs:d3", "CC-BY-NC-4.0", "licence.conditions"),  # non-commercial, the source says commercial
        ("docs:d4", "CC-BY-SA-4.0", "licence.conditions"),  # share-alike, the source does not say so
        ("docs:d5", "MIT", None),
    ]
    assert result.counts["docs"]["removed"] == {"licence.conditions": 2, "licence.unknown": 1}


def test_licence_stage_refuses_an_incompatible_share_alike_document(tmp_path):
    # Released under CC-BY-SA-4.0: a GPL-3.0-only document's share-alike is not satisfied by it.
    sources = _licence_corpus(tmp_path, "CC-BY-SA-4.0", "CC-BY-SA-4.0", ["GPL-3.0-only", "CC-BY-SA-3.0"])
    result = curate(load_sources(sources))
    assert [(r["licence"], r["rule"]) for r in result.provenance] == [
        ("GPL-3.0-only", "licence.refused"),
        ("CC-BY-SA-3.0", None),
    ]


def _chat_sources(tmp: Path, rows: list[dict], errors: str = "skip") -> Path:
    (tmp / "chat.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    body = JSONL_SOURCE.replace("docs.jsonl", "chat.jsonl").replace("    id_field: key\n", "    kind: chat\n")
    return _sources(tmp, body, errors)


def test_huge_chat_document_is_refused_by_name(tmp_path):
    # chunk_chars is 4000 (see _sources): chat documents are never cut, a longer one is refused.
    long_answer = _paragraph(0) * 8  # 4800 characters
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Raconte."},
                {"role": "assistant", "content": long_answer},
            ]
        },
        {"messages": [{"role": "user", "content": "Et 2 + 2 ?"}, {"role": "assistant", "content": "4."}]},
    ]
    result = curate(load_sources(_chat_sources(tmp_path, rows)))
    assert [r["rule"] for r in result.provenance] == ["read.too_long", None]
    assert result.provenance[0]["message"] == (
        "chat document 'docs:chat:1' has 4808 characters, more than chunk_chars 4000 "
        "(chat documents are not cut: raise sources[docs].chunk_chars or split the conversation)"
    )
    with pytest.raises(UserError) as e:
        curate(load_sources(_chat_sources(tmp_path, rows, errors="fatal")))
    assert str(e.value).startswith(
        f"{tmp_path / 'chat.jsonl'}:1: chat document 'docs:chat:1' has 4808 characters"
    )
    assert str(e.value).endswith("(sources[docs].errors is 'fatal')") and "\n" not in str(e.value)


def test_chat_with_unknown_role_is_a_bad_record(tmp_path):
    rows = [{"messages": [{"role": "bot", "content": "Bonjour."}, {"role": "user", "content": "Salut."}]}]
    result = curate(load_sources(_chat_sources(tmp_path, rows)))
    assert result.provenance[0]["rule"] == "read.bad_field"
    assert (
        result.provenance[0]["message"]
        == "message 0: role 'bot' is not one of ['system', 'user', 'assistant']"
    )


def test_template_format_spec_that_does_not_fit_is_a_bad_record(tmp_path):
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"key": "a", "n": "douze", "text": _paragraph(0)}) + "\n"
        + json.dumps({"key": "b", "n": 12, "text": _paragraph(1)}) + "\n"
    )  # fmt: skip
    body = JSONL_SOURCE.replace("    id_field: key\n", '    id_field: key\n    template: "{n:d} {text}"\n')
    result = curate(load_sources(_sources(tmp_path, body)))
    assert [r["rule"] for r in result.provenance] == ["read.bad_field", None]
    assert result.provenance[0]["message"] == "template: Unknown format code 'd' for object of type 'str'"


def test_optout_text_file_hash_matches_the_document_as_read(tmp_path):
    import communs

    # A text file with Windows line breaks: the reader gives LF, and so must the opt-out hash.
    text = "\n".join(_paragraph(k) for k in range(3))
    (tmp_path / "crlf.txt").write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    body = """\
    sources:
      - id: files
        format: text
        paths: [crlf.txt]
        licence: CC-BY-4.0
        language: fr
        domain: web
        url: https://example.org
        stages: {quality: false, langid: false}
    """
    (tmp_path / "optout.jsonl").write_text("")
    assert communs.main(["data", "optout", "add", str(tmp_path / "optout.jsonl"), "--text-file",
                         str(tmp_path / "crlf.txt"), "--date", "2026-01-01"]) == 0  # fmt: skip
    entry = json.loads((tmp_path / "optout.jsonl").read_text())
    assert entry["kind"] == "sha256" and entry["value"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    sources = _sources(tmp_path, body)
    assert [r["raw_sha256"] for r in curate(load_sources(sources)).provenance] == [entry["value"]]
    sources.write_text("optout: optout.jsonl\n" + sources.read_text())
    assert [r["rule"] for r in curate(load_sources(sources)).provenance] == ["optout.sha256"]


def test_text_files_read_as_hf_datasets_text_builder_reads_them(tmp_path):
    """Text files are read in the workers with plain Python: the same text as HF's `text` builder
    (sample_by=document) gave, line breaks CRLF/CR → LF, a BOM and U+2028 kept as they are."""
    import datasets

    from corpus.readers import read_text_file

    raw = "\ufeffPremière ligne\r\ndeuxième\rtroisième\u2028même ligne\n\nfin sans saut".encode()
    path = tmp_path / "mixed.txt"
    path.write_bytes(raw)
    ds = datasets.load_dataset(
        "text", data_files=[str(path)], sample_by="document", streaming=True, split="train"
    )
    assert read_text_file(path) == "\n".join(ex["text"] for ex in ds)
    assert (
        read_text_file(path) == "\ufeffPremière ligne\ndeuxième\ntroisième\u2028même ligne\n\nfin sans saut"
    )


# ------------------------------------------------------------------ structured records, decoded in workers


def _nested_table(n: int):
    """Records with nested columns (lists, structs, lists of structs), nulls in every column, unicode
    (accents, emoji, U+2028), and typed values HF `datasets` maps (int8, float32, timestamps, decimals,
    a dictionary-encoded column)."""
    import datetime
    import decimal

    import pyarrow as pa

    def col(f, type_):
        return pa.array([None if i % 7 == 3 else f(i) for i in range(n)], type_)

    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.table(
        {
            "key": col(lambda i: f"k{i}", pa.string()),
            "text": col(lambda i: f"{_paragraph(i % 5)} — été {i} 😀\u2028Ωμέγα", pa.string()),
            "n": col(lambda i: i - 20, pa.int8()),
            "score": col(lambda i: float("nan") if i == 5 else i / 3, pa.float32()),
            "flag": col(lambda i: i % 2 == 0, pa.bool_()),
            "tags": col(lambda i: [f"t{j}" for j in range(i % 3)] + [None], pa.list_(pa.string())),
            "turns": col(
                lambda i: [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": None}],
                pa.list_(turn),
            ),  # fmt: skip
            "meta": col(
                lambda i: {"authors": [f"Zoé {i}"], "page": {"n": i, "ratio": None}},
                pa.struct(
                    [
                        ("authors", pa.list_(pa.string())),
                        ("page", pa.struct([("n", pa.int64()), ("ratio", pa.float64())])),
                    ]
                ),
            ),  # fmt: skip
            "when": col(
                lambda i: datetime.datetime(2020, 1, 1) + datetime.timedelta(seconds=i), pa.timestamp("us")
            ),
            "price": col(lambda i: decimal.Decimal(f"{i}.25"), pa.decimal128(10, 2)),
            "lang": col(lambda i: ("fr", "en", "de")[i % 3], pa.string()).dictionary_encode(),
            "nothing": pa.nulls(n),
        }
    )


def _same(a, b) -> bool:
    """Equal values of the same Python types, all the way down (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and a != a:
        return b != b
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _write_structured(tmp: Path, table) -> dict[str, Path]:
    """The table as parquet (row groups of 7 rows), an arrow IPC stream and an IPC file (batches of 9)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"parquet": tmp / "part.parquet", "stream": tmp / "stream.arrow", "file": tmp / "file.arrow"}
    pq.write_table(table, paths["parquet"], row_group_size=7)
    for kind, new in (("stream", pa.ipc.new_stream), ("file", pa.ipc.new_file)):
        with pa.OSFile(str(paths[kind]), "wb") as f, new(f, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=9):
                writer.write_batch(batch)
    return paths


def _structured_source(tmp: Path, fmt: str, path: Path):
    body = f"""\
    sources:
      - {{id: docs, format: {fmt}, paths: [{path.name}], licence: CC-BY-4.0, language: fr, domain: web,
         url: https://example.org}}
    """
    return load_sources(_sources(tmp, body)).sources[0]


@pytest.mark.parametrize("columns", ["plain", "cast"])
@pytest.mark.parametrize("kind", ["parquet", "stream", "file"])
def test_structured_units_decode_to_the_records_of_hf_datasets_streaming(
    tmp_path, monkeypatch, kind, columns
):
    """The main process sends row ranges only; the records a worker decodes from them equal, value and
    type, what `datasets.load_dataset(builder, data_files=[p], split="train", streaming=True)` gives,
    numbered from 1 over the file, whether a unit packs several parts or cuts one into ranges; both
    when the worker takes the table's values as they are (`plain`: HF's features would change nothing)
    and when it casts and decodes them with HF's features (`cast`: a dictionary column, cast to text)."""
    import pickle

    import datasets

    import corpus.readers as readers_mod

    table = _nested_table(60)
    if columns == "plain":
        table = table.drop_columns(["lang"])
    path = _write_structured(tmp_path, table)[kind]
    fmt = "parquet" if kind == "parquet" else "arrow"
    source = _structured_source(tmp_path, fmt, path)
    expected = list(datasets.load_dataset(fmt, data_files=[str(path)], split="train", streaming=True))
    assert len(expected) == 60
    sizes = {"packed": 1 << 30, "ranges": 900}  # one unit of all parts; parts cut into row ranges
    for case, unit_bytes in sizes.items():
        monkeypatch.setattr(readers_mod, "UNIT_BYTES", unit_bytes)
        units = list(readers_mod.read_units(source, tmp_path))
        assert {u.kind for u in units} == {"table"}
        assert {u.features is None for u in units} == {columns == "plain"}
        # Cheap descriptors: row ranges of the file (and the features to cast to), not records.
        assert all(len(pickle.dumps(u)) < (600 if columns == "plain" else 3000) for u in units)
        ranges = [item for u in units for item in u.items]
        if case == "packed":
            assert len(units) == 1 and len(ranges) == (9 if kind == "parquet" else 7)
        else:
            assert len(units) > 9 and any(start > 0 for _, _, start, _ in ranges)
        got = [record for u in units for record in readers_mod.unit_records(u)]
        assert [n for n, _ in got] == list(range(1, 61))
        for (n, record), reference in zip(got, expected):
            assert _same(record, reference), (case, n, record, reference)


def test_hf_dataset_of_local_parquet_files_is_cut_in_units_numbered_over_the_split(tmp_path, monkeypatch):
    """A dataset folder of parquet files (as the HF cache holds them): `table` units over its files,
    records numbered from 1 over the whole split in HF's file order, equal to HF's stream."""
    import datasets
    import pyarrow.parquet as pq

    import corpus.readers as readers_mod

    table = _nested_table(45)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for k in range(3):
        pq.write_table(table.slice(15 * k, 15), tmp_path / "hub" / "data" / f"train-{k:05d}-of-00003.parquet",
                       row_group_size=4)  # fmt: skip
    body = f"""\
    sources:
      - {{id: hf, hf_dataset: {{name: {tmp_path / "hub"}}}, licence: CC-BY-4.0, language: fr, domain: web,
         url: https://example.org}}
    """
    source = load_sources(_sources(tmp_path, body)).sources[0]
    monkeypatch.setattr(readers_mod, "UNIT_BYTES", 2000)
    units = list(readers_mod.read_units(source, tmp_path))
    assert {u.kind for u in units} == {"table"} and {u.path for u in units} == {f"hf:{tmp_path / 'hub'}"}
    assert len({u.file for u in units}) == 3
    got = [record for u in units for record in readers_mod.unit_records(u)]
    expected = list(datasets.load_dataset(str(tmp_path / "hub"), split="train", streaming=True))
    assert [n for n, _ in got] == list(range(1, 46))
    assert all(_same(record, reference) for (_, record), reference in zip(got, expected))


def test_hf_dataset_in_the_datasets_cache_is_cut_in_units_as_hf_streams_it(tmp_path, monkeypatch):
    """A hub dataset downloaded before and read offline from the datasets cache (HF's `Cache` builder:
    arrow streams under <cache>/<user>___<name>/<config>/<version>/<hash>/): `table` units whose records
    equal HF's stream, numbered from 1 over the split."""
    import datasets
    import pyarrow as pa

    import corpus.readers as readers_mod

    table = _nested_table(40)
    folder = tmp_path / "cache" / "someone___corpus" / "default" / "0.0.0" / "0123abcd"
    folder.mkdir(parents=True)
    info = datasets.DatasetInfo(
        features=datasets.Features.from_arrow_schema(table.schema),
        dataset_name="corpus",
        config_name="default",
    )
    info.splits = datasets.SplitDict()
    info.splits.add(datasets.SplitInfo("train", num_examples=40, dataset_name="corpus"))
    info.write_to_directory(str(folder))
    with (
        pa.OSFile(str(folder / "corpus-train.arrow"), "wb") as f,
        pa.ipc.new_stream(f, table.schema) as writer,
    ):
        for batch in table.to_batches(max_chunksize=7):
            writer.write_batch(batch)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    body = """\
    sources:
      - {id: hf, hf_dataset: {name: someone/corpus}, licence: CC-BY-4.0, language: fr, domain: web,
         url: https://example.org}
    """
    source = load_sources(_sources(tmp_path, body)).sources[0]
    monkeypatch.setattr(readers_mod, "UNIT_BYTES", 2000)
    units = list(readers_mod.read_units(source, tmp_path))
    assert {u.kind for u in units} == {"table"} and len(units) > 6
    assert {(u.path, u.file) for u in units} == {("hf:someone/corpus", str(folder / "corpus-train.arrow"))}
    got = [record for u in units for record in readers_mod.unit_records(u)]
    expected = list(datasets.load_dataset("someone/corpus", split="train", streaming=True))
    assert [n for n, _ in got] == list(range(1, 41))
    assert all(_same(record, reference) for (_, record), reference in zip(got, expected))


def test_json_file_is_one_worker_unit_or_streamed_here_past_json_unit_bytes(tmp_path, monkeypatch):
    """A json array is one `json` unit (decoded by the worker); past JSON_UNIT_BYTES it is streamed in the
    main process in `records` batches: the same records, numbered from 1, as HF's json builder gives."""
    import datasets

    import corpus.readers as readers_mod

    rows = [{"text": _paragraph(k % 5), "n": k, "tags": [f"é{k}"] if k % 3 else None} for k in range(300)]
    (tmp_path / "arr.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    source = _structured_source(tmp_path, "json", tmp_path / "arr.json")
    expected = list(
        datasets.load_dataset("json", data_files=[str(tmp_path / "arr.json")], split="train", streaming=True)
    )
    whole = list(readers_mod.read_units(source, tmp_path))
    assert [(u.kind, u.items) for u in whole] == [("json", [])]
    monkeypatch.setattr(readers_mod, "JSON_UNIT_BYTES", 1000)
    streamed = list(readers_mod.read_units(source, tmp_path))
    assert [u.kind for u in streamed] == ["records", "records"]  # 256 + 44 records
    for units in (whole, streamed):
        got = [record for u in units for record in readers_mod.unit_records(u)]
        assert [n for n, _ in got] == list(range(1, 301))
        assert all(_same(record, reference) for (_, record), reference in zip(got, expected))
