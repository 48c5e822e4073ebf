"""`communs data seen`: was this text / document id / sha256 in a data manifest? An index lookup.

`seen.index` (written by prepare next to provenance.jsonl) is a sorted array of little-endian
uint64 pairs (key, byte offset of the provenance line). Keys are the first 8 bytes of
sha256("id:" + doc id) for ids (each chunk's and its parent's), and the first 8 bytes of the
digest itself for content hashes (final text and text as read). A lookup is a binary search on
the memory-mapped index, then a read of the provenance lines it points to, which confirms the match
(so a truncated-hash collision can never answer "yes" wrongly).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from common.errors import UserError
from corpus.stages import normalise_text

_SHA = re.compile(r"^[0-9a-f]{64}$")


def id_key(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"id:{doc_id}".encode()).digest()[:8], "little")


def sha_key(hex_digest: str) -> int:
    return int.from_bytes(bytes.fromhex(hex_digest)[:8], "little")


def build_index(provenance_path: Path, index_path: Path) -> int:
    """Index every provenance record by id, parent id and content hashes; return the number of keys."""
    keys: list[int] = []
    offsets: list[int] = []
    offset = 0
    with open(provenance_path, "rb") as f:
        for line in f:
            record = json.loads(line)
            ks = {id_key(record["id"]), id_key(record["parent"])}
            for field in ("sha256", "raw_sha256"):
                if record.get(field):
                    ks.add(sha_key(record[field]))
            for k in sorted(ks):
                keys.append(k)
                offsets.append(offset)
            offset += len(line)
    table = np.empty((len(keys), 2), dtype="<u8")
    table[:, 0] = np.asarray(keys, dtype=np.uint64)
    table[:, 1] = np.asarray(offsets, dtype=np.uint64)
    table = table[np.lexsort((table[:, 1], table[:, 0]))]
    tmp = index_path.with_name(f".{index_path.name}.tmp")
    table.tofile(tmp)
    os.replace(tmp, index_path)
    return len(keys)


def _lookup(index_path: Path, provenance_path: Path, key: int) -> list[dict]:
    size = os.path.getsize(index_path)
    if size == 0:
        return []
    table = np.memmap(index_path, dtype="<u8", mode="r").reshape(-1, 2)
    lo = np.searchsorted(table[:, 0], np.uint64(key), side="left")
    hi = np.searchsorted(table[:, 0], np.uint64(key), side="right")
    out = []
    with open(provenance_path, "rb") as f:
        for offset in table[lo:hi, 1]:
            f.seek(int(offset))
            out.append(json.loads(f.readline()))
    return out


def seen(query: str, manifest_path: str | os.PathLike, kind: str = "auto") -> tuple[str, list[dict]]:
    """Look `query` up in a manifest's index. kind: auto | text | id | sha256.

    Returns (how the query was read, matching provenance records (kept and removed)).
    """
    from corpus.manifest import load_manifest

    manifest_path = Path(manifest_path)
    manifest = load_manifest(manifest_path)
    folder = manifest_path if manifest_path.is_dir() else manifest_path.parent
    index_path = folder / manifest["seen_index"]["path"]
    provenance_path = folder / manifest["provenance"]["path"]
    if not index_path.is_file():
        raise UserError(f"{index_path}: missing (the manifest names it)")
    q = query.strip()
    if kind == "auto":
        kind = "sha256" if _SHA.match(q.lower()) else "id"
        if kind == "id" and not _lookup(index_path, provenance_path, id_key(q)):
            kind = "text"
    if kind == "sha256":
        digest = q.lower()
        if not _SHA.match(digest):
            raise UserError(f"{query!r} is not a hex sha256")
        hits = [
            r
            for r in _lookup(index_path, provenance_path, sha_key(digest))
            if digest in (r.get("sha256"), r.get("raw_sha256"))
        ]
        return "sha256", hits
    if kind == "id":
        hits = [r for r in _lookup(index_path, provenance_path, id_key(q)) if q in (r["id"], r["parent"])]
        return "id", hits
    if kind != "text":
        raise UserError(f"unknown query kind {kind!r} (auto, text, id, sha256)")
    # A text matches a document whose final text (after normalisation) or text as read is the same.
    hits: list[dict] = []
    for candidate in dict.fromkeys([query, normalise_text(query)]):
        digest = hashlib.sha256(candidate.encode("utf-8")).hexdigest()
        for r in _lookup(index_path, provenance_path, sha_key(digest)):
            if digest in (r.get("sha256"), r.get("raw_sha256")) and r not in hits:
                hits.append(r)
    return "text", hits
