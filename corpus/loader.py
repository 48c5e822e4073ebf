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

Everything is computed with numpy on whole windows (no loop over documents); `batch(indices)`
does a batch of windows at once. The reader holds no state: order and resume belong to the caller
(`order(seed, epoch)` gives a seeded permutation of the windows).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from corpus.shards import Shard


class PackedReader:
    def __init__(self, prefixes: Sequence[str | os.PathLike], seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        if not prefixes:
            raise ValueError("PackedReader needs at least one shard prefix")
        self.seq_len = seq_len
        self.shards = [Shard.open(p) for p in prefixes]
        sizes = np.array([s.n_tokens for s in self.shards], dtype=np.int64)
        self._bounds = np.concatenate([[0], np.cumsum(sizes)])  # (n_shards + 1,) first token of each shard
        self.n_tokens = int(self._bounds[-1])
        # (n_docs,) global index of every document's first token, increasing.
        self.doc_starts = np.concatenate(
            [s.offsets[:-1].astype(np.int64) + b for s, b in zip(self.shards, self._bounds[:-1])]
        )
        self.n_docs = len(self.doc_starts)
        self.has_mask = any(s.mask is not None for s in self.shards)

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def order(self, seed: int, epoch: int = 0) -> np.ndarray:
        """A seeded permutation of the window indices (a pure function of seed, epoch and len)."""
        return np.random.default_rng([seed, epoch, len(self)]).permutation(len(self))

    def _copy_window(self, start: int, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        """Copy tokens [start, start + len(tokens)) into `tokens` (and `mask`): one slice per shard crossed."""
        k = int(np.searchsorted(self._bounds, start, side="right")) - 1
        filled, n = 0, len(tokens)
        while filled < n:
            shard = self.shards[k]
            lo = start + filled - int(self._bounds[k])
            take = min(n - filled, shard.n_tokens - lo)
            tokens[filled : filled + take] = shard.tokens[lo : lo + take]
            if mask is not None:
                mask[filled : filled + take] = True if shard.mask is None else shard.mask[lo : lo + take]
            filled += take
            k += 1

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows `indices` stacked: tokens (B, T+1), position_ids (B, T), loss_mask (B, T)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"window index out of range [0, {n})")
        T, B = self.seq_len, len(idx)
        starts = idx * T  # (B,) first global token of each window
        tokens = np.empty((B, T + 1), dtype=np.int64)
        mask = np.empty((B, T + 1), dtype=bool) if self.has_mask else None
        for b in range(B):  # contiguous slices of the memory maps, no per-document work
            self._copy_window(int(starts[b]), tokens[b], None if mask is None else mask[b])

        # Position inside its document for every token: pos − (start of the latest document starting at or
        # before it). Scatter each window's inner document starts, then a running maximum along the window.
        first = np.searchsorted(self.doc_starts, starts, side="right") - 1  # (B,) document holding the start
        last = np.searchsorted(self.doc_starts, starts + T + 1, side="left")  # (B,) end of the documents seen
        inner = last - first - 1  # (B,) documents starting strictly inside each window
        base = np.zeros((B, T + 1), dtype=np.int64)
        base[:, 0] = self.doc_starts[first]
        if inner.sum():
            rows = np.repeat(np.arange(B), inner)
            docs = np.repeat(first + 1, inner) + (
                np.arange(inner.sum()) - np.repeat(np.cumsum(inner) - inner, inner)
            )
            base[rows, self.doc_starts[docs] - starts[rows]] = self.doc_starts[docs]
        np.maximum.accumulate(base, axis=1, out=base)
        in_doc = starts[:, None] + np.arange(T + 1) - base  # (B, T+1)
        loss_mask = in_doc[:, 1:] != 0  # a document's first token is never a target
        if mask is not None:
            loss_mask &= mask[:, 1:]
        return tokens, in_doc[:, :-1], loss_mask

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        tokens, positions, loss_mask = self.batch([i % len(self)])
        return tokens[0], positions[0], loss_mask[0]
