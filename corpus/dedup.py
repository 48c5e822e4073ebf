"""Exact and near-duplicate removal over the whole corpus, in a deterministic order.

Exact: the sha256 of a document's text. Near: MinHash signatures over word n-gram shingles
(datasketch), candidates from an LSH index at the configured Jaccard threshold, each confirmed by
the signatures' own Jaccard estimate. The first document (in corpus order: sources as declared,
then files, then records) is kept; later ones are removed naming the one they duplicate.
Signatures are computed in parallel; the index is filled in one pass so the outcome does not
depend on the number of workers.
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
    vocab: dict[str, int] = {}
    word_hash = np.fromiter(
        (vocab.setdefault(w, zlib.crc32(w.encode("utf-8"))) for w in words), dtype=np.uint64, count=len(words)
    )
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


def find_duplicates(
    items: list[tuple[str, str, np.ndarray | None]], threshold: float, num_perm: int
) -> dict[int, tuple[str, str]]:
    """items: (doc id, sha256 of its text, signature or None when near-dedup is off for it).

    Returns {index: (rule, id of the earlier document it duplicates)} for the items to remove.
    """
    from datasketch import MinHash, MinHashLSH

    removed: dict[int, tuple[str, str]] = {}
    first_by_hash: dict[str, str] = {}
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept_sigs: dict[str, MinHash] = {}
    order: dict[str, int] = {}
    for i, (doc_id, sha, sig) in enumerate(items):
        if sha is not None:
            if sha in first_by_hash:
                removed[i] = ("dedup.exact", first_by_hash[sha])
                continue
            first_by_hash[sha] = doc_id
        if sig is None:
            continue
        m = _minhash(num_perm, sig)
        # Candidates are confirmed by the estimate, then the earliest one is named.
        matches = [c for c in lsh.query(m) if kept_sigs[c].jaccard(m) >= threshold]
        if matches:
            removed[i] = ("dedup.near", min(matches, key=lambda c: order[c]))
            continue
        lsh.insert(doc_id, m)
        kept_sigs[doc_id] = m
        order[doc_id] = i
    return removed
