"""The dedup index past its memory budget: rows, ids and LSH key runs spilled to memory-mapped files,
the same decisions (as in RAM, as datasketch's MinHashLSH), RAM under the budget, files removed."""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import numpy as np
import pytest

import corpus.dedup as dedup_mod
import corpus.pipeline as pipeline_mod
from common.errors import UserError
from corpus.dedup import DedupIndex, KeyIndex, lsh_bands
from corpus.pipeline import curate_to, open_pool
from corpus.sources import load_sources


def _items(n: int, num_perm: int, threshold: float, seed: int = 0) -> list:
    """Documents drawn around 150 bases: many near copies (agreement from ~0.4 to 1, around the
    threshold), exact copies, some without a digest or a signature; ids like real ones, non-ASCII too."""
    rng = np.random.default_rng(seed)
    _, rows = lsh_bands(threshold, num_perm)
    bases = rng.integers(0, 2**32, size=(150, num_perm), dtype=np.uint32)
    items = []
    for k in range(n):
        sig = bases[rng.integers(0, len(bases))].copy()
        changed = rng.random(num_perm) < rng.uniform(0.0, 0.6)
        sig[changed] = rng.integers(0, 2**32, size=int(changed.sum()), dtype=np.uint32)
        if k % 3 == 0:  # a band equal but agreement below the threshold, or above it without a band
            sig[:rows] = bases[k % len(bases)][:rows]
        sha = hashlib.sha256(sig.tobytes()).hexdigest() if k % 4 else None
        if k % 10 == 0 and items:  # an exact copy of an earlier document
            sha = items[int(rng.integers(0, len(items)))][1]
        doc_id = f"src:fichier-{k % 7}é.jsonl:{k}" if k % 5 else f"web:{k}"
        items.append((doc_id, sha, sig if k % 13 else None))
    return items


def _decide(index: DedupIndex, items) -> dict[int, tuple[str, str]]:
    return {i: v for i, (doc_id, sha, sig) in enumerate(items) if (v := index.check(doc_id, sha, sig))}


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_spilled_index_decides_as_in_ram_and_as_datasketch(
    threshold, tmp_path, monkeypatch, datasketch_duplicates
):
    monkeypatch.setattr(dedup_mod, "_MERGE_PIECE", 64)  # merges into files take several pieces
    num_perm, budget = 64, 24 << 10
    items = _items(2000, num_perm, threshold)
    expected = datasketch_duplicates(items, threshold, num_perm)
    assert sum(rule == "dedup.near" for rule, _ in expected.values()) > 100
    assert sum(rule == "dedup.exact" for rule, _ in expected.values()) > 100

    in_ram = DedupIndex(threshold, num_perm, flush_at=64)  # many runs, merged
    assert _decide(in_ram, items) == expected
    assert len(in_ram.band_keys.runs) >= 2
    # Compact: one 12-byte entry per band for each document in the index (recent keys ~100 B).
    bands, _ = lsh_bands(threshold, num_perm)
    assert in_ram.band_keys.nbytes() <= len(in_ram.near_ids) * bands * 12 + 100 * in_ram.band_keys.n_recent

    index = DedupIndex(threshold, num_perm, flush_at=64, memory_budget=budget, spill_dir=tmp_path / "spill")
    got, ram = {}, []
    for i, (doc_id, sha, sig) in enumerate(items):
        if verdict := index.check(doc_id, sha, sig):
            got[i] = verdict
        ram.append(index.nbytes())
    assert got == expected
    assert max(ram) <= budget and index.n_spills >= 20
    # Every kind of row and both key indexes went to files, and only the live runs' files remain.
    assert index.signatures.n_spilled > 500 and index.digests.n_spilled > 500
    assert index.near_ids.n_spilled > 5000 and index.exact_ids.ends.n_spilled > 500
    run_files = {p for keys in (index.exact_keys, index.band_keys) for r in keys.runs for p in r.files or ()}
    assert len(run_files) >= 4
    (folder,) = (tmp_path / "spill").iterdir()
    assert {p for p in folder.iterdir() if p.suffix in (".keys", ".rows")} == run_files
    assert index.disk_bytes() > index.signatures.n_spilled * num_perm * 4
    index.spill()
    assert index.nbytes() == 0
    # Reads after a spill (through the remapped files) still name the same documents.
    assert [index.near_ids[i] for i in range(0, len(index.near_ids), 97)] == [
        doc_id for doc_id in _kept_near_ids(items, expected)
    ][::97]
    index.close()
    assert list((tmp_path / "spill").iterdir()) == []


def _kept_near_ids(items, removed) -> list[str]:
    return [doc_id for i, (doc_id, _, sig) in enumerate(items) if sig is not None and i not in removed]


def test_key_index_runs_in_files_keep_every_row_of_every_key_in_insertion_order(tmp_path, monkeypatch):
    monkeypatch.setattr(dedup_mod, "_MERGE_PIECE", 16)  # many pieces, each pivot key repeated
    rng = np.random.default_rng(1)
    keys_of_row = [
        rng.choice(40, size=int(rng.integers(1, 4)), replace=False).astype(np.uint64) for _ in range(3000)
    ]
    index = KeyIndex(flush_at=16)
    filed: dict[int, list[int]] = {}
    for row, keys in enumerate(keys_of_row):
        index.add(keys, row)
        for key in keys.tolist():
            filed.setdefault(key, []).append(row)
        if row % 250 == 249:
            index.spill(tmp_path / "keys")
    for key, rows in filed.items():
        assert sorted(index.lookup(np.array([key], dtype=np.uint64))) == rows
    assert index.lookup(np.array([10**6], dtype=np.uint64)) == []
    in_files = [run for run in index.runs if run.files is not None]
    assert len(in_files) >= 2 and index.runs[: len(in_files)] == in_files  # the oldest ones
    for run in index.runs:
        same_key = run.keys[1:] == run.keys[:-1]
        assert np.all(run.keys[1:] >= run.keys[:-1]) and np.all(
            run.rows[1:][same_key] > run.rows[:-1][same_key]
        )
    # Sizes at least double from a run to the one before it; the merged runs' files are deleted.
    assert all(len(a) > 2 * len(b) for a, b in zip(index.runs, index.runs[1:]))
    assert set(tmp_path.iterdir()) == {p for run in in_files for p in run.files}


def test_index_ram_stays_under_the_budget_while_documents_grow(tmp_path):
    """nbytes() (what the index holds in RAM) stays under the budget at every document, and the
    memory Python allocates for the index (tracemalloc: numpy arrays included) does not grow with
    the documents, which take ~20 times the budget in the files."""
    rng = np.random.default_rng(2)
    n, num_perm, budget = 3000, 128, 96 << 10
    sigs = rng.integers(0, 2**32, size=(n, num_perm), dtype=np.uint32)
    digests = [hashlib.sha256(s.tobytes()).hexdigest() for s in sigs]
    ids = [f"src:file-{k // 1000}.jsonl:{k}" for k in range(n)]
    index = DedupIndex(0.8, num_perm, flush_at=256, memory_budget=budget, spill_dir=tmp_path)
    tracemalloc.start()
    try:
        traced = {}
        for k in range(n):
            index.check(ids[k], digests[k], sigs[k])
            assert index.nbytes() <= budget
            if k + 1 in (1000, n):
                traced[k + 1] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert abs(traced[n] - traced[1000]) < budget + (16 << 10)
    assert index.disk_bytes() > n * (num_perm * 4 + 32 + 9 * 12) > 18 * budget
    index.close()


def _tiny_budget(made: list):
    def make(*args, **kwargs):
        index = DedupIndex(*args, memory_budget=2048, **kwargs)
        made.append(index)
        return index

    return make


def test_curate_to_spills_and_removes_the_index_files_on_success_and_on_user_error(
    make_corpus, tmp_path, monkeypatch
):
    sources = make_corpus(tmp_path / "corpus")
    qa = sources.parent / "qa.jsonl"
    lines = qa.read_text(encoding="utf-8").splitlines()
    near = [line.replace(" the ", " a ", 1) for line in lines[10:20]]
    qa.write_text("\n".join(lines + lines[:10] + near) + "\n", encoding="utf-8")  # exact and near copies
    sf = load_sources(sources)
    with open_pool(sf, 1) as pool:
        curate_to(sf, tmp_path / "in-ram", pool)
        made: list[DedupIndex] = []
        monkeypatch.setattr(pipeline_mod, "DedupIndex", _tiny_budget(made))
        curate_to(sf, tmp_path / "spilled", pool)
    (index,) = made
    assert index.spill_dir == tmp_path / "spilled" / ".dedup" and index.n_spills > 10
    assert not index.spill_dir.exists()
    assert _files(tmp_path / "spilled") == _files(tmp_path / "in-ram")
    rules = [json.loads(line)["rule"] for line in (tmp_path / "spilled" / "provenance.jsonl").open()]
    assert rules.count("dedup.exact") >= 5 and rules.count("dedup.near") >= 5

    fatal = make_corpus(tmp_path / "fatal")
    fatal.write_text(fatal.read_text().replace("chunk_chars: 2500", "chunk_chars: 2500\n  errors: fatal"))
    with open(tmp_path / "fatal" / "qa.jsonl", "a") as f:
        f.write('{"question": "unterminated\n')
    sf = load_sources(fatal)
    made.clear()
    with open_pool(sf, 1) as pool, pytest.raises(UserError, match=r"qa\.jsonl:41: malformed JSON"):
        curate_to(sf, tmp_path / "failed", pool)
    (index,) = made
    assert index.n_spills > 10 and not (tmp_path / "failed" / ".dedup").exists()


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("collide", [False, True])
def test_id_set_equals_a_python_set_in_ram_and_spilled(tmp_path, monkeypatch, collide):
    # The duplicate-id check: the same answers as a set of strings, spilled past a tiny budget with RAM
    # under it, and (keys forced to collide) ids told apart by their bytes, not their keys.
    from corpus.dedup import IdSet

    if collide:
        monkeypatch.setattr(IdSet, "_key", staticmethod(lambda doc_id: np.zeros(1, np.uint64)))
    rng = np.random.default_rng(1)
    ids = [
        f"src:fichier-é{int(k)}:{int(k) % 7}"
        for k in rng.integers(0, 3000 if not collide else 100, 6000 if not collide else 1500)
    ]
    budget = (16 if not collide else 3) << 10
    spilled, in_ram, reference = IdSet(memory_budget=budget, spill_dir=tmp_path / "s"), IdSet(), set()
    for doc_id in ids:
        new = doc_id not in reference
        reference.add(doc_id)
        assert spilled.add(doc_id) == new == in_ram.add(doc_id)
        assert spilled.nbytes() <= budget
    assert len(spilled) == len(in_ram) == len(reference)
    assert spilled.n_spills >= (1 if collide else 3) and in_ram.n_spills == 0
    assert all(i in spilled for i in list(reference)[:200]) and "absent" not in spilled
    spilled.close()
    assert list((tmp_path / "s").iterdir()) == []
