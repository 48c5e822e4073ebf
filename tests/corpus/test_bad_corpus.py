"""A corpus that leaves nothing to train on is refused, by name, with nothing written."""

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
