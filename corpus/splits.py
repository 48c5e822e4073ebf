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


class ParentSplits:
    """What the source-level rules need to know of a source's parents, fed one at a time, in constant
    memory (a source may have 100M parents): whether there are two distinct ones, which splits they
    fall in alone, and the parents of lowest and highest rank (ties: the smallest id, as a sorted scan
    would pick)."""

    def __init__(self, seed: int, fraction: float):
        self.seed, self.fraction = seed, fraction
        self.first: str | None = None
        self.several = False
        self.splits: set[str] = set()
        self.lowest: tuple[float, str] | None = None
        self.highest: tuple[float, str] | None = None
        self.last: str | None = None

    def add(self, parent: str) -> None:
        if parent == self.last:
            return  # the next chunk of the same parent: nothing new
        self.last = parent
        if self.first is None:
            self.first = parent
        elif parent != self.first:
            self.several = True
        rank = split_rank(parent, self.seed)
        self.splits.add(_split_of(rank, self.fraction))
        if self.lowest is None or (rank, parent) < self.lowest:
            self.lowest = (rank, parent)
        if (
            self.highest is None
            or rank > self.highest[0]
            or (rank == self.highest[0] and parent < self.highest[1])
        ):
            self.highest = (rank, parent)

    def corrections(self) -> dict[str, str]:
        """{parent: final split} for the parents whose final split differs from `tentative_split`."""
        if self.first is None:
            return {}
        if not self.several or self.fraction <= 0:
            # One parent (all train), or no validation: only a lone parent can be tentatively val.
            return {self.first: "train"} if "val" in self.splits else {}
        if "val" not in self.splits:
            return {self.lowest[1]: "val"}
        if "train" not in self.splits:
            return {self.highest[1]: "train"}
        return {}


def split_corrections(parents: Iterable[str], seed: int, fraction: float) -> dict[str, str]:
    """{parent: final split} for the parents whose final split differs from `tentative_split`."""
    seen = ParentSplits(seed, fraction)
    for parent in parents:
        seen.add(parent)
    return seen.corrections()


def assign_splits(ids: list[str], seed: int, fraction: float, parents: list[str] | None = None) -> list[str]:
    """'train' or 'val' per id, decided per parent document (`parents[i]`, default the id itself)."""
    parents = list(ids) if parents is None else parents
    fixes = split_corrections(parents, seed, fraction)
    return [fixes.get(p) or tentative_split(p, seed, fraction) for p in parents]
