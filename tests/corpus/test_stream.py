"""The streamed pipeline: bounded look-ahead, the same files for any number of workers, the dedup
index against datasketch's LSH, and the split corrections written back."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

import corpus.pipeline as pipeline_mod
import corpus.readers as readers_mod
from common.errors import UserError
from corpus.pipeline import WorkerPool, curate_to, open_pool
from corpus.sources import load_sources
from corpus.splits import assign_splits, split_corrections

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"
NOVEL = (DEMO / "roman19" / "txt" / "Maupassant_UneVie-rd0056.txt").read_text(encoding="utf-8")


def _square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_map_ordered_pulls_at_most_a_window_ahead(workers):
    pulled = []

    def tasks():
        for i in range(60):
            pulled.append(i)
            yield i, i

    with WorkerPool(workers, {}) as pool:
        ahead, results = [], []
        for context, value in pool.map_ordered(_square, tasks()):
            results.append((context, value))
            ahead.append(len(pulled) - len(results))
    assert results == [(i, i * i) for i in range(60)]
    # workers=1 runs each task as it is pulled; with a pool, `window` are in flight (and the
    # next one is submitted before a result is handed out).
    assert max(ahead) == (0 if workers == 1 else pool.window)


def _write_stream_corpus(root: Path, n_lines: int = 0) -> Path:
    """Near and exact duplicates, bad lines, chat documents, a long text cut into chunks."""
    root.mkdir(parents=True, exist_ok=True)
    paragraphs = [NOVEL[4000 + 900 * k : 4000 + 900 * k + 800] for k in range(40)]
    lines = []
    for k, text in enumerate(paragraphs):
        lines.append(json.dumps({"key": f"p{k}", "text": text}, ensure_ascii=False))
        if k % 5 == 0:
            lines.append(json.dumps({"key": f"x{k}", "text": text}, ensure_ascii=False))  # exact copy
        if k % 7 == 0:
            near = text.replace(" la ", " le ", 1).replace(" de ", " du ", 1)
            lines.append(json.dumps({"key": f"n{k}", "text": near}, ensure_ascii=False))  # near copy
        if k % 9 == 0:
            lines.append('{"key": "broken", "text": "unterminated')
        if k % 11 == 0:
            lines.append(json.dumps({"key": f"p{k}", "text": paragraphs[(k + 1) % 40]}))  # duplicate id
    lines += [json.dumps({"key": f"f{k}", "text": paragraphs[k % 40] + f" ({k})"}) for k in range(n_lines)]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "book-bk1.txt").write_text(NOVEL[:30000], encoding="utf-8")
    chats = []
    for k in range(30):
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": f"Combien font {k} et {k + 3} ?"},
                    {"role": "assistant", "content": f"{k} + {k + 3} = {2 * k + 3}. On ajoute les unités."},
                ]
            }
        )
    chats.append({"messages": [{"role": "robot", "content": "bip"}]})  # bad role
    (root / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n", encoding="utf-8")
    sources = root / "sources.yaml"
    sources.write_text(
        textwrap.dedent(
            """\
            seed: 3
            release: {licence: Apache-2.0}
            pipeline: {chunk_chars: 3000}
            split: {val_fraction: 0.2}
            sources:
              - {id: docs, format: jsonl, paths: [docs.jsonl], id_field: key, licence: CC-BY-4.0, language: fr,
                 domain: web, url: https://example.org, stages: {quality: {min_words: 20}}}
              - {id: book, format: text, paths: ["*.txt"], id_pattern: '-(bk\\d+)\\.txt$', licence: public-domain,
                 language: fr, domain: literature, url: https://example.org}
              - {id: chat, kind: chat, format: jsonl, paths: [chat.jsonl], licence: MIT, language: [fr, en],
                 domain: education, url: https://example.org, stages: {quality: false, langid: false}}
            """
        ),
        encoding="utf-8",
    )
    return sources


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}


def _curate_with_1_and_2_workers(sf, tmp_path: Path) -> dict:
    """Curate into tmp_path/w1 and tmp_path/w2; the files and the results must be the same."""
    results = {}
    for workers in (1, 2):
        with open_pool(sf, workers) as pool:
            results[workers] = curate_to(sf, tmp_path / f"w{workers}", pool)
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")
    assert results[1] == results[2]
    return results


def test_same_files_for_1_and_2_workers_and_splits_as_assign_splits(tmp_path):
    sf = load_sources(_write_stream_corpus(tmp_path / "corpus"))
    results = _curate_with_1_and_2_workers(sf, tmp_path)

    records = [json.loads(line) for line in (tmp_path / "w1" / "provenance.jsonl").open()]
    rules = {r["rule"] for r in records}
    assert {
        "dedup.exact",
        "dedup.near",
        "read.malformed_json",
        "read.duplicate_id",
        "read.bad_field",
    } <= rules
    assert next(r for r in records if r["id"] == "docs:x0")["duplicate_of"] == "docs:p0"
    assert next(r for r in records if r["id"] == "docs:n7")["duplicate_of"] == "docs:p7"
    assert next(r for r in records if r["rule"] == "read.malformed_json")["where"].endswith("docs.jsonl:4")
    for sid in ("docs", "book", "chat"):
        kept = [r for r in records if r["source"] == sid and r["fate"] == "kept"]
        rows = [json.loads(line) for line in (tmp_path / "w1" / "curated" / f"{sid}.jsonl").open()]
        assert [r["id"] for r in rows] == [r["id"] for r in kept]
        # The splits written as documents streamed out equal the whole-source rule.
        expected = assign_splits([r["id"] for r in kept], 3, 0.2, [r["parent"] for r in kept])
        assert [r["split"] for r in kept] == [r["split"] for r in rows] == expected
        counts = results[1].split_counts[sid]
        assert counts == {"train": expected.count("train"), "val": expected.count("val")}
        assert results[1].counts[sid]["kept"] == len(kept)
    # The single long document (one parent, cut into chunks) is all train, corrected if need be.
    assert results[1].split_counts["book"]["val"] == 0 and results[1].split_counts["book"]["train"] >= 8
    assert "messages" in rows[0]


def test_split_corrections_rewrite_only_what_they_change(tmp_path):
    sources = _write_stream_corpus(tmp_path / "corpus")
    # Nearly everything is tentatively val: the source-level rule moves one parent back to train.
    sources.write_text(sources.read_text().replace("val_fraction: 0.2", "val_fraction: 0.999"))
    sf = load_sources(sources)
    with open_pool(sf, 1) as pool:
        result = curate_to(sf, tmp_path / "out", pool)
    records = [json.loads(line) for line in (tmp_path / "out" / "provenance.jsonl").open()]
    for sid in ("docs", "book", "chat"):
        kept = [r for r in records if r["source"] == sid and r["fate"] == "kept"]
        expected = assign_splits([r["id"] for r in kept], 3, 0.999, [r["parent"] for r in kept])
        assert [r["split"] for r in kept] == expected
        assert "train" in expected
        rows = [json.loads(line) for line in (tmp_path / "out" / "curated" / f"{sid}.jsonl").open()]
        assert [(r["id"], r["split"]) for r in rows] == [(r["id"], r["split"]) for r in kept]
        assert result.split_counts[sid]["train"] == expected.count("train")
    # Records are written as json.dumps(sort_keys) lines, corrected ones too.
    for line in (tmp_path / "out" / "provenance.jsonl").read_text(encoding="utf-8").splitlines():
        assert line == json.dumps(json.loads(line), ensure_ascii=False, sort_keys=True)
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_the_reader_is_pulled_lazily_with_bounded_look_ahead(tmp_path, monkeypatch):
    n_lines = 400
    sf = load_sources(_write_stream_corpus(tmp_path / "corpus", n_lines=n_lines))
    monkeypatch.setattr(readers_mod, "UNIT_BYTES", 1)  # one JSON line per unit
    pulled = {"units": 0}
    written = {"records": 0}
    look_ahead = []
    real_units, real_done = pipeline_mod.read_units, pipeline_mod._SourceWriter.done

    def counting_units(source, base):
        for unit in real_units(source, base):
            if source.id == "docs":
                pulled["units"] += 1
                look_ahead.append(pulled["units"] - written["records"])
            yield unit

    def counting_done(self, *args):
        if self.source.id == "docs":
            written["records"] += 1
        return real_done(self, *args)

    def counting_other(name):
        real = getattr(pipeline_mod._SourceWriter, name)

        def wrapped(self, *args):
            if self.source.id == "docs":
                written["records"] += 1
            return real(self, *args)

        return wrapped

    monkeypatch.setattr(pipeline_mod, "read_units", counting_units)
    monkeypatch.setattr(pipeline_mod._SourceWriter, "done", counting_done)
    monkeypatch.setattr(pipeline_mod._SourceWriter, "problem", counting_other("problem"))
    monkeypatch.setattr(pipeline_mod._SourceWriter, "removed", counting_other("removed"))
    with open_pool(sf, 2) as pool:
        curate_to(sf, tmp_path / "out", pool)
        window = pool.window
    assert pulled["units"] > n_lines
    # Two stages of `window` tasks each, one unit (one record) per task, and the one being pulled.
    assert max(look_ahead) <= 2 * window + 1 < n_lines // 10


def test_resume_encodes_only_what_finished_shards_lack_and_a_rerun_redoes_nothing(
    corpus_dir, small_tokenizer, tmp_path, monkeypatch
):
    import corpus.prepare as prepare_mod

    clean = prepare_mod.prepare(corpus_dir, tmp_path / "clean", tokenizer=small_tokenizer, workers=2)
    real_write, real_encode = prepare_mod.write_shard, prepare_mod._encode_rows
    calls = {"write": 0, "encoded": 0}

    def crash_on_third(prefix, docs):
        calls["write"] += 1
        if calls["write"] == 3:
            raise RuntimeError("simulated crash while writing a shard")
        return real_write(prefix, docs)

    def counting_encode(task):
        out = real_encode(task)
        calls["encoded"] += len(out)
        return out

    out = tmp_path / "crashed"
    monkeypatch.setattr(prepare_mod, "write_shard", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_mod.prepare(corpus_dir, out, tokenizer=small_tokenizer, workers=1)
    assert not (out / ".curation.staging").exists() and (out / "curated" / "state.json").is_file()
    finished = [json.loads(p.read_text()) for p in sorted((out / "shards").rglob("0*.json"))]
    assert len(finished) == 2
    monkeypatch.setattr(prepare_mod, "write_shard", real_write)
    monkeypatch.setattr(prepare_mod, "_encode_rows", counting_encode)
    resumed = prepare_mod.prepare(corpus_dir, out, tokenizer=small_tokenizer, workers=1)
    assert resumed == clean
    total = sum(src["counts"]["kept"] for src in clean["sources"].values())
    assert calls["encoded"] == total - sum(shard["n_docs"] for shard in finished)  # not re-encoded

    def must_not_run(*args, **kwargs):
        raise AssertionError("a re-run with nothing changed redid work")

    monkeypatch.setattr(prepare_mod, "curate_to", must_not_run)
    monkeypatch.setattr(prepare_mod, "_encode_rows", must_not_run)
    assert prepare_mod.prepare(corpus_dir, out, tokenizer=small_tokenizer, workers=2) == clean
    assert (out / "manifest.json").read_bytes() == (tmp_path / "clean" / "manifest.json").read_bytes()


def _write_tiny_sources(root: Path) -> Path:
    """Six one-unit jsonl sources (one holding a copy of another's document), an empty one (no unit at
    all), and a one-file text source (a single parent: its split is corrected when it ends)."""
    root.mkdir(parents=True, exist_ok=True)
    paragraphs = [NOVEL[4000 + 900 * k : 4000 + 900 * k + 800] for k in range(18)]
    entries = []
    for k in range(6):
        texts = paragraphs[3 * k : 3 * k + 3] + ([paragraphs[4]] if k == 3 else [])  # s3 copies s1's
        lines = [json.dumps({"key": f"d{j}", "text": t}, ensure_ascii=False) for j, t in enumerate(texts)]
        (root / f"s{k}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        entries.append(f"{{id: s{k}, format: jsonl, paths: [s{k}.jsonl], id_field: key}}")
        if k == 2:
            (root / "empty.jsonl").write_text("", encoding="utf-8")
            entries.append("{id: empty, format: jsonl, paths: [empty.jsonl]}")
    (root / "book.txt").write_text(NOVEL[:9000], encoding="utf-8")
    entries.insert(4, "{id: book, format: text, paths: [book.txt]}")
    common = "licence: CC-BY-4.0, language: fr, domain: web, url: https://example.org"
    listed = "\n".join(f"  - {e[:-1]}, {common}}}" for e in entries)
    sources = root / "sources.yaml"
    sources.write_text(
        "seed: 3\nrelease: {licence: Apache-2.0}\npipeline: {chunk_chars: 3000}\n"
        f"split: {{val_fraction: 0.5}}\nsources:\n{listed}\n",
        encoding="utf-8",
    )
    return sources


class _RecordingPool:
    """A multiprocessing pool that notes, in the main process, which source each submitted task is for."""

    def __init__(self, real, events: list):
        self.real, self.events = real, events

    def apply_async(self, fn, args):
        arg = args[0]
        source = arg.source if fn is pipeline_mod._before_dedup else arg[0][0].source
        self.events.append(("submit", fn.__name__, source))
        return self.real.apply_async(fn, args)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_the_next_sources_tasks_are_in_flight_before_a_source_ends(tmp_path, monkeypatch):
    sf = load_sources(_write_tiny_sources(tmp_path / "corpus"))
    events: list[tuple[str, str, str]] = []  # (submit | write | finish, stage or method, source id)

    def recording(name):
        real = getattr(pipeline_mod._SourceWriter, name)

        def wrapped(self, *args):
            events.append(("finish" if name == "finish" else "write", name, self.source.id))
            return real(self, *args)

        return wrapped

    for name in ("problem", "removed", "done", "finish"):
        monkeypatch.setattr(pipeline_mod._SourceWriter, name, recording(name))
    with open_pool(sf, 2) as pool:
        pool.pool = _RecordingPool(pool.pool, events)
        curate_to(sf, tmp_path / "out", pool)
        pool.pool = pool.pool.real
    ids = [s.id for s in sf.sources]
    assert [sid for kind, _, sid in events if kind == "finish"] == ids  # the empty source too, in order
    with_units = [sid for sid in ids if sid != "empty"]
    for stage in ("_before_dedup", "_after_dedup"):
        # One task per unit, in corpus order (the empty source has none).
        assert [sid for kind, name, sid in events if kind == "submit" and name == stage] == with_units
    for sid, nxt in zip(with_units, with_units[1:], strict=False):
        last_written = max(
            i for i, (kind, _, source) in enumerate(events) if kind == "write" and source == sid
        )
        for stage in ("_before_dedup", "_after_dedup"):
            # Source `nxt` is in the pool before the consumer has written source `sid`'s last record
            # (one stream; each source used to drain the pool before the next one was read).
            assert events.index(("submit", stage, nxt)) < last_written, (stage, sid, nxt)


def test_tiny_sources_give_the_same_files_for_1_and_2_workers(tmp_path):
    sf = load_sources(_write_tiny_sources(tmp_path / "corpus"))
    results = _curate_with_1_and_2_workers(sf, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "w1" / "provenance.jsonl").open()]
    assert [r["source"] for r in records] == sorted(
        (r["source"] for r in records), key=[s.id for s in sf.sources].index
    )
    assert next(r for r in records if r["id"] == "s3:d3")["duplicate_of"] == "s1:d1"  # across sources
    assert results[1].counts["empty"] == {"read": 0, "kept": 0, "removed": {}, "pii": {}, "chars": 0}
    assert results[1].split_counts["empty"] == {"train": 0, "val": 0}
    assert (tmp_path / "w1" / "curated" / "empty.jsonl").read_bytes() == b""
    corrected = []
    for s in sf.sources:
        kept = [r for r in records if r["source"] == s.id and r["fate"] == "kept"]
        expected = assign_splits([r["id"] for r in kept], 3, 0.5, [r["parent"] for r in kept])
        assert [r["split"] for r in kept] == expected
        assert results[1].split_counts[s.id] == {
            "train": expected.count("train"),
            "val": expected.count("val"),
        }
        if split_corrections({r["parent"] for r in kept}, 3, 0.5):
            corrected.append(s.id)
    # Sources rewritten at their end while the next ones were in flight: the one-file source (one
    # parent cut into chunks, tentatively val, all train) and three whose parents fell on one side.
    assert corrected == ["s1", "s2", "book", "s3"]
    book = [r for r in records if r["source"] == "book"]
    assert len(book) == 4 and {r["split"] for r in book} == {"train"}


def test_shard_encoding_is_one_stream_over_the_sources(tmp_path, small_tokenizer, monkeypatch):
    """Encoding (prepare's shard step) pulls the next source's rows into the pool before it finishes a
    source's shards, as curation does; the shards equal those of one worker."""
    import corpus.prepare as prepare_mod

    sources = _write_tiny_sources(tmp_path / "corpus")
    # prepare refuses a source with nothing to train on: leave the empty one out.
    text = sources.read_text(encoding="utf-8")
    sources.write_text("\n".join(x for x in text.split("\n") if "id: empty" not in x), encoding="utf-8")
    events: list[tuple[str, str]] = []  # (submit | finish, source id)
    real_map, real_finish = WorkerPool.map_ordered, prepare_mod._ShardWriter.finish

    def map_ordered(self, fn, tasks):
        def pulled():
            for context, arg in tasks:
                if fn is prepare_mod._encode_rows:  # context: (source id, bytes)
                    events.append(("submit", context[0] if isinstance(context, tuple) else None))
                yield context, arg

        return real_map(self, fn, pulled())

    def finish(self):
        if ("finish", self.folder.parent.name) not in events:
            events.append(("finish", self.folder.parent.name))
        return real_finish(self)

    monkeypatch.setattr(WorkerPool, "map_ordered", map_ordered)
    monkeypatch.setattr(prepare_mod._ShardWriter, "finish", finish)
    two = prepare_mod.prepare(sources, tmp_path / "w2", tokenizer=small_tokenizer, workers=2)
    ids = [s.id for s in load_sources(sources).sources]
    assert [sid for kind, sid in events if kind == "finish"] == ids  # every source, in order
    encoded = [sid for kind, sid in events if kind == "submit"]
    assert encoded == ids  # one task per (small) curated file
    for sid, nxt in zip(encoded, encoded[1:]):
        # Source `nxt` is in the pool before source `sid`'s shards are finished (each source used to
        # drain the pool before the next one was read).
        assert events.index(("submit", nxt)) < events.index(("finish", sid)), (sid, nxt)
    monkeypatch.undo()
    assert prepare_mod.prepare(sources, tmp_path / "w1", tokenizer=small_tokenizer, workers=1) == two


# ------------------------------------------------- structured sources: units decoded in the workers


def _old_read_units(source, base):
    """The reader as it was before structured units were decoded in the workers: json, parquet, arrow
    and HF datasets streamed by HF `datasets` in the main process, sent as batches of records."""
    import datasets

    if source.generator is None and (
        source.hf_dataset is not None or source.format in ("json", "parquet", "arrow")
    ):
        if source.hf_dataset is not None:
            hf = source.hf_dataset
            stream = datasets.load_dataset(hf["name"], hf["config"], split=hf["split"], streaming=True)
            yield from readers_mod._streamed_units(source, f"hf:{hf['name']}", stream)
            return
        for path in source.files:
            stream = datasets.load_dataset(
                source.format, data_files=[str(path)], split="train", streaming=True
            )
            yield from readers_mod._streamed_units(source, readers_mod._rel(path), stream)
        return
    yield from readers_mod.read_units(source, base)


def _write_structured_corpus(root: Path) -> Path:
    """Parquet (row groups of 6 records, with an id column and nested metadata), chat records in an
    arrow IPC stream, a json array, and an HF dataset folder of two parquet files (ids by record number
    over the split); null, empty and duplicated texts among them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    paragraphs = [NOVEL[4000 + 900 * k : 4000 + 900 * k + 800] for k in range(60)]
    texts = [paragraphs[k] for k in range(40)]
    texts[4], texts[9], texts[13] = None, "   ", texts[2]  # null → read.bad_field; empty; exact copy
    texts[17] = texts[6].replace(" la ", " le ", 1)  # near copy
    meta = pa.struct([("authors", pa.list_(pa.string())), ("year", pa.int32())])
    table = pa.table(
        {
            "key": [f"p{k}" for k in range(40)],
            "text": pa.array(texts, pa.string()),
            "author": [None if k % 5 == 0 else f"Zoé Œuvre {k % 4}" for k in range(40)],
            "meta": pa.array([{"authors": [f"a{k}", None], "year": 1850 + k} for k in range(40)], meta),
        }
    )
    pq.write_table(table, root / "docs.parquet", row_group_size=6)
    chats = [
        [{"role": "user", "content": f"Combien font {k} et {k + 3} ?"},
         {"role": "assistant", "content": f"{k} + {k + 3} = {2 * k + 3}. On ajoute les unités."}]
        for k in range(25)
    ]  # fmt: skip
    chats[7] = [{"role": "robot", "content": "bip"}]  # bad role
    chat_table = pa.table({"messages": chats})
    with pa.OSFile(str(root / "chat.arrow"), "wb") as f, pa.ipc.new_stream(f, chat_table.schema) as writer:
        for batch in chat_table.to_batches(max_chunksize=4):
            writer.write_batch(batch)
    (root / "extra.json").write_text(
        json.dumps(
            [{"text": paragraphs[40 + k]} if k != 2 else {"body": "x"} for k in range(6)], ensure_ascii=False
        ),
        encoding="utf-8",
    )
    (root / "hub" / "data").mkdir(parents=True)
    hub = pa.table({"text": paragraphs[46:60] + [paragraphs[1]]})  # the last one a copy from docs
    pq.write_table(hub.slice(0, 8), root / "hub" / "data" / "train-00000-of-00002.parquet", row_group_size=3)
    pq.write_table(hub.slice(8), root / "hub" / "data" / "train-00001-of-00002.parquet", row_group_size=3)
    common = "licence: CC-BY-4.0, language: fr, domain: web, url: https://example.org"
    sources = root / "sources.yaml"
    sources.write_text(
        textwrap.dedent(
            f"""\
            seed: 3
            release: {{licence: Apache-2.0}}
            pipeline: {{chunk_chars: 3000}}
            split: {{val_fraction: 0.3}}
            tokenizer: {{vocab_size: 400, sample_bytes_per_source: 100000}}
            shards: {{max_tokens: 4096}}
            sources:
              - {{id: docs, format: parquet, paths: [docs.parquet], id_field: key, meta_fields: {{author: author}},
                 stages: {{quality: {{min_words: 20}}}}, {common}}}
              - {{id: chat, kind: chat, format: arrow, paths: [chat.arrow], stages: {{quality: false, langid: false}},
                 {common}}}
              - {{id: extra, format: json, paths: [extra.json], {common}}}
              - {{id: hub, hf_dataset: {{name: {root / "hub"}}}, {common}}}
            """
        ),
        encoding="utf-8",
    )
    return sources


@pytest.mark.slow  # two worker processes, prepare end to end
def test_structured_sources_give_the_files_of_the_main_process_reader_for_1_and_2_workers(
    tmp_path, monkeypatch, small_tokenizer
):
    """Parquet / arrow / json / HF-dataset records decoded in the workers give byte for byte the
    provenance, curated files and manifest of the reader that streamed them in the main process
    (`file:record n` and default ids numbered over the whole file, or split), for 1 and 2 workers."""
    import corpus.prepare as prepare_mod

    sources = _write_structured_corpus(tmp_path / "corpus")
    sf = load_sources(sources)
    monkeypatch.setattr(readers_mod, "UNIT_BYTES", 2500)  # several units per file, row groups cut
    kinds = {s.id: {u.kind for u in readers_mod.read_units(s, sources.parent)} for s in sf.sources}
    assert kinds == {"docs": {"table"}, "chat": {"table"}, "extra": {"json"}, "hub": {"table"}}
    assert len(list(readers_mod.read_units(sf.sources[0], sources.parent))) > 7  # more than the row groups
    new = _curate_with_1_and_2_workers(sf, tmp_path)
    monkeypatch.setattr(pipeline_mod, "read_units", _old_read_units)
    with open_pool(sf, 1) as pool:
        old = curate_to(sf, tmp_path / "old", pool)
    assert _files(tmp_path / "old") == _files(tmp_path / "w1") and old == new[1]
    records = [json.loads(line) for line in (tmp_path / "w1" / "provenance.jsonl").open()]
    problems = {r["id"]: (r["rule"], r["where"]) for r in records if r.get("where")}
    root = str(tmp_path / "corpus")
    assert problems == {
        "docs:p4": ("read.bad_field", f"{root}/docs.parquet:record 5"),  # a null text
        "docs:p9": ("read.empty", f"{root}/docs.parquet:record 10"),
        "chat:chat:8": ("read.bad_field", f"{root}/chat.arrow:record 8"),
        "extra:extra:3": (
            "read.bad_field",
            f"{root}/extra.json:record 3",
        ),  # HF fills a missing key with None
    }
    rules = {r["id"]: r["rule"] for r in records}
    assert rules["docs:p13"] == "dedup.exact" and rules["docs:p17"] == "dedup.near"
    assert rules["hub:hub:15"] == "dedup.exact" and "hub:hub:9" in rules  # numbered over both files
    # prepare (curation, shards, manifest) over both readers: the same manifest, byte for byte.
    prepare_mod.prepare(sources, tmp_path / "data-old", tokenizer=small_tokenizer, workers=1)
    monkeypatch.undo()
    prepare_mod.prepare(sources, tmp_path / "data-new", tokenizer=small_tokenizer, workers=2)
    for name in ("manifest.json", "provenance.jsonl"):
        assert (tmp_path / "data-old" / name).read_bytes() == (tmp_path / "data-new" / name).read_bytes()


def _corrupt_page(path: Path, row_group: int) -> None:
    """Overwrite the header of a row group's first data page (the footer stays readable)."""
    import pyarrow.parquet as pq

    offset = pq.read_metadata(path).row_group(row_group).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("second", ["text", "parquet"])
def test_a_later_source_that_cannot_be_read_fails_after_an_earlier_fatal_problem(tmp_path, workers, second):
    """The error is the first in corpus order, whatever the look-ahead has already started reading. The
    second source fails in the main process (`text`: a file name its id_pattern does not match) or in
    the worker that decodes it (`parquet`: the footer reads, the third row group does not), naming the
    file in one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.jsonl").write_text('{"text": "unterminated\n', encoding="utf-8")
    where = "licence: MIT, language: fr, domain: web, url: https://example.org"
    if second == "text":
        (root / "bad-name.txt").write_text(NOVEL[:2000], encoding="utf-8")
        b = f"""{{id: b, format: text, paths: ["*.txt"], id_pattern: '-(bk\\d+)\\.txt$', {where}}}"""
    else:
        texts = [NOVEL[4000 + 900 * k : 4000 + 900 * k + 800] for k in range(12)]
        pq.write_table(pa.table({"text": texts}), root / "bad.parquet", row_group_size=4)
        _corrupt_page(root / "bad.parquet", 2)
        b = f"{{id: b, format: parquet, paths: [bad.parquet], {where}}}"
    (root / "sources.yaml").write_text(
        "release: {licence: Apache-2.0}\nsources:\n"
        f"  - {{id: a, format: jsonl, paths: [a.jsonl], errors: fatal, {where}}}\n  - {b}\n",
        encoding="utf-8",
    )
    sf = load_sources(root / "sources.yaml")
    with open_pool(sf, workers) as pool, pytest.raises(UserError, match=r"a\.jsonl:1: malformed JSON"):
        curate_to(sf, tmp_path / "out", pool)
    # Alone, the second source's error is raised (after the units before it).
    sf.sources = sf.sources[1:]
    with open_pool(sf, workers) as pool, pytest.raises(UserError) as e:
        curate_to(sf, tmp_path / "out2", pool)
    if second == "text":
        assert "does not match the file name" in str(e.value)
    else:
        assert str(e.value).startswith(
            f"{root / 'bad.parquet'}: cannot read as parquet: Couldn't deserialize thrift: don't know what type: "
        )
        assert str(e.value).isprintable()  # the raw byte quoted by pyarrow is escaped
