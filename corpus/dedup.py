"""Exact and near-duplicate removal over the whole corpus, in a deterministic order.

Exact: the sha256 of a document's text. Near: MinHash signatures over word n-gram shingles
(datasketch's permutations), candidates from locality-sensitive hashing at the configured Jaccard
threshold (datasketch's band layout), each confirmed by the signatures' own Jaccard estimate. The
first document (in corpus order: sources as declared, then files, then records) is kept; later ones
are removed naming the one they duplicate. Signatures are computed in parallel; `DedupIndex` takes
the decisions one document at a time, in corpus order, so the outcome does not depend on the number
of workers.

The index holds what the decisions need and nothing more, as numpy rows: per document seen, the
sha256 digest (32 bytes) or the signature (4 × num_perm bytes) and one 12-byte entry per key (the
digest's first 8 bytes, or one per LSH band). Its decisions are those of datasketch's `MinHashLSH`
(tested against it): the same bands, candidates confirmed on the exact band values, the same
Jaccard estimate.
"""

from __future__ import annotations

import functools
import zlib

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


class _Rows:
    """A growing 2-D numpy array (capacity doubled as needed): row i is the i-th one appended."""

    def __init__(self, width: int, dtype):
        self.data = np.zeros((1024, width), dtype=dtype)
        self.n = 0

    def append(self, row: np.ndarray) -> int:
        if self.n == len(self.data):
            self.data = np.concatenate([self.data, np.zeros_like(self.data)])
        self.data[self.n] = row
        self.n += 1
        return self.n - 1

    def nbytes(self) -> int:
        return self.data.nbytes


class KeyIndex:
    """uint64 key → the row numbers filed under it, in insertion order; compact.

    Recent insertions sit in a small dict; every `flush_at` of them become a sorted numpy run
    (key, row), and runs of similar size are merged (as in a log-structured merge tree), so there are
    O(log n) runs, each searched with `np.searchsorted`, and about 12 bytes per entry.
    """

    def __init__(self, flush_at: int = 1 << 14):
        self.flush_at = flush_at
        self.recent: dict[int, list[int]] = {}
        self.n_recent = 0
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (keys uint64 sorted, rows int32)

    def add(self, keys: np.ndarray, row: int) -> None:
        for key in keys.tolist():
            self.recent.setdefault(key, []).append(row)
        self.n_recent += len(keys)
        if self.n_recent >= self.flush_at:
            self._flush()

    def lookup(self, keys: np.ndarray) -> list[int]:
        """Row numbers filed under any of `keys` (possibly repeated, in no particular order)."""
        found: list[int] = []
        for key in keys.tolist():
            found.extend(self.recent.get(key, ()))
        for run_keys, run_rows in self.runs:
            lo = np.searchsorted(run_keys, keys, "left")
            hi = np.searchsorted(run_keys, keys, "right")
            for a, b in zip(lo[hi > lo].tolist(), hi[hi > lo].tolist()):
                found.extend(run_rows[a:b].tolist())
        return found

    def nbytes(self) -> int:
        return sum(k.nbytes + r.nbytes for k, r in self.runs) + 100 * self.n_recent

    def _flush(self) -> None:
        keys = np.fromiter((k for k, rows in self.recent.items() for _ in rows), np.uint64, self.n_recent)
        rows = np.fromiter((r for rs in self.recent.values() for r in rs), np.int32, self.n_recent)
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], rows[order]))
        self.recent, self.n_recent = {}, 0
        while len(self.runs) >= 2 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (k1, r1), (k2, r2) = self.runs.pop(-2), self.runs.pop()
            keys, rows = np.concatenate([k1, k2]), np.concatenate([r1, r2])
            order = np.argsort(keys, kind="stable")
            self.runs.append((keys[order], rows[order]))


# Odd 64-bit constants: a band's key is a polynomial hash of its values, salted by the band number.
_MULT = np.uint64(0x100000001B3)
_SALT = np.uint64(0x9E3779B97F4A7C15)


class DedupIndex:
    """Exact and near-duplicate decisions, one document at a time, in corpus order."""

    def __init__(self, threshold: float, num_perm: int, flush_at: int = 1 << 14):
        self.threshold, self.num_perm = threshold, num_perm
        self.bands, self.rows_per_band = lsh_bands(threshold, num_perm)
        self._powers = np.array(
            [pow(int(_MULT), k, 1 << 64) for k in range(self.rows_per_band)], dtype=np.uint64
        )
        self._salts = (np.arange(1, self.bands + 1, dtype=np.uint64) * _SALT).astype(np.uint64)
        # Exact: every first occurrence of a digest (even one later removed as a near duplicate,
        # as in datasketch's use: a later exact copy of it is named after it).
        self.exact_keys, self.digests, self.exact_ids = KeyIndex(flush_at), _Rows(32, np.uint8), []
        # Near: the signatures of the documents kept by the near check, in corpus order.
        self.band_keys, self.signatures, self.near_ids = KeyIndex(flush_at), _Rows(num_perm, np.uint32), []

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
        if sha256 is not None:
            digest = np.frombuffer(bytes.fromhex(sha256), dtype=np.uint8)
            key = digest[:8].view(np.uint64)
            for row in self.exact_keys.lookup(key):
                if np.array_equal(self.digests.data[row], digest):  # the full digest, not just its key
                    return "dedup.exact", self.exact_ids[row]
            self.exact_keys.add(key, self.digests.append(digest))
            self.exact_ids.append(doc_id)
        if sig is None:
            return None
        keys = self._band_keys(sig)
        candidates = sorted(set(self.band_keys.lookup(keys)))
        if candidates:
            rows = self.signatures.data[candidates]  # (C, num_perm)
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

    def nbytes(self) -> int:
        """Memory held by the index's arrays (the id lists aside)."""
        return sum(x.nbytes() for x in (self.exact_keys, self.digests, self.band_keys, self.signatures))


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
