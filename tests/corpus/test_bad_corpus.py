"""A corpus that leaves nothing to train on is refused, by name, with nothing written."""

import pytest

import communs


def write_sources(folder, pattern):
    (folder / "sources.yaml").write_text(
        "release: {licence: Apache-2.0}\n"
        "sources:\n"
        "  - id: novels\n"
        f"    paths: [{pattern}]\n"
        "    format: text\n"
        "    licence: public-domain\n"
        "    language: fr\n"
        "    domain: literature\n"
        "    url: https://example.org/novels\n"
    )
    return folder / "sources.yaml"


def test_empty_corpus_is_one_line_naming_the_source(tmp_path, capsys):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("")
    (tmp_path / "txt" / "b.txt").write_text("   \n\n")
    sources = write_sources(tmp_path, "txt/*.txt")
    out = tmp_path / "data"
    assert communs.main(["data", "prepare", str(sources), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"{sources}: sources[novels]: no document left to train on (2 read, 0 kept" in err
    assert not out.exists()


def test_missing_source_file_names_the_key(tmp_path, capsys):
    sources = write_sources(tmp_path, "nowhere/*.txt")
    out = tmp_path / "data"
    assert communs.main(["data", "prepare", str(sources), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sources[novels].paths: 'nowhere/*.txt': no such file" in err
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_unreadable_parquet_or_arrow_file_is_one_line_naming_it(tmp_path, capsys, fmt):
    """A file that is not parquet (no footer) or a truncated arrow stream: refused when the main process
    reads its headers to cut it into units, in one line naming the file, with nothing written."""
    import pyarrow as pa

    path = tmp_path / f"part.{fmt}"
    if fmt == "parquet":
        path.write_text('{"text": "du JSON, pas du parquet"}\n', encoding="utf-8")
    else:
        table = pa.table({"text": ["Il était une fois une histoire. " * 20] * 50})
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table)
        path.write_bytes(path.read_bytes()[:700])
    sources = write_sources(tmp_path, path.name).read_text().replace("format: text", f"format: {fmt}")
    (tmp_path / "sources.yaml").write_text(sources)
    out = tmp_path / "data"
    assert communs.main(["data", "prepare", str(tmp_path / "sources.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    expected = {
        "parquet": "Parquet magic bytes not found in footer",
        "arrow": "Expected to be able to read",
    }[fmt]
    assert err.startswith(f"communs data: error: {path}: cannot read as {fmt}: ") and expected in err, err
    assert not out.exists()
