"""`communs tokenizer train | encode | export` (and `communs data encode` with the trained tokenizer),
and the one-line errors of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

import communs
from corpus.shards import Shard
from tokenizer import Tokenizer

from .conftest import DEMO


def run(capsys, *argv):
    rc = communs.main(["tokenizer", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_train_encode_export(tmp_path, capsys):
    novels, gsm8k = DEMO / "nouvelles19" / "txt", DEMO / "gsm8k" / "train-excerpt.jsonl"
    rc, out, err = run(
        capsys, "train", novels, gsm8k, "--field", "question", "--out", tmp_path / "tok", "--vocab-size", 1500,
        "--sample-bytes", 300_000, "--weight", f"{gsm8k}=1", "--weight", f"{novels}=3", "--seed", 5,
    )  # fmt: skip
    assert rc == 0, err
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size == 1500 and out.startswith(f"{tmp_path / 'tok' / 'tokenizer.model'}: 1500 pieces")
    meta = json.loads((tmp_path / "tok" / "tokenizer.meta.json").read_text())
    # Each input's share is filled to within one of its documents (lines lose their "\n" in the count).
    largest = max(p.stat().st_size for p in novels.glob("*.txt"))
    assert (
        meta["seed"] == 5 and 300_000 <= meta["sample"]["bytes"] + meta["sample"]["lines"] < 300_000 + largest
    )

    rc, out, _ = run(capsys, "encode", "--tokenizer", tmp_path / "tok", "--text", "L’été 2024")
    assert rc == 0 and json.loads(out)["ids"] == tok.encode("L’été 2024")
    assert "".join(json.loads(out)["pieces"]) == "L’été▁2024"

    files = sorted(novels.glob("*.txt"))[:3]
    rc = communs.main(["data", "encode", "--tokenizer", str(tmp_path / "tok"), *map(str, files),
                       "--out", str(tmp_path / "sh" / "00000")])  # fmt: skip
    assert rc == 0 and "3 documents" in capsys.readouterr().out
    shard = Shard.open(tmp_path / "sh" / "00000")
    assert shard.n_docs == 3
    for i, f in enumerate(files):
        expected = [tok.bos_id, *tok.encode(f.read_text(encoding="utf-8")), tok.eos_id]
        assert np.array_equal(shard.doc(i), np.asarray(expected, dtype=np.uint32))

    rc, out, err = run(capsys, "export", "--tokenizer", tmp_path / "tok", "--out", tmp_path / "hf")
    assert rc == 0, err
    assert (tmp_path / "hf" / "tokenizer.json").exists() and "chat template set" in out


@pytest.mark.parametrize(
    "argv, error",
    [
        (
            ["train", "{bad}", "--out", "{tmp}/t", "--vocab-size", "500"],
            "{bad}: invalid UTF-8 at byte 6 (line 2): b'\\xff'",
        ),
        (
            ["train", "{good}", "--out", "{tmp}/t", "--vocab-size", "9000"],
            "vocab_size 9000 does not fit the training sample",
        ),
        (
            ["train", "{tmp}/absent.txt", "--out", "{tmp}/t", "--vocab-size", "500"],
            "{tmp}/absent.txt: no such file or folder",
        ),
        (
            ["train", "{good}", "--out", "{tmp}/t", "--vocab-size", "500", "--weight", "x=1"],
            "--weight needs --sample-bytes",
        ),
        (
            ["train", "{jsonl}", "--out", "{tmp}/t", "--vocab-size", "500"],
            "{jsonl}:2: no string field 'text'",
        ),
        (
            ["encode", "--tokenizer", "{tmp}/nothing", "--text", "x"],
            "{tmp}/nothing: tokenizer model not found",
        ),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys, argv, error):
    paths = {
        "tmp": tmp_path,
        "bad": tmp_path / "bad.txt",
        "good": tmp_path / "good.txt",
        "jsonl": tmp_path / "d.jsonl",
    }
    paths["bad"].write_bytes(b"Salut\n\xff")
    paths["good"].write_text("Un petit texte.\nDeux lignes.\n", encoding="utf-8")
    paths["jsonl"].write_text('{"text": "un"}\n{"titre": "deux"}\n', encoding="utf-8")
    rc, _, err = run(capsys, *[a.format(**paths) for a in argv])
    assert rc == 2
    assert err.startswith("communs tokenizer: error: " + error.format(**paths)) and err.count("\n") == 1
