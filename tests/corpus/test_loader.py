from __future__ import annotations

import shutil

import numpy as np
import pytest

import corpus.loader
from corpus.loader import PackedReader
from corpus.shards import Shard, write_shard

# batch() runs the compiled gather ("c"), or its numpy path, which computes positions by slices (few
# document starts) or by a vectorised pass (many), and takes its windows' rows from the table built at
# open or (a corpus past TABLE_LIMIT_BYTES) computes them per batch: test every one.
# numpy path name -> (VECTORISE_ABOVE, TABLE_LIMIT_BYTES)
PATHS = {
    "slices": (1e9, 1 << 40),
    "vectorised": (-1.0, 1 << 40),
    "slices-no-table": (1e9, 0),
    "vectorised-no-table": (-1.0, 0),
}


@pytest.fixture(params=["c", *sorted(PATHS)])
def path(request, monkeypatch):
    if request.param == "c":
        if corpus.loader._gather is None:
            pytest.skip("corpus._gather is not compiled (test_the_compiled_gather_is_built says why)")
        return "c"
    monkeypatch.setattr(corpus.loader, "_gather", None)  # readers opened by the test take the numpy path
    vectorise_above, table_limit = PATHS[request.param]
    monkeypatch.setattr(corpus.loader, "VECTORISE_ABOVE", vectorise_above)
    monkeypatch.setattr(corpus.loader, "TABLE_LIMIT_BYTES", table_limit)
    return request.param


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


def _write(tmp_path, parts) -> list:
    prefixes = []
    for k, docs in enumerate(parts):
        write_shard(tmp_path / f"{k:05d}", docs)
        prefixes.append(tmp_path / f"{k:05d}")
    return prefixes


def _check_all_windows(reader: PackedReader, docs, rng: np.random.Generator) -> None:
    """Every window equals the reference, alone and in shuffled batches (repeats included)."""
    refs = [_reference(docs, reader.seq_len, i) for i in range(len(reader))]
    for i, ref in enumerate(refs):
        tokens, positions, loss = reader[i]
        assert tokens.dtype == np.int64 and positions.dtype == np.int64 and loss.dtype == bool
        for got, want in zip((tokens, positions, loss), ref):
            np.testing.assert_array_equal(got, want)
    idx = np.concatenate([rng.permutation(len(reader)), rng.integers(0, len(reader), 5)])
    for chunk in np.array_split(idx, max(1, len(idx) // 7)):
        batch = reader.batch(chunk)
        B, T = len(chunk), reader.seq_len
        assert [a.shape for a in batch] == [(B, T + 1), (B, T), (B, T)]
        for row, i in enumerate(chunk):
            for got, want in zip(batch, refs[i]):
                np.testing.assert_array_equal(got[row], want)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_windows_equal_the_reference_across_shards(tmp_path, with_mask, seq_len, path):
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


def test_windows_over_many_tiny_and_empty_documents(tmp_path, path):
    # Documents of 0 to 3 tokens: a window of 16 holds many starts, some sharing a column (empty docs).
    rng = np.random.default_rng(3)
    docs = [rng.integers(6, 500, int(rng.integers(0, 4))).astype(np.uint32) for _ in range(150)]
    docs[0] = np.array([1, 7], dtype=np.uint32)  # the data does not start with an empty document
    reader = PackedReader(_write(tmp_path, [docs[:70], docs[70:]]), 16)
    _check_all_windows(reader, docs, rng)


def test_windows_crossing_several_shards_with_mixed_chat_masks(tmp_path, path):
    # Shards of 1 to 3 short documents: a window of 24 spans up to ~6 shards; one shard in two carries
    # a chat loss mask, the others none (scored everywhere but at document starts).
    rng = np.random.default_rng(4)
    parts, docs = [], []
    for k in range(14):
        part = _docs(rng, int(rng.integers(1, 4)), with_mask=k % 2 == 0)
        parts.append(part)
        docs += part
    reader = PackedReader(_write(tmp_path, parts), 24)
    table = PackedReader(_write(tmp_path, parts), 24, kernel="numpy")._window_rows(np.arange(len(reader)))
    assert reader.has_mask and (table[:, 0] == -1).sum() >= 3
    _check_all_windows(reader, docs, rng)


def test_windows_deeper_than_the_ramp(tmp_path, monkeypatch, path):
    # Long documents with a ramp of 20 entries: most windows start too deep to take their row from it.
    monkeypatch.setattr(corpus.loader, "RAMP_LIMIT", 20)
    rng = np.random.default_rng(5)
    docs = [rng.integers(6, 500, n).astype(np.uint32) for n in (300, 5, 211)]
    reader = PackedReader(_write(tmp_path, [docs]), 8)
    if path != "c":
        rows = reader._window_rows(np.arange(len(reader)))
        assert len(reader._ramp) == 20 and (rows[:, 1] == -1).sum() > len(reader) // 2
        assert (reader._windows is None) == path.endswith("no-table")
    _check_all_windows(reader, docs, rng)


def test_window_table_equals_a_direct_computation(tmp_path):
    rng = np.random.default_rng(6)
    parts = [_docs(rng, n, False) for n in (9, 0, 4, 13)]
    reader = PackedReader(_write(tmp_path, parts), 10, kernel="numpy")
    lengths = [len(d) for part in parts for d in part]
    doc_starts = np.concatenate([[0], np.cumsum(lengths)])[:-1].tolist()
    shard_bounds = np.cumsum([0] + [sum(len(d) for d in part) for part in parts]).tolist()
    T = reader.seq_len
    for w, (shard, ramp_row, n_starts, first) in enumerate(reader._windows.tolist()):
        start, end = w * T, w * T + T + 1
        inside = [k for k in range(len(parts)) if shard_bounds[k] <= start and end <= shard_bounds[k + 1]]
        assert shard == (inside[0] if inside else -1)
        holding = max(d for d, s in enumerate(doc_starts) if s <= start and lengths[d] > 0)
        assert first == holding and ramp_row == start - doc_starts[holding]
        assert n_starts == sum(start < s <= start + T for s in doc_starts)
    assert reader._windows.dtype == np.int32 and reader._windows.shape == (len(reader), 4)
    # The rows a batch computes for itself (a corpus past TABLE_LIMIT_BYTES) are the table's rows.
    some = np.array([3, 0, len(reader) - 1, 3])
    np.testing.assert_array_equal(reader._window_rows(some), reader._windows[some])
    np.testing.assert_array_equal(reader._ramp_rows[3], np.arange(3, 3 + T + 1))


def test_the_compiled_gather_is_built():
    # Where a C compiler exists, `pip install -e .` must have built corpus._gather: a failed build is
    # optional for setuptools (the numpy path serves) but must not go unnoticed here.
    if shutil.which("cc") or shutil.which("gcc"):
        assert corpus.loader._gather is not None, "corpus._gather did not compile: see pip's build output"


@pytest.mark.parametrize("kernel", corpus.loader.KERNELS)
def test_batch_edge_cases(tmp_path, kernel):
    if kernel == "c" and corpus.loader._gather is None:
        pytest.skip("corpus._gather is not compiled")
    write_shard(tmp_path / "a", _docs(np.random.default_rng(7), 20, True))
    reader = PackedReader([tmp_path / "a"], 8, kernel=kernel)
    assert reader.kernel == kernel
    tokens, positions, loss = reader.batch([])
    assert tokens.shape == (0, 9) and positions.shape == (0, 8) and loss.shape == (0, 8)
    assert tokens.dtype == positions.dtype == np.int64 and loss.dtype == bool
    with pytest.raises(IndexError, match=r"window index out of range \[0, "):
        reader.batch([0, -1])
    with pytest.raises(IndexError, match="out of range"):
        reader.batch(np.array([len(reader)]))
    for got, want in zip(reader[-1], reader[len(reader) - 1]):
        np.testing.assert_array_equal(got, want)


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


def test_a_pickled_reader_opens_its_shards_again(tmp_path):
    import pickle

    docs = _docs(np.random.default_rng(8), 30, True)
    reader = PackedReader(_write(tmp_path, [docs[:10], docs[10:]]), 8)
    data = pickle.dumps(reader)
    assert len(data) < 2000  # the prefixes, not the tokens
    copy = pickle.loads(data)
    assert copy.kernel == reader.kernel and len(copy) == len(reader)
    idx = np.arange(len(reader))
    for got, want in zip(copy.batch(idx), reader.batch(idx)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(corpus.loader._gather is None, reason="corpus._gather is not compiled")
def test_the_compiled_gather_equals_the_numpy_path_on_long_windows(tmp_path, monkeypatch):
    # Documents of 0 to 3,000 tokens over 5 shards (chat masks on some), windows of 1,024: the C kernel
    # and both numpy position paths agree on every window, in random batches with repeats.
    rng = np.random.default_rng(9)
    parts = []
    for k in range(5):
        docs = []
        for _ in range(int(rng.integers(2, 12))):
            t = rng.integers(0, 2**32, int(rng.integers(0, 3000)), dtype=np.uint64).astype(np.uint32)
            docs.append((t, rng.integers(0, 2, len(t)).astype(np.uint8)) if k % 2 else t)
        parts.append(docs)
    prefixes = _write(tmp_path, parts)
    fast = PackedReader(prefixes, 1024, kernel="c")
    idx = np.concatenate([rng.permutation(len(fast)), rng.integers(0, len(fast), 40)])
    got = fast.batch(idx)
    assert [a.flags.c_contiguous for a in got] == [True, True, True]
    for vectorise_above in (1e9, -1.0):
        monkeypatch.setattr(corpus.loader, "VECTORISE_ABOVE", vectorise_above)
        want = PackedReader(prefixes, 1024, kernel="numpy").batch(idx)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)
