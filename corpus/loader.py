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

Tokens are sliced from the memory-mapped shards (one slice per window); positions and the loss
mask are computed with numpy for the whole batch from the document offsets (no loop over
documents); `batch(indices)` does a batch of windows at once. The reader holds no state: order and resume belong to the caller
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
        self._doc_bounds = np.append(self.doc_starts, self.n_tokens)  # (n_docs + 1,) starts, then the end
        self.has_mask = any(s.mask is not None for s in self.shards)
        # Plain ndarray views of the memory maps: same pages, without np.memmap's per-slice overhead.
        self._tokens = [np.asarray(s.tokens) for s in self.shards]
        self._masks = [None if s.mask is None else np.asarray(s.mask).view(bool) for s in self.shards]

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
            lo = start + filled - int(self._bounds[k])
            take = min(n - filled, len(self._tokens[k]) - lo)
            tokens[filled : filled + take] = self._tokens[k][lo : lo + take]
            if mask is not None:
                m = self._masks[k]
                mask[filled : filled + take] = True if m is None else m[lo : lo + take]
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
        pos = starts[:, None] + np.arange(T + 1)  # (B, T+1) global token positions

        # Tokens: each window is one contiguous slice of a shard (two at a shard boundary): B slice copies.
        shard_of = np.searchsorted(self._bounds, starts, side="right") - 1  # (B,)
        local = (starts - self._bounds[shard_of]).tolist()
        inside = (starts + T + 1 <= self._bounds[shard_of + 1]).tolist()
        tokens = np.empty((B, T + 1), dtype=np.int64)
        mask = np.ones((B, T + 1), dtype=bool) if self.has_mask else None
        for b, (k, lo, whole) in enumerate(zip(shard_of.tolist(), local, inside)):
            if not whole:
                self._copy_window(int(starts[b]), tokens[b], None if mask is None else mask[b])
                continue
            tokens[b] = self._tokens[k][lo : lo + T + 1]
            if mask is not None and self._masks[k] is not None:
                mask[b] = self._masks[k][lo : lo + T + 1]

        # Position inside its document: pos − start of its document. Each window is a run of document
        # segments; their starts are repeated over their lengths (no loop over documents).
        first = np.searchsorted(self.doc_starts, starts, side="right") - 1  # (B,) document holding each start
        last = np.searchsorted(
            self.doc_starts, starts + T + 1, side="left"
        )  # (B,) one past the last document
        n_seg = last - first  # (B,) segments per window
        offsets = np.cumsum(n_seg) - n_seg
        seg_doc = np.repeat(first - offsets, n_seg) + np.arange(n_seg.sum())  # (S,) document of each segment
        seg_win = np.repeat(np.arange(B), n_seg)  # (S,) window of each segment
        seg_begin = np.maximum(self._doc_bounds[seg_doc], starts[seg_win])
        seg_end = np.minimum(self._doc_bounds[seg_doc + 1], starts[seg_win] + T + 1)
        base = np.repeat(self._doc_bounds[seg_doc], seg_end - seg_begin).reshape(B, T + 1)
        in_doc = pos - base  # (B, T+1)
        loss_mask = in_doc[:, 1:] != 0  # a document's first token is never a target
        if mask is not None:
            loss_mask &= mask[:, 1:]
        return tokens, in_doc[:, :-1], loss_mask

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        tokens, positions, loss_mask = self.batch([i % len(self)])
        return tokens[0], positions[0], loss_mask[0]
