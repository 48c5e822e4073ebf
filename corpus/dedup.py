"""Exact and near-duplicate removal over the whole corpus, in a deterministic order.

Exact: the sha256 of a document's text. Near: MinHash signatures over word n-gram shingles
(datasketch's permutations), candidates from locality-sensitive hashing at the configured Jaccard
threshold (datasketch's band layout), each confirmed by the signatures' own Jaccard estimate. The
first document (in corpus order: sources as declared, then files, then records) is kept; later ones
are removed naming the one they duplicate. Signatures are computed in parallel; `DedupIndex` takes
the decisions one document at a time, in corpus order, so the outcome does not depend on the number
of workers.

The index holds what the decisions need and nothing more, as numpy rows: per document seen, the
sha256 digest (32 bytes) or the signature (4 × num_perm bytes), its id (UTF-8 bytes + an 8-byte end
offset) and one 12-byte entry per key (the digest's first 8 bytes, or one per LSH band). Its
decisions are those of datasketch's `MinHashLSH` (tested against it): the same bands, candidates
confirmed on the exact band values, the same Jaccard estimate.

RAM: given a `spill_dir`, the index keeps at most `memory_budget` bytes in RAM. Past it, all of it
goes to append-only files read back through memory maps: a check reads a few rows (a digest, the
candidates' signatures, one id) and binary-searches the key runs, so its cost hardly changes.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import sys
import tempfile
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# datasketch's default seed; fixed so that signatures are reproducible across runs and versions.
MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"  # named explicitly: datasketch ≥ 2 refuses signatures of unknown scheme


def shingle_hashes(text: str, size: int) -> np.ndarray:
    """32-bit hashes of the lower-cased word `size`-grams of a text (the whole text when shorter).

    Words are hashed once each (crc32), n-grams combined with numpy: far cheaper than hashing
    every shingle's bytes, and stable across processes and runs (unlike Python's `hash`).
    """
    words = text.lower().split() or [""]
    hashes = {w: zlib.crc32(w.encode("utf-8")) for w in dict.fromkeys(words)}  # each distinct word once
    word_hash = np.fromiter(map(hashes.__getitem__, words), dtype=np.uint64, count=len(words))
    n = min(size, len(words))
    h = np.zeros(len(words) - n + 1, dtype=np.uint64)
    for k in range(n):
        h = h * np.uint64(0x100000001B3) + word_hash[k : len(words) - n + 1 + k]
    return np.unique((h >> np.uint64(32)) ^ (h & np.uint64(0xFFFFFFFF)))


@functools.cache
def _permutations(num_perm: int):
    """datasketch draws its permutations from a seeded RNG on every MinHash(): draw them once."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME).permutations


def _minhash(num_perm: int, hashvalues: np.ndarray | None = None):
    from datasketch import MinHash

    # The shingles are already hashed: datasketch's hash function is the identity.
    return MinHash(
        num_perm=num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME, hashfunc=int,
        hashvalues=hashvalues, permutations=_permutations(num_perm),
    )  # fmt: skip


def signature(text: str, num_perm: int, size: int) -> np.ndarray:
    """The MinHash signature (num_perm,) uint32 of a text's word shingles."""
    m = _minhash(num_perm)
    m.update_batch(shingle_hashes(text, size).tolist())
    return m.hashvalues.copy()


@functools.cache
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this threshold (equal weights)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


class _Column:
    """An append-only table of fixed-width rows (row i is the i-th appended), in RAM then in a file.

    Rows go into RAM blocks of about `block_bytes` (the table grows by one block: no doubling copy).
    `spill(path)` appends the rows in RAM to `path` and frees the blocks; rows in the file are read
    through a memory map, remapped lazily when a read reaches past the part mapped so far."""

    def __init__(self, dtype: np.typing.DTypeLike, width: int, block_bytes: int):
        self.dtype, self.width = np.dtype(dtype), width
        self.block_rows = max(1, block_bytes // (self.dtype.itemsize * width))
        self.blocks: list[np.ndarray] = []  # each (block_rows, width)
        self.n = 0  # rows appended
        self.n_spilled = 0  # the first n_spilled of them are in the file
        self.path: Path | None = None
        self._map: np.ndarray | None = None  # (rows mapped, width): the file as it was when mapped

    def __len__(self) -> int:
        return self.n

    def append(self, row: np.ndarray | int) -> int:
        """Append one row (`width` values, or one value when `width` is 1); returns its number."""
        block, at = divmod(self.n - self.n_spilled, self.block_rows)
        if block == len(self.blocks):
            self.blocks.append(np.empty((self.block_rows, self.width), self.dtype))
        self.blocks[block][at] = row
        self.n += 1
        return self.n - 1

    def row(self, i: int) -> np.ndarray:
        """Row i, (width,): a view of its block or of the file's map."""
        if i < self.n_spilled:
            if self._map is None or len(self._map) <= i:  # the file has grown since it was mapped
                shape = (self.n_spilled, self.width)
                self._map = np.asarray(np.memmap(self.path, self.dtype, "r", shape=shape))
            return self._map[i]
        block, at = divmod(i - self.n_spilled, self.block_rows)
        return self.blocks[block][at]

    def spill(self, path: Path) -> None:
        """Append the rows in RAM to `path` (the same file at every call) and free their blocks."""
        self.path = path
        left = self.n - self.n_spilled
        if not left:
            return
        with open(path, "ab") as f:
            for block in self.blocks:
                f.write(block[: min(left, self.block_rows)].tobytes())
                left -= self.block_rows
        self.blocks, self.n_spilled = [], self.n

    def nbytes(self) -> int:
        return len(self.blocks) * self.block_rows * self.width * self.dtype.itemsize


_EMPTY_BYTEARRAY = sys.getsizeof(bytearray())


class _Ids:
    """Document ids, not as Python strings: their UTF-8 bytes end to end (a bytearray, then a file
    read through a memory map), and the offset where each one ends in a uint64 `_Column`."""

    def __init__(self, block_bytes: int):
        self.text = bytearray()  # the bytes not in the file yet
        self.n_spilled = 0  # bytes in the file
        self.ends = _Column(np.uint64, 1, block_bytes)
        self.path: Path | None = None
        self._map: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ends)

    def append(self, doc_id: str) -> None:
        self.text += doc_id.encode("utf-8")
        self.ends.append(self.n_spilled + len(self.text))

    def __getitem__(self, i: int) -> str:
        start = int(self.ends.row(i - 1)[0]) if i else 0
        stop = int(self.ends.row(i)[0])
        if start >= self.n_spilled:
            return self.text[start - self.n_spilled : stop - self.n_spilled].decode("utf-8")
        if self._map is None or len(self._map) < stop:  # the file has grown since it was mapped
            self._map = np.asarray(np.memmap(self.path, np.uint8, "r", shape=(self.n_spilled,)))
        return self._map[start:stop].tobytes().decode("utf-8")

    def spill(self, path: Path) -> None:
        """Append the bytes and ends in RAM to `<path>.utf8` and `<path>.ends`."""
        self.path = path.with_name(f"{path.name}.utf8")
        with open(self.path, "ab") as f:
            f.write(self.text)
        self.n_spilled += len(self.text)
        self.text = bytearray()
        self.ends.spill(path.with_name(f"{path.name}.ends"))

    def nbytes(self) -> int:
        # The bytearray's capacity (it over-allocates), not its length.
        return sys.getsizeof(self.text) - _EMPTY_BYTEARRAY + self.ends.nbytes()


@dataclass
class _Run:
    """A sorted run of a `KeyIndex`: keys (uint64, ascending) and the row filed under each (int32;
    the rows of one key in insertion order). `files`: the two files that `keys` and `rows` map."""

    keys: np.ndarray
    rows: np.ndarray
    files: tuple[Path, Path] | None = None

    def __len__(self) -> int:
        return len(self.keys)


# Entries (12 bytes each) in RAM at once while runs are merged into a file, all runs together.
_MERGE_PIECE = 1 << 18


class KeyIndex:
    """uint64 key → the row numbers filed under it, in insertion order; compact.

    Recent insertions sit in a small dict; every `flush_at` of them become a sorted numpy run
    (key, row), and runs of similar size are merged (as in a log-structured merge tree), so there are
    O(log n) runs, each searched with `np.searchsorted`, and about 12 bytes per entry.

    `spill(prefix)` writes the runs in RAM (and the recent keys) as one run in two files
    (`<prefix>-<k>.keys`, `.rows`), searched through memory maps; a merge that involves a run in
    files is streamed into new files a piece at a time (`_MERGE_PIECE` entries), and the old files
    are deleted. The runs in files are always the oldest ones."""

    def __init__(self, flush_at: int = 1 << 14):
        self.flush_at = flush_at
        # key → its row, or its rows in a list once it has several (most keys have one: no list).
        self.recent: dict[int, int | list[int]] = {}
        self.n_recent = 0
        self.runs: list[_Run] = []  # oldest first: those in files, then those in RAM
        self.prefix: Path | None = None
        self._n_files = 0
        self._runs_nbytes = 0  # of the runs in RAM

    def add(self, keys: np.ndarray, row: int) -> None:
        recent = self.recent
        for key in keys.tolist():
            filed = recent.get(key)
            if filed is None:
                recent[key] = row
            elif type(filed) is int:
                recent[key] = [filed, row]
            else:
                filed.append(row)
        self.n_recent += len(keys)
        if self.n_recent >= self.flush_at:
            self.runs.append(self._recent_run())
            self._merge_last()

    def lookup(self, keys: np.ndarray) -> list[int]:
        """Row numbers filed under any of `keys` (possibly repeated, in no particular order)."""
        found: list[int] = []
        for key in keys.tolist():
            filed = self.recent.get(key)
            if filed is not None:
                if type(filed) is int:
                    found.append(filed)
                else:
                    found.extend(filed)
        for run in self.runs:
            lo = run.keys.searchsorted(keys, "left")
            hi = run.keys.searchsorted(keys, "right")
            for a, b in zip(lo[hi > lo].tolist(), hi[hi > lo].tolist()):
                found.extend(run.rows[a:b].tolist())
        return found

    def nbytes(self) -> int:
        """RAM: the runs not in files, and ~100 bytes per recent entry (its dict slot and key; measured)."""
        return self._runs_nbytes + 100 * self.n_recent

    def spill(self, prefix: Path) -> None:
        """Move the runs in RAM and the recent keys into files named after `prefix` (same at every call)."""
        self.prefix = prefix
        if self.n_recent:
            self.runs.append(self._recent_run())
        first = next((k for k, run in enumerate(self.runs) if run.files is None), len(self.runs))
        if first < len(self.runs):
            self.runs[first:] = [self._merge_to_files(self.runs[first:])]
            self._merge_last()

    def _recent_run(self) -> _Run:
        filed = [(k, rs) if type(rs) is list else (k, (rs,)) for k, rs in self.recent.items()]
        keys = np.fromiter((k for k, rs in filed for _ in rs), np.uint64, self.n_recent)
        rows = np.fromiter((r for _, rs in filed for r in rs), np.int32, self.n_recent)
        order = np.argsort(keys, kind="stable")
        self.recent, self.n_recent = {}, 0
        return _Run(keys[order], rows[order])

    def _merge_last(self) -> None:
        """Merge the last two runs while the older is at most twice the size of the newer (so that
        sizes at least double from each run to the one before it: O(log n) runs)."""
        while len(self.runs) >= 2 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            older, newer = self.runs[-2:]
            if older.files is None and newer.files is None:
                keys = np.concatenate([older.keys, newer.keys])
                rows = np.concatenate([older.rows, newer.rows])
                order = np.argsort(keys, kind="stable")
                merged = _Run(keys[order], rows[order])
            else:
                merged = self._merge_to_files([older, newer])
            self.runs[-2:] = [merged]
        self._runs_nbytes = sum(r.keys.nbytes + r.rows.nbytes for r in self.runs if r.files is None)

    def _merge_to_files(self, runs: list[_Run]) -> _Run:
        """`runs` (oldest first) merged into one run in new files, streamed a piece at a time; the
        files of the merged runs are deleted."""
        self._n_files += 1
        keys_path = Path(f"{self.prefix}-{self._n_files}.keys")
        rows_path = Path(f"{self.prefix}-{self._n_files}.rows")
        piece = max(1, _MERGE_PIECE // len(runs))
        starts = [0] * len(runs)
        with open(keys_path, "wb") as keys_file, open(rows_path, "wb") as rows_file:
            while True:
                # Everything up to the smallest key found `piece` entries ahead in any run: no entry
                # left behind sorts before it, and each run gives at most `piece` entries (plus that
                # key's repeats). None: every run ends within this piece.
                ahead = [run.keys[s + piece - 1] for run, s in zip(runs, starts) if s + piece <= len(run)]
                pivot = min(ahead) if ahead else None
                ends = [
                    len(run) if pivot is None else s + int(np.searchsorted(run.keys[s:], pivot, "right"))
                    for run, s in zip(runs, starts)
                ]
                keys = np.concatenate([run.keys[s:e] for run, s, e in zip(runs, starts, ends)])
                rows = np.concatenate([run.rows[s:e] for run, s, e in zip(runs, starts, ends)])
                order = np.argsort(keys, kind="stable")  # equal keys: the older run's rows first
                keys_file.write(keys[order].tobytes())
                rows_file.write(rows[order].tobytes())
                starts = ends
                if pivot is None:
                    break
        for run in runs:
            for path in run.files or ():
                path.unlink()  # mapped still by `run` until it is dropped: fine on POSIX
        keys_map = np.asarray(np.memmap(keys_path, np.uint64, "r"))
        rows_map = np.asarray(np.memmap(rows_path, np.int32, "r"))
        return _Run(keys_map, rows_map, (keys_path, rows_path))


# Odd 64-bit constants: a band's key is a polynomial hash of its values, salted by the band number.
_MULT = np.uint64(0x100000001B3)
_SALT = np.uint64(0x9E3779B97F4A7C15)


class _Spilling(ABC):
    """What `DedupIndex` and `IdSet` share: RAM up to `memory_budget` bytes (`nbytes()`), then, with a
    `spill_dir`, everything they hold in RAM appended (`_spill_to`) to files in a folder of their own
    under it, made at the first spill (a corpus that fits in RAM writes nothing); `close()` (or leaving
    a `with` block) deletes the folder. Without `spill_dir` everything stays in RAM."""

    _folder_prefix = "spill-"

    def __init__(self, memory_budget: int, spill_dir: Path | str | None):
        self.memory_budget, self.spill_dir = memory_budget, spill_dir
        self.n_spills = 0
        self._dir: Path | None = None
        # RAM blocks of 1/64 of the budget: the last, partly filled blocks are a small part of it.
        self.block_bytes = 1 << 20 if spill_dir is None else min(1 << 20, max(512, memory_budget // 64))

    @abstractmethod
    def nbytes(self) -> int:
        """RAM held (not the files, which are page cache the kernel reclaims)."""

    @abstractmethod
    def _spill_to(self, folder: Path) -> None:
        """Append what is held in RAM to files in `folder` (the same ones at every call)."""

    def _spill_if_over(self) -> None:
        if self.spill_dir is not None and self.nbytes() > self.memory_budget:
            self.spill()

    def spill(self) -> None:
        """Append everything held in RAM to the files (the RAM part is then empty)."""
        if self.spill_dir is None:
            raise ValueError(f"{type(self).__name__}.spill: made without a spill_dir")
        if self._dir is None:
            Path(self.spill_dir).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix=self._folder_prefix, dir=self.spill_dir))
        self._spill_to(self._dir)
        self.n_spills += 1

    def disk_bytes(self) -> int:
        """Bytes in the folder's files."""
        return sum(p.stat().st_size for p in self._dir.iterdir()) if self._dir is not None else 0

    def close(self) -> None:
        """Delete the folder and its files."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DedupIndex(_Spilling):
    """Exact and near-duplicate decisions, one document at a time, in corpus order.

    Memory: with a `spill_dir`, whenever a check takes the RAM the index holds (`nbytes()`) past
    `memory_budget` bytes, everything it holds in RAM — digests, signatures, ids, LSH key runs — is
    appended to files in a folder of its own under `spill_dir` (made at the first spill) and read back
    through memory maps; so what it holds in RAM stays under the budget however many documents come
    (the process's RSS near it: allocator slack, merge copies), and a corpus that fits in the budget
    touches no disk. Without `spill_dir` everything stays in RAM. `close()` (or
    leaving a `with` block) deletes the folder; the index is not to be used after."""

    _folder_prefix = "index-"

    def __init__(
        self,
        threshold: float,
        num_perm: int,
        flush_at: int = 1 << 14,
        *,
        memory_budget: int = 256 << 20,
        spill_dir: Path | str | None = None,
    ):
        super().__init__(memory_budget, spill_dir)
        self.threshold, self.num_perm = threshold, num_perm
        self.bands, self.rows_per_band = lsh_bands(threshold, num_perm)
        self._powers = np.array(
            [pow(int(_MULT), k, 1 << 64) for k in range(self.rows_per_band)], dtype=np.uint64
        )
        self._salts = (np.arange(1, self.bands + 1, dtype=np.uint64) * _SALT).astype(np.uint64)
        block = self.block_bytes
        # Exact: every first occurrence of a digest (even one later removed as a near duplicate,
        # as in datasketch's use: a later exact copy of it is named after it).
        self.exact_keys, self.exact_ids = KeyIndex(flush_at), _Ids(block)
        self.digests = _Column(np.uint8, 32, block)
        # Near: the signatures of the documents kept by the near check, in corpus order.
        self.band_keys, self.near_ids = KeyIndex(flush_at), _Ids(block)
        self.signatures = _Column(np.uint32, num_perm, block)

    def _band_values(self, sig: np.ndarray) -> np.ndarray:
        return sig[: self.bands * self.rows_per_band].reshape(self.bands, self.rows_per_band)

    def _band_keys(self, sig: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            values = self._band_values(sig).astype(np.uint64)
            return (values * self._powers).sum(axis=1, dtype=np.uint64) ^ self._salts

    def check(self, doc_id: str, sha256: str | None, sig: np.ndarray | None) -> tuple[str, str] | None:
        """(rule, id of the earlier document) when `doc_id` duplicates one seen before, else None
        (and the document is filed for the ones after it). `sha256` None: no exact check;
        `sig` None: no near check."""
        verdict = self._decide(doc_id, sha256, sig)
        self._spill_if_over()
        return verdict

    def _decide(self, doc_id: str, sha256: str | None, sig: np.ndarray | None) -> tuple[str, str] | None:
        if sha256 is not None:
            digest = np.frombuffer(bytes.fromhex(sha256), dtype=np.uint8)
            key = digest[:8].view(np.uint64)
            for row in self.exact_keys.lookup(key):
                if np.array_equal(self.digests.row(row), digest):  # the full digest, not its key
                    return "dedup.exact", self.exact_ids[row]
            self.exact_keys.add(key, self.digests.append(digest))
            self.exact_ids.append(doc_id)
        if sig is None:
            return None
        keys = self._band_keys(sig)
        candidates = sorted(set(self.band_keys.lookup(keys)))
        if candidates:
            rows = np.stack([self.signatures.row(c) for c in candidates])  # (C, num_perm)
            bands = self._band_values(sig)
            # A candidate shares one band's values exactly (not just its key), as datasketch's buckets.
            shares_band = (
                (rows[:, : bands.size].reshape(len(candidates), *bands.shape) == bands).all(2).any(1)
            )
            agree = np.count_nonzero(rows == sig, axis=1).astype(np.float64) / float(self.num_perm)
            matches = np.flatnonzero(shares_band & (agree >= self.threshold))
            if len(matches):
                return "dedup.near", self.near_ids[candidates[matches[0]]]  # the earliest one
        self.band_keys.add(keys, self.signatures.append(sig))
        self.near_ids.append(doc_id)
        return None

    def _spill_to(self, folder: Path) -> None:
        self.digests.spill(folder / "digests.u8")
        self.signatures.spill(folder / "signatures.u32")
        self.exact_ids.spill(folder / "exact-ids")
        self.near_ids.spill(folder / "near-ids")
        self.exact_keys.spill(folder / "exact-keys")
        self.band_keys.spill(folder / "band-keys")

    def nbytes(self) -> int:
        """RAM held by the index: its blocks of rows and ids, and its LSH key runs and recent keys
        that are not in files (the memory-mapped files are page cache, which the kernel reclaims)."""
        return (
            self.digests.nbytes() + self.signatures.nbytes() + self.exact_ids.nbytes() + self.near_ids.nbytes()
            + self.exact_keys.nbytes() + self.band_keys.nbytes()
        )  # fmt: skip


class IdSet(_Spilling):
    """The document ids seen so far (the pipeline's duplicate-id check), in bounded RAM.

    Not a Python set of strings (~100 B an id, 10 GB at 100M documents): each id's 64-bit blake2b key
    in a `KeyIndex` and its UTF-8 bytes in `_Ids`, read back to confirm a key match (so a collision of
    keys is never taken for a duplicate). With a `spill_dir`, past `memory_budget` bytes of RAM both
    go to files in a folder of their own under it, as `DedupIndex` does; `close()` deletes it."""

    _folder_prefix = "ids-"

    def __init__(self, *, memory_budget: int = 64 << 20, spill_dir: Path | str | None = None):
        super().__init__(memory_budget, spill_dir)
        self.keys, self.ids = KeyIndex(), _Ids(self.block_bytes)

    @staticmethod
    def _key(doc_id: str) -> np.ndarray:
        return np.frombuffer(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), np.uint64)

    def add(self, doc_id: str) -> bool:
        """File `doc_id`; False when it was there already (nothing is filed then)."""
        key = self._key(doc_id)
        if any(self.ids[row] == doc_id for row in self.keys.lookup(key)):
            return False
        self.keys.add(key, len(self.ids))
        self.ids.append(doc_id)
        self._spill_if_over()
        return True

    def __contains__(self, doc_id: str) -> bool:
        return any(self.ids[row] == doc_id for row in self.keys.lookup(self._key(doc_id)))

    def __len__(self) -> int:
        return len(self.ids)

    def _spill_to(self, folder: Path) -> None:
        self.ids.spill(folder / "ids")
        self.keys.spill(folder / "keys")

    def nbytes(self) -> int:
        """RAM held: the ids' bytes and ends not in files, the key runs and recent keys not in files."""
        return self.ids.nbytes() + self.keys.nbytes()


def find_duplicates(
    items: list[tuple[str, str | None, np.ndarray | None]], threshold: float, num_perm: int
) -> dict[int, tuple[str, str]]:
    """items: (doc id, sha256 of its text or None, signature or None when near-dedup is off for it).

    Returns {index: (rule, id of the earlier document it duplicates)} for the items to remove.
    """
    index = DedupIndex(threshold, num_perm)
    removed = {}
    for i, (doc_id, sha, sig) in enumerate(items):
        verdict = index.check(doc_id, sha, sig)
        if verdict:
            removed[i] = verdict
    return removed
