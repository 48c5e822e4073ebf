"""The data mixture: which window of which source fills each slot of each step. A pure function.

A phase's step holds `seqs_per_step` slots (sequences). Slots are dealt to sources by exact largest
deficit: slot n (counting over the whole phase) goes to the source whose ideal count (n + 1) x share
exceeds its count so far by the most (ties: the first source id). Shares are exact fractions, so this
is integer arithmetic, identical on every machine, and source k never gets more than ceil(slots x
share_k) slots, the bound recipe validation checks against the data. The counts after any number of
steps are the "data position" kept in checkpoints.

Within a source, its c-th slot takes window `permute(c mod n, n, key(epoch = c div n))` of the
source's PackedReader: a keyed Feistel permutation of [0, n) (no table, O(1) memory at any data
size), so every window is seen once per epoch, in a different order each epoch. The step's slots are
then shuffled (keyed by the step) so that ranks and micro-batches see mixed sources. Keys derive
from (seed, manifest root hash, phase name, source, epoch / step), hence data order is a pure
function of (seed, manifest root hash, phase, step).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

MASK64 = (1 << 64) - 1


def _key(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijective 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def permute(i: int, n: int, key: int) -> int:
    """A pseudo-random bijection of [0, n) (4-round Feistel network on the next even bit width, cycle-walked)."""
    if not 0 <= i < n:
        raise IndexError(f"{i} not in [0, {n})")
    if n == 1:
        return 0
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    lo_mask = (1 << half) - 1
    round_keys = [_mix64(key + r) for r in range(4)]
    x = i
    while True:  # cycle-walking: at most ~4 rounds on average since the domain is < 4n
        left, right = x >> half, x & lo_mask
        for rk in round_keys:
            left, right = right, left ^ (_mix64(right ^ rk) & lo_mask)
        x = (left << half) | right
        if x < n:
            return x


def deal(counts: dict[str, int], shares: tuple[tuple[str, Fraction], ...], n_slots: int) -> list[str]:
    """Deal `n_slots` slots by largest deficit; update `counts` in place; return the source of each slot."""
    denom = 1
    for _, s in shares:
        denom = denom * s.denominator // np.gcd(denom, s.denominator)
    nums = [(src, int(s * denom)) for src, s in shares]  # share = num / denom, sum of nums = denom
    dealt = sum(counts.get(src, 0) for src, _ in shares)
    out = []
    for _ in range(n_slots):
        dealt += 1
        best, best_deficit = None, None
        for src, num in nums:
            deficit = dealt * num - counts.get(src, 0) * denom
            if best_deficit is None or deficit > best_deficit:
                best, best_deficit = src, deficit
        counts[best] = counts.get(best, 0) + 1
        out.append(best)
    return out


@dataclass(frozen=True)
class Slot:
    source: str
    window: int  # index into the source's PackedReader
    ordinal: int  # how many windows of this source the phase had taken before this one


def step_slots(
    counts: dict[str, int],
    shares: tuple[tuple[str, Fraction], ...],
    n_windows: dict[str, int],
    n_slots: int,
    seed: int,
    root_hash: str,
    phase: str,
    step_in_phase: int,
) -> list[Slot]:
    """The global batch of one step, in slot order; advances `counts` (the data position) in place."""
    taken = {src: counts.get(src, 0) for src, _ in shares}  # windows of each source taken so far
    sources = deal(counts, shares, n_slots)
    slots = []
    for src in sources:
        c = taken[src]  # this slot takes the c-th window of src in the phase
        taken[src] += 1
        n = n_windows[src]
        epoch, i = divmod(c, n)
        slots.append(Slot(src, permute(i, n, _key(seed, root_hash, phase, src, epoch)), c))
    order = np.random.default_rng(_key(seed, root_hash, phase, "step", step_in_phase)).permutation(n_slots)
    return [slots[j] for j in order]


def counts_after(shares: tuple[tuple[str, Fraction], ...], n_slots: int) -> dict[str, int]:
    """The data position after `n_slots` slots of a phase (what a checkpoint stores; recomputable)."""
    counts: dict[str, int] = {}
    deal(counts, shares, n_slots)
    return counts
