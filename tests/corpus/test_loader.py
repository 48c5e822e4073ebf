from __future__ import annotations

import numpy as np
import pytest

from corpus.loader import PackedReader
from corpus.shards import Shard, write_shard


def _docs(rng: np.random.Generator, n: int, with_mask: bool):
    docs = []
    for _ in range(n):
        length = int(rng.integers(1, 40))
        tokens = np.concatenate([[1], rng.integers(6, 500, length), [2]]).astype(np.uint32)
        if with_mask:
            docs.append((tokens, rng.integers(0, 2, len(tokens)).astype(np.uint8)))
        else:
            docs.append(tokens)
    return docs


def _reference(docs, seq_len: int, i: int):
    """Per-document Python construction of window i, straight from the contract."""
    tokens, positions, mask = [], [], []
    for d in docs:
        t, m = d if isinstance(d, tuple) else (d, np.ones(len(d), dtype=np.uint8))
        tokens += t.tolist()
        positions += list(range(len(t)))
        mask += m.tolist()
    start = i * seq_len
    window = slice(start, start + seq_len + 1)
    tok, pos, msk = tokens[window], positions[window], mask[window]
    loss = [pos[j + 1] != 0 and bool(msk[j + 1]) for j in range(seq_len)]
    return np.array(tok), np.array(pos[:-1]), np.array(loss)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_windows_equal_the_reference_across_shards(tmp_path, with_mask, seq_len):
    rng = np.random.default_rng(seq_len + with_mask)
    parts = [_docs(rng, n, with_mask) for n in (30, 0, 1, 17)]  # an empty shard too
    prefixes = []
    for k, docs in enumerate(parts):
        write_shard(tmp_path / f"{k:05d}", docs)
        prefixes.append(tmp_path / f"{k:05d}")
    all_docs = [d for docs in parts for d in docs]
    reader = PackedReader(prefixes, seq_len)
    n_tokens = sum(len(d[0] if isinstance(d, tuple) else d) for d in all_docs)
    assert len(reader) == (n_tokens - 1) // seq_len and reader.n_docs == len(all_docs)
    for i in range(len(reader)):
        tokens, positions, loss = reader[i]
        ref = _reference(all_docs, seq_len, i)
        assert tokens.dtype == np.int64 and positions.dtype == np.int64 and loss.dtype == bool
        np.testing.assert_array_equal(tokens, ref[0])
        np.testing.assert_array_equal(positions, ref[1])
        np.testing.assert_array_equal(loss, ref[2])
    idx = rng.permutation(len(reader))[:9]
    batch = reader.batch(idx)
    for row, i in enumerate(idx):
        for got, want in zip(batch, reader[int(i)]):
            np.testing.assert_array_equal(got[row], want)


def test_order_is_a_seeded_permutation_and_bounds_are_checked(tmp_path):
    write_shard(tmp_path / "a", _docs(np.random.default_rng(0), 50, False))
    reader = PackedReader([tmp_path / "a"], 16)
    order = reader.order(seed=5, epoch=1)
    assert sorted(order.tolist()) == list(range(len(reader)))
    assert order.tolist() == reader.order(5, 1).tolist() != reader.order(5, 2).tolist()
    with pytest.raises(IndexError):
        reader[len(reader)]
    with pytest.raises(FileNotFoundError, match="unfinished"):
        PackedReader([tmp_path / "missing"], 16)


def test_shard_roundtrip(tmp_path):
    docs = _docs(np.random.default_rng(1), 5, True)
    record = write_shard(tmp_path / "s", docs)
    shard = Shard.open(tmp_path / "s")
    assert record["n_docs"] == 5 and shard.n_tokens == sum(len(t) for t, _ in docs)
    for i, (t, m) in enumerate(docs):
        np.testing.assert_array_equal(shard.doc(i), t)
        np.testing.assert_array_equal(shard.doc_mask(i), m)
