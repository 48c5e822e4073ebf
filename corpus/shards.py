"""Token shards: the on-disk format every training token is read from.

A shard is four files sharing a prefix (e.g. ``shards/roman19/train/00000``):

    PREFIX.tokens  uint32 little-endian, the documents' tokens back to back (BOS … EOS included)
    PREFIX.index   uint64 little-endian, n_docs + 1 offsets into .tokens (first 0, last n_tokens)
    PREFIX.mask    uint8, one per token, 1 = the loss is taken on this token (only for sources
                   whose documents carry a loss mask, e.g. chat data: assistant tokens only)
    PREFIX.json    {"format", "n_docs", "n_tokens", "has_mask", "sha256": {file suffix: hex}}

The .json file is written last, after the data files are complete and hashed: a shard without
its .json is unfinished and is never read (nor counted by a resumed preparation).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.io import sha256_file

FORMAT = "communs.shard/1"
TOKEN_DTYPE = np.dtype("<u4")
INDEX_DTYPE = np.dtype("<u8")


def write_shard(
    prefix: str | os.PathLike, docs: Iterable[np.ndarray | tuple[np.ndarray, np.ndarray]]
) -> dict:
    """Write one shard from documents (token arrays, or (tokens, mask) pairs); return its .json record.

    Data files are written under temporary names and renamed; the .json comes last.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = {s: prefix.with_name(f".{prefix.name}.{s}.tmp") for s in ("tokens", "index", "mask")}
    offsets = [0]
    has_mask = None
    with open(tmp["tokens"], "wb") as ft, open(tmp["mask"], "wb") as fm:
        for doc in docs:
            tokens, mask = doc if isinstance(doc, tuple) else (doc, None)
            if has_mask is None:
                has_mask = mask is not None
            if has_mask != (mask is not None):
                raise ValueError(f"{prefix}: documents must all have a loss mask or none")
            tokens = np.asarray(tokens, dtype=TOKEN_DTYPE)
            ft.write(tokens.tobytes())
            if has_mask:
                mask = np.asarray(mask, dtype=np.uint8)
                if mask.shape != tokens.shape:
                    raise ValueError(f"{prefix}: mask length {mask.shape} != tokens {tokens.shape}")
                fm.write(mask.tobytes())
            offsets.append(offsets[-1] + len(tokens))
    np.asarray(offsets, dtype=INDEX_DTYPE).tofile(tmp["index"])
    suffixes = ["tokens", "index"] + (["mask"] if has_mask else [])
    if not has_mask:
        tmp["mask"].unlink()
    record = {
        "format": FORMAT,
        "n_docs": len(offsets) - 1,
        "n_tokens": offsets[-1],
        "has_mask": bool(has_mask),
        "sha256": {s: sha256_file(tmp[s]) for s in suffixes},
    }
    for s in suffixes:
        os.replace(tmp[s], f"{prefix}.{s}")
    json_tmp = prefix.with_name(f".{prefix.name}.json.tmp")
    json_tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(json_tmp, f"{prefix}.json")
    return record


def verify_shard(prefix: str | os.PathLike) -> list[str]:
    """Recompute a shard's hashes; return the files that do not match (empty = intact)."""
    record = json.loads(Path(f"{prefix}.json").read_text())
    return [f"{prefix}.{s}" for s, h in record["sha256"].items() if sha256_file(f"{prefix}.{s}") != h]


@dataclass
class Shard:
    """One shard, memory-mapped (nothing is read until a document is asked for)."""

    prefix: Path
    tokens: np.ndarray  # (n_tokens,) uint32
    offsets: np.ndarray  # (n_docs + 1,) uint64
    mask: np.ndarray | None  # (n_tokens,) uint8

    @classmethod
    def open(cls, prefix: str | os.PathLike) -> Shard:
        prefix = Path(prefix)
        meta_path = Path(f"{prefix}.json")
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: shard is missing or unfinished (no .json record)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")

        def mmap(suffix: str, dtype: np.dtype) -> np.ndarray:
            path = f"{prefix}.{suffix}"
            if os.path.getsize(path) == 0:
                return np.zeros(0, dtype=dtype)
            return np.memmap(path, dtype=dtype, mode="r")

        tokens = mmap("tokens", TOKEN_DTYPE)
        offsets = mmap("index", INDEX_DTYPE)
        if len(tokens) != meta["n_tokens"] or len(offsets) != meta["n_docs"] + 1:
            raise ValueError(f"{prefix}: sizes do not match {meta_path} (truncated shard?)")
        mask = mmap("mask", np.dtype(np.uint8)) if meta["has_mask"] else None
        return cls(prefix, tokens, offsets, mask)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def doc_mask(self, i: int) -> np.ndarray | None:
        return None if self.mask is None else self.mask[self.offsets[i] : self.offsets[i + 1]]
