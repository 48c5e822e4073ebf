"""The data mixture is exact, bounded and a pure function of (seed, root hash, phase, step)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from train.mixture import counts_after, deal, permute, step_slots
from train.recipe import mixture_shares


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1000, 4097])
def test_permute_is_a_bijection(n):
    for key in (0, 12345):
        assert sorted(permute(i, n, key) for i in range(n)) == list(range(n))


def test_permute_depends_on_the_key():
    n = 1000
    a = [permute(i, n, 1) for i in range(n)]
    b = [permute(i, n, 2) for i in range(n)]
    assert a != b and a != list(range(n))


def test_deal_follows_the_shares_exactly():
    shares = mixture_shares({"a": 0.5, "b": 0.3, "c": 0.2})
    assert dict(shares) == {"a": Fraction(1, 2), "b": Fraction(3, 10), "c": Fraction(1, 5)}
    counts: dict[str, int] = {}
    for n in range(1, 2001):
        deal(counts, shares, 1)
        for src, share in shares:
            # never above the ceiling the recipe validation checks against the data, never far below
            assert counts.get(src, 0) <= math.ceil(share * n)
            assert counts.get(src, 0) >= math.floor(share * n) - 1
    assert counts == {"a": 1000, "b": 600, "c": 400}


def test_deal_is_incremental():
    shares = mixture_shares({"x": 1.0, "y": 2.0, "z": 0.25})
    counts: dict[str, int] = {}
    seq = []
    for _ in range(37):
        seq += deal(counts, shares, 7)
    once: dict[str, int] = {}
    assert deal(once, shares, 37 * 7) == seq
    assert once == counts == counts_after(shares, 37 * 7)


def test_step_slots_are_a_pure_function():
    shares = mixture_shares({"a": 0.7, "b": 0.3})
    windows = {"a": 50, "b": 9}

    def run(seed, root="abc"):
        pos: dict[str, int] = {}
        return [step_slots(pos, shares, windows, 8, seed, root, "p", s) for s in range(20)], pos

    first, pos = run(0)
    again, _ = run(0)
    assert first == again
    assert run(1)[0] != first and run(0, root="abd")[0] != first
    assert pos == counts_after(shares, 160)
    # resuming from a stored data position gives the same following steps
    mid: dict[str, int] = counts_after(shares, 80)
    assert [step_slots(mid, shares, windows, 8, 0, "abc", "p", s) for s in range(10, 20)] == first[10:]


def test_each_epoch_sees_every_window_once():
    shares = mixture_shares({"a": 1.0})
    pos: dict[str, int] = {}
    slots = [s for step in range(6) for s in step_slots(pos, shares, {"a": 12}, 4, 0, "r", "p", step)]
    by_ordinal = sorted(slots, key=lambda s: s.ordinal)
    epoch0 = [s.window for s in by_ordinal[:12]]
    epoch1 = [s.window for s in by_ordinal[12:]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1  # a new order each epoch
