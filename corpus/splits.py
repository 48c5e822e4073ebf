"""Train/val split by parent document: all chunks of a document go to the split of its parent id.

A parent is held out when `sha256("split:<seed>:<parent id>")`, read as a 64-bit big-endian fraction,
is below the validation fraction. A source with ≥ 2 parent documents always gets one in each split
(when the fraction is > 0); a source with a single parent document (one file cut into chunks) is all
train. `tentative_split` is the first rule alone (what a worker can decide for one document);
`split_corrections` gives, once a source's parents are all known, the parents whose split the other
rules change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def split_rank(parent: str, seed: int) -> float:
    h = hashlib.sha256(f"split:{seed}:{parent}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def tentative_split(parent: str, seed: int, fraction: float) -> str:
    """The split of a parent document on its own (stable when other documents change)."""
    return _split_of(split_rank(parent, seed), fraction)


def _split_of(rank: float, fraction: float) -> str:
    return "val" if rank < fraction else "train"


def split_corrections(parents: Iterable[str], seed: int, fraction: float) -> dict[str, str]:
    """{parent: final split} for the parents whose final split differs from `tentative_split`."""
    unique = sorted(set(parents))
    ranks = {p: split_rank(p, seed) for p in unique}
    tentative = {p: _split_of(r, fraction) for p, r in ranks.items()}
    if len(unique) < 2 or fraction <= 0:
        return {p: "train" for p, sp in tentative.items() if sp == "val"}
    if "val" not in tentative.values():
        return {min(unique, key=ranks.__getitem__): "val"}
    if "train" not in tentative.values():
        return {max(unique, key=ranks.__getitem__): "train"}
    return {}


def assign_splits(ids: list[str], seed: int, fraction: float, parents: list[str] | None = None) -> list[str]:
    """'train' or 'val' per id, decided per parent document (`parents[i]`, default the id itself)."""
    parents = list(ids) if parents is None else parents
    fixes = split_corrections(parents, seed, fraction)
    return [fixes.get(p) or tentative_split(p, seed, fraction) for p in parents]
