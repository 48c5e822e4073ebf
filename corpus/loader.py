"""Packed training windows read straight from memory-mapped shards.

A source's split is the concatenation of its shards' documents ([bos] … [eos] each), cut into
windows of `seq_len + 1` tokens with stride `seq_len`: window i covers tokens
[i·T, i·T + T + 1), so each token is a target exactly once and consecutive windows share one token
(the last input-target pair of one is the first input of the next). `len(reader)` = (n_tokens − 1) // T;
the tail that does not fill a window is not served.

`reader[i]` → (tokens (T+1,) int64, position_ids (T,) int64, loss_mask (T,) bool):
- position_ids restart at 0 at each document start (the model masks attention across documents);
  a window that starts inside a document continues that document's positions;
- loss_mask is on the targets tokens[1:]: 0 where the target is a document's first token (nothing
  before it predicts it) or where the shard's loss mask is 0 (chat data: non-assistant tokens).
`batch(indices)` stacks windows: (B, T+1), (B, T), (B, T) (the numpy path returns the two last as views
of (B, T+1) arrays; the C path, contiguous arrays).

How a batch is built. The fast path is one call into `corpus._gather` (corpus/_gather.c, compiled at
install): per window, two binary searches (its shard, its first document), then one pass that copies
and widens the tokens and writes positions and loss mask, with no temporaries. Where that extension
could not be compiled, the numpy path below computes the same arrays (both are tested against a
per-document reference; `kernel=` picks one). The numpy path's cost is a fixed number of numpy calls
plus a little Python per window; a numpy call costs ~0.3–1 µs whatever its size, so at 8 windows the
call count is what matters:
- at open, one row per window, `_windows` (n_windows, 4): the shard holding the window (-1 when it
  crosses a shard boundary), the position of its first token in its document (-1 when beyond the
  ramp below), how many documents start inside it, and its first document — 16 B a window, kept up to
  TABLE_LIMIT_BYTES; a larger corpus computes its batch's rows per batch (three binary searches);
- tokens: one slice of a shard per window, copied and widened to int64 by one `np.concatenate`;
- position_ids: a window that starts at position p of its document is first taken whole as row p of
  a strided view of one `arange` (`_ramp_rows[p]` = p, p+1, …, p+T: no arithmetic per token); where
  documents start inside it, the following columns are overwritten with 0, 1, … (one slice each).
  When a batch holds many document starts (short documents), a vectorised pass does it instead:
  each segment's document start repeated over its length and subtracted from the column indices;
- loss_mask: ones, with one fancy assignment putting 0 at every document start, `&` the shard mask.
The reader holds no state: order and resume belong to the caller (`order(seed, epoch)` gives a
seeded permutation of the windows).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence

import numpy as np

from corpus.shards import Shard

try:
    from corpus import _gather
except ImportError:  # not compiled (no C compiler at install): the numpy path serves
    _gather = None

KERNELS = ("c", "numpy")

# The ramp (0, 1, 2, …) that position rows are cut from is as long as the deepest window start inside
# a document needs, up to this many entries (8 MiB); a window that starts deeper gets its row computed.
RAMP_LIMIT = 1 << 20
# Above this many document starts per window in a batch, positions are computed by the vectorised pass
# (a fixed ~15 numpy calls plus two passes over the batch) instead of one slice per document start.
VECTORISE_ABOVE = 1.5
# The per-window table is kept when it takes at most this much memory (16 B a window: 16M windows, ~34B
# tokens at seq 2048); past it, each batch computes its windows' rows (three binary searches, ~3 µs more)
# so that a reader's memory never grows with the corpus beyond its document offsets.
TABLE_LIMIT_BYTES = 256 << 20


class PackedReader:
    def __init__(self, prefixes: Sequence[str | os.PathLike], seq_len: int, kernel: str | None = None):
        """`kernel`: "c" (the compiled gather, the default when built) or "numpy"."""
        kernel = kernel or ("c" if _gather is not None else "numpy")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "c" and _gather is None:
            raise ValueError("kernel 'c' needs corpus._gather, which was not compiled at install")
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        if not prefixes:
            raise ValueError("PackedReader needs at least one shard prefix")
        self.seq_len = seq_len
        self.shards = [Shard.open(p) for p in prefixes]
        sizes = np.array([s.n_tokens for s in self.shards], dtype=np.int64)
        self._bounds = np.concatenate([[0], np.cumsum(sizes)])  # (n_shards + 1,) first token of each shard
        self._bounds_list = self._bounds.tolist()
        self.n_tokens = int(self._bounds[-1])
        # (n_docs + 1,) global index of every document's first token (increasing), then n_tokens.
        self._doc_bounds = np.concatenate(
            [s.offsets[:-1].astype(np.int64) + b for s, b in zip(self.shards, self._bounds[:-1])]
            + [np.array([self.n_tokens], dtype=np.int64)]
        )
        self.doc_starts = self._doc_bounds[:-1]
        self.n_docs = len(self.doc_starts)
        self.has_mask = any(s.mask is not None for s in self.shards)
        # Plain ndarray views of the memory maps: same pages, without np.memmap's per-slice overhead.
        self._tokens = [np.asarray(s.tokens) for s in self.shards]
        self._masks = [None if s.mask is None else np.asarray(s.mask).view(bool) for s in self.shards]
        self.kernel = kernel
        if kernel == "c":
            # The memory maps' addresses: valid while self._tokens / self._masks hold the maps open.
            self._token_addresses = np.array([_address(t) for t in self._tokens], dtype=np.uint64)
            self._mask_addresses = np.array([_address(m) for m in self._masks], dtype=np.uint64)
        else:
            self._build_windows()

    def _build_windows(self) -> None:
        """The numpy path's state: the position ramp, and the per-window table when it fits under
        TABLE_LIMIT_BYTES."""
        T, n = self.seq_len, len(self)
        self._all_true = np.ones(T + 1, dtype=bool)  # the mask of a window from a shard without one
        self._columns = np.arange(T + 1, dtype=np.int64)
        # The ramp reaches as deep into a document as a window can start (the longest document), capped.
        longest = int(np.diff(self._doc_bounds).max()) if self.n_docs else 0
        ramp_len = max(T + 1, min(longest + T + 1, RAMP_LIMIT))
        self._ramp = np.arange(ramp_len, dtype=np.int64)
        # Row p = (p, p+1, …, p+T): overlapping rows of one array, nothing is copied until a row is taken.
        self._ramp_rows = np.lib.stride_tricks.as_strided(
            self._ramp, (ramp_len - T, T + 1), (8, 8), writeable=False
        )
        wide = self.n_docs >= 2**31 or len(self.shards) >= 2**31
        self._table_dtype = np.int64 if wide else np.int32
        self._windows = None  # beyond the limit each batch computes its own rows (3 binary searches)
        if n * 4 * np.dtype(self._table_dtype).itemsize <= TABLE_LIMIT_BYTES:
            self._windows = self._window_rows(np.arange(n, dtype=np.int64))

    def _window_rows(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), 4) rows of windows `idx`: the shard holding the window (-1 when it crosses a shard
        boundary), the position of its first token in its document (-1 when deeper than the ramp), how
        many documents start inside it, its first document."""
        T = self.seq_len
        starts = idx * T
        # The document holding each start: the last one starting at or before it (empty documents, which
        # share their start with the next one, are never chosen). Documents starting in (start, start + T]
        # are those up to the one holding start + T.
        first = np.searchsorted(self.doc_starts, starts, side="right") - 1
        last = np.searchsorted(self.doc_starts, starts + T, side="right") - 1
        shard = np.searchsorted(self._bounds, starts, side="right") - 1
        crossing = starts + T + 1 > self._bounds[shard + 1]
        p0 = starts - self._doc_bounds[first]  # position of each window's first token
        rows = np.empty((len(idx), 4), dtype=self._table_dtype)
        rows[:, 0] = np.where(crossing, -1, shard)
        rows[:, 1] = np.where(p0 < len(self._ramp_rows), p0, -1)
        rows[:, 2] = last - first
        rows[:, 3] = first
        return rows

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def __reduce__(self):
        # A copy in another process (a DataLoader worker, spawn) opens the shards again: the memory maps'
        # addresses of this one mean nothing there, and pickling the maps would copy every token.
        return PackedReader, ([s.prefix for s in self.shards], self.seq_len, self.kernel)

    def order(self, seed: int, epoch: int = 0) -> np.ndarray:
        """A seeded permutation of the window indices (a pure function of seed, epoch and len)."""
        return np.random.default_rng([seed, epoch, len(self)]).permutation(len(self))

    def _crossing_window(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and mask of the window starting at `start` that spans shards: one slice per shard crossed."""
        n = self.seq_len + 1
        tokens, mask = np.empty(n, dtype=np.uint32), np.ones(n, dtype=bool)
        k = bisect.bisect_right(self._bounds_list, start) - 1
        filled = 0
        while filled < n:
            lo = start + filled - self._bounds_list[k]
            take = min(n - filled, len(self._tokens[k]) - lo)
            tokens[filled : filled + take] = self._tokens[k][lo : lo + take]
            if self._masks[k] is not None:
                mask[filled : filled + take] = self._masks[k][lo : lo + take]
            filled += take
            k += 1
        return tokens, mask

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows `indices` stacked: tokens (B, T+1), position_ids (B, T), loss_mask (B, T)."""
        if self.kernel == "c":
            idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
            T, B = self.seq_len, len(idx)
            tokens = np.empty((B, T + 1), dtype=np.int64)
            positions = np.empty((B, T), dtype=np.int64)
            loss_mask = np.empty((B, T), dtype=bool)
            _gather.gather(
                tokens, positions, loss_mask, self._token_addresses, self._mask_addresses,
                self._bounds, self._doc_bounds, idx, T,
            )  # fmt: skip
            return tokens, positions, loss_mask
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        ids = idx.tolist()
        n = len(self)
        if ids and (min(ids) < 0 or max(ids) >= n):
            raise IndexError(f"window index out of range [0, {n})")
        T, B = self.seq_len, len(ids)
        T1 = T + 1
        if B == 0:
            return np.empty((0, T1), np.int64), np.empty((0, T), np.int64), np.empty((0, T), bool)
        # (B, 4): shard, ramp row, documents starting inside, first document
        table = self._windows.take(idx, axis=0) if self._windows is not None else self._window_rows(idx)
        rows = table.tolist()

        # Tokens (and shard masks): one slice per window, all copied by one concatenate.
        bounds, toks, masks, has_mask = self._bounds_list, self._tokens, self._masks, self.has_mask
        token_parts, mask_parts = [], []
        to_fix = 0  # document starts inside the batch's windows, plus windows deeper than the ramp
        for w, (k, r0, n_starts, _) in zip(ids, rows):
            if k >= 0:
                lo = w * T - bounds[k]
                token_parts.append(toks[k][lo : lo + T1])
                if has_mask:
                    mask_parts.append(self._all_true if masks[k] is None else masks[k][lo : lo + T1])
            else:
                t, m = self._crossing_window(w * T)
                token_parts.append(t)
                if has_mask:
                    mask_parts.append(m)
            to_fix += n_starts + (r0 < 0)
        tokens = np.empty((B, T1), dtype=np.int64)
        np.concatenate(token_parts, out=tokens.reshape(-1))

        loss_full = np.ones((B, T1), dtype=bool)  # column j: token j is scored as a target (j ≥ 1 used)
        if to_fix > VECTORISE_ABOVE * B:
            positions = self._positions_vectorised(idx, table, loss_full)
        else:
            # Fancy indexing, not take(): take() would first copy the whole strided view.
            positions = self._ramp_rows[table[:, 1]]  # (B, T1); a row -1 is fixed below
            if to_fix:
                self._fix_positions(ids, rows, positions, loss_full)
        if mask_parts:
            loss_full &= np.concatenate(mask_parts).reshape(B, T1)
        return tokens, positions[:, :-1], loss_full[:, 1:]

    def _fix_positions(
        self, ids: list[int], rows: list, positions: np.ndarray, loss_full: np.ndarray
    ) -> None:
        """Restart positions at each document start inside a window (one slice each); 0 in the loss there."""
        T1 = self.seq_len + 1
        ramp, db, zeros = self._ramp, self._doc_bounds, []
        for b, (w, (_, r0, n_starts, f0)) in enumerate(zip(ids, rows)):
            start = w * self.seq_len
            if r0 < 0:  # deeper in its document than the ramp reaches
                np.add(self._columns, start - int(db[f0]), out=positions[b])
            if not n_starts:
                continue
            cuts = (db[f0 + 1 : f0 + 1 + n_starts] - start).tolist()  # columns in [1, T]
            for c, end in zip(cuts, cuts[1:] + [T1]):
                positions[b, c:end] = ramp[: end - c]
            zeros += [b * T1 + c for c in cuts]
        if zeros:
            loss_full.reshape(-1)[zeros] = False

    def _positions_vectorised(self, idx: np.ndarray, table: np.ndarray, loss_full: np.ndarray) -> np.ndarray:
        """Positions for windows holding many documents: each (window, document) segment at once."""
        T = self.seq_len
        T1, B = T + 1, len(idx)
        db = self._doc_bounds
        n_seg = table[:, 2].astype(np.int64) + 1  # (B,) documents overlapping each window (empty ones too)
        ends = np.cumsum(n_seg)
        doc = np.arange(ends[-1]) + np.repeat(table[:, 3] - (ends - n_seg), n_seg)  # (S,) segment document
        start = np.repeat(idx * T, n_seg)  # (S,) its window's first token
        doc_start = db[doc]
        length = np.minimum(db[doc + 1], start + T1) - np.maximum(doc_start, start)  # (S,) ≥ 0, sum B·T1
        # Column of each token's document start (≤ 0 before the window), repeated over its segment.
        positions = np.repeat(doc_start - start, length).reshape(B, T1)
        np.subtract(self._columns, positions, out=positions)
        # Every segment but the first of a window begins with a document's first token; the segments
        # tile the batch row after row, so their flat starts are the running sums of the lengths.
        loss_full.reshape(-1)[np.cumsum(length[:-1])] = False  # first segments hit column 0: unused
        return positions

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        tokens, positions, loss_mask = self.batch([i % len(self)])
        return tokens[0], positions[0], loss_mask[0]


def _address(array: np.ndarray | None) -> int:
    """The address of a C-contiguous array's first element (0 for None)."""
    if array is None:
        return 0
    assert array.flags.c_contiguous
    return array.__array_interface__["data"][0]
