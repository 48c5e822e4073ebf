"""Bad input: each case is reported as file:line (or file:byte), counted, and skipped or fatal by policy."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from communs import UserError
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
