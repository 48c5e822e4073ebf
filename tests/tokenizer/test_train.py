"""Training: the options that matter (digits, French, whitespace), reproducibility, sampling, bad input."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import sentencepiece as spm

from common.errors import UserError
from tokenizer import Tokenizer, check_vocab, read_text, sample_texts, train_tokenizer
from tokenizer.train import MAX_LINE_CHARS, training_lines

from .conftest import VOCAB


def _some_docs(corpus, n_bytes=400_000):
    docs, size = [], 0
    for d in corpus["nouvelles19"] + corpus["gsm8k"]:
        docs.append(d)
        size += len(d)
        if size > n_bytes:
            return docs
    return docs


def test_special_ids_vocab_and_metadata(tok, tok_dir):
    assert tok.vocab_size == VOCAB
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    assert [tok.id_to_piece(i) for i in range(6)] == specials
    assert [tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.im_start_id, tok.im_end_id] == list(range(6))
    assert tok.sha256 == hashlib.sha256((tok_dir / "tokenizer.model").read_bytes()).hexdigest()
    meta = json.loads((tok_dir / "tokenizer.meta.json").read_text())
    assert meta["sha256"] == tok.sha256 and meta["vocab_size"] == VOCAB and meta["seed"] == 0
    assert meta["special_ids"] == {piece: i for i, piece in enumerate(specials)}
    # Nothing else is left in the folder (the temporary files were renamed).
    assert sorted(p.name for p in tok_dir.iterdir()) == ["tokenizer.meta.json", "tokenizer.model"]


def test_same_inputs_give_byte_identical_model_whatever_the_threads(corpus, tmp_path):
    docs = _some_docs(corpus)
    a = train_tokenizer(docs, tmp_path / "a", 1000, num_threads=1).read_bytes()
    b = train_tokenizer(docs, tmp_path / "b", 1000, num_threads=2).read_bytes()
    assert a == b
    # A seeded sample does not depend on the documents' order either.
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    c = train_tokenizer(docs, tmp_path / "c", 1000, seed=3, sample_bytes=200_000).read_bytes()
    d = train_tokenizer(shuffled, tmp_path / "d", 1000, seed=3, sample_bytes=200_000).read_bytes()
    e = train_tokenizer(docs, tmp_path / "e", 1000, seed=4, sample_bytes=200_000).read_bytes()
    assert c == d and c != e


def test_digits_are_single_pieces_and_french_is_intact(tok, corpus):
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    with_digit = [p for p in pieces if any(ch.isdigit() for ch in p) and not p.startswith("<0x")]
    assert sorted(with_digit) == list("0123456789")
    assert tok.encode("2024") == [tok.sp.piece_to_id(d) for d in "2024"]
    # Every character of the training text is in the vocabulary (character_coverage=1.0): only "\n" falls
    # back to bytes, accents stay composed, ligatures and both apostrophes are pieces of their own.
    byte_ids = {i for i in range(tok.vocab_size) if tok.sp.is_byte(i)}
    newline = tok.sp.piece_to_id("<0x0A>")
    for docs in corpus.values():
        for ids in tok.encode_batch(docs):
            assert set(ids) & byte_ids <= {newline}
    for ch in "éèêàçùœ’'«»":
        assert tok.sp.piece_to_id(ch) != tok.unk_id, ch
    text = "L’œuvre de l'été, « Non ! » : cœur, sœur."
    assert tok.decode(tok.encode(text)) == text
    assert "œ" in "".join(tok.id_to_piece(i) for i in tok.encode("œuvre"))


def test_whitespace_is_kept_exactly(tok):
    for text in ["  deux espaces", "fin  ", "a\t\tb", "    def f():\n        return 1\n", " \n \n"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(" a")[0] != tok.encode("a")[0]  # no dummy prefix: a leading space is a real "▁"


def test_very_long_lines_are_learned_not_skipped(tmp_path):
    # "ʬ" appears only inside one 50k-character line: sentencepiece would skip that line (its default limit is
    # 4192 bytes); we cut it into lines of MAX_LINE_CHARS, so the character is learned.
    long_line = ("mot " * 12_000) + "ʬ" + (" fin" * 500)
    texts = ["Une phrase ordinaire pour commencer.\n" * 50, long_line]
    assert max(map(len, training_lines(texts))) == MAX_LINE_CHARS
    tok = Tokenizer.load(train_tokenizer(texts, tmp_path, 300))
    assert tok.sp.piece_to_id("ʬ") != tok.unk_id


def test_sample_texts_weights_seed_and_order():
    rng = random.Random(0)
    sources = {name: [f"{name} {i} " + "x" * rng.randrange(50, 150) for i in range(2000)] for name in "ab"}
    sample = sample_texts(sources, {"a": 3, "b": 1}, 40_000, seed=7)
    size = {n: sum(len(t) for t in sample if t.startswith(n + " ")) for n in "ab"}
    # Each source's share is filled to within one document (<= 160 bytes here).
    assert 30_000 <= size["a"] < 30_160 and 10_000 <= size["b"] < 10_160
    assert sample == sample_texts({k: v[::-1] for k, v in sources.items()}, {"a": 3, "b": 1}, 40_000, seed=7)
    assert sample != sample_texts(sources, {"a": 3, "b": 1}, 40_000, seed=8)
    # Sources come out in name order; a source smaller than its share is taken whole; weight 0 takes nothing.
    small = sample_texts({"z": ["abc", "def"], "y": ["long " * 100]}, {"z": 1, "y": 1}, 1000, seed=0)
    assert small[-2:] in (["abc", "def"], ["def", "abc"]) and small[0].startswith("long")
    assert sample_texts({"a": ["abc"], "b": ["def"]}, {"a": 1, "b": 0}, 10) == ["abc"]


def test_sample_texts_bad_weights():
    with pytest.raises(UserError, match="weights and sources differ: b"):
        sample_texts({"a": ["x"], "b": ["y"]}, {"a": 1}, 10)
    with pytest.raises(UserError, match=r"numbers >= 0, got \{'a': -1\}"):
        sample_texts({"a": ["x"]}, {"a": -1}, 10)
    with pytest.raises(UserError, match="empty training sample: total_bytes=0"):
        sample_texts({"a": ["x"]}, {"a": 1}, 0)


def test_empty_training_sample(tmp_path):
    for texts in ([], ["", "\n\n", ""]):
        with pytest.raises(UserError, match="^empty training sample: the texts hold no non-empty line$"):
            train_tokenizer(texts, tmp_path, 500)
    assert not (tmp_path / "tokenizer.model").exists()


def test_vocab_too_large_or_too_small_for_the_sample(tmp_path):
    texts = ["Le petit chat boit du lait.", "Le chien dort."]
    with pytest.raises(UserError) as e:
        train_tokenizer(texts, tmp_path, 5000)
    msg = str(e.value)
    assert msg.startswith("vocab_size 5000 does not fit the training sample (2 lines, 41 bytes): at most ")
    assert "pieces can be learned from it; change vocab_size or give more text" in msg and "\n" not in msg
    with pytest.raises(
        UserError, match="^vocab_size 20 does not fit the training sample .*Vocabulary size is smaller"
    ):
        train_tokenizer(texts, tmp_path, 20)
    with pytest.raises(UserError, match="vocab_size must be a positive integer, got '8000'"):
        train_tokenizer(texts, tmp_path, "8000")
    assert not (tmp_path / "tokenizer.model").exists()


def test_invalid_utf8_names_file_byte_and_line(tmp_path):
    bad = tmp_path / "livre.txt"
    good = "première ligne\nSeconde ligne ".encode()  # 30 bytes of valid UTF-8, then a Latin-1 "é"
    bad.write_bytes(good + "été".encode("latin-1"))
    with pytest.raises(UserError) as e:
        read_text(bad)
    assert str(e.value) == f"{bad}: invalid UTF-8 at byte 30 (line 2): b'\\xe9t\\xe9'"


def test_load_rejects_files_that_are_not_our_tokenizer(tmp_path):
    with pytest.raises(UserError, match="tokenizer model not found"):
        Tokenizer.load(tmp_path / "absent")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(UserError, match=f"^{junk}: not a sentencepiece model"):
        Tokenizer.load(junk)
    # A stock sentencepiece model (no pad, no chat markers) is refused with the id that is wrong.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["un deux trois quatre cinq six sept huit"] * 20),
        model_prefix=str(tmp_path / "stock"),
        vocab_size=20,
        minloglevel=2,
    )
    with pytest.raises(UserError) as e:
        Tokenizer.load(tmp_path / "stock.model")
    stock = tmp_path / "stock.model"
    assert str(e.value) == f"{stock}: special token <pad> has id 0, expected 3 (not a communs tokenizer)"


def test_check_vocab(tok, tok_dir):
    check_vocab(tok, VOCAB)
    check_vocab(tok_dir, 3072)  # the model pads its embedding to a multiple of 64/128: fine
    with pytest.raises(UserError) as e:
        check_vocab(tok, 2048)
    assert str(e.value) == (
        f"{tok.path}: vocab_size {VOCAB} does not fit the model's vocab_size 2048 "
        "(the model's vocab must be >= the tokenizer's)"
    )
