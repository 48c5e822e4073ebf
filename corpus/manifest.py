"""The data manifest: what a data directory holds, where it came from, and one root hash over it.

`manifest.json` (format "communs.manifest/1", fields in docs/formats.md) is written last by
`communs data prepare`, atomically. Its `root_hash` is the sha256 of the manifest's canonical JSON
(sorted keys, no whitespace) without the `root_hash` field; every file the manifest names carries
its own sha256 (shards through their .json record), so the root hash pins everything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from common.errors import UserError
from common.io import canonical_json, sha256_file
from corpus.shards import verify_shard

FORMAT = "communs.manifest/1"


def root_hash(manifest: dict) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in manifest.items() if k != "root_hash"})).hexdigest()


def write_manifest(manifest: dict, path: str | Path) -> dict:
    """Add the root hash and write `path` atomically; return the manifest."""
    path = Path(path)
    manifest = {**manifest, "format": FORMAT}
    manifest["root_hash"] = root_hash(manifest)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)
    return manifest


def load_manifest(path: str | os.PathLike) -> dict:
    """Read a manifest (a file, or a data directory holding manifest.json) and check its root hash."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise UserError(f"{path}: no such manifest (run `communs data prepare` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSON manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{path}: format {got!r}, expected {FORMAT!r}")
    if manifest.get("root_hash") != root_hash(manifest):
        raise UserError(f"{path}: root_hash does not match the manifest's content (edited or corrupted)")
    return manifest


def shard_prefixes(
    manifest: dict, manifest_path: str | os.PathLike, source_id: str, split: str
) -> list[Path]:
    """Absolute shard prefixes of one source's split, in order."""
    manifest_path = Path(manifest_path)
    folder = manifest_path if manifest_path.is_dir() else manifest_path.parent
    sources = manifest["sources"]
    if source_id not in sources:
        raise UserError(f"{manifest_path}: no source {source_id!r} (sources: {', '.join(sorted(sources))})")
    splits = sources[source_id]["splits"]
    if split not in splits:
        raise UserError(
            f"{manifest_path}: source {source_id!r} has no split {split!r} (splits: {sorted(splits)})"
        )
    return [(folder / s["path"]).resolve() for s in splits[split]["shards"]]


def verify_data_dir(data_dir: str | os.PathLike) -> list[str]:
    """Recompute every hash a data directory's manifest names; return what does not match."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir / "manifest.json")
    problems: list[str] = []

    def check(rel: str, expected: str) -> None:
        p = data_dir / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif sha256_file(p) != expected:
            problems.append(f"{p}: sha256 differs from the manifest")

    check(manifest["tokenizer"]["path"], manifest["tokenizer"]["sha256"])
    check(manifest["provenance"]["path"], manifest["provenance"]["sha256"])
    check(manifest["seen_index"]["path"], manifest["seen_index"]["sha256"])
    for entry in manifest["curated"].values():
        check(entry["path"], entry["sha256"])
    for sid, src in manifest["sources"].items():
        for split, info in src["splits"].items():
            for shard in info["shards"]:
                prefix = data_dir / shard["path"]
                record = Path(f"{prefix}.json")
                if not record.is_file():
                    problems.append(f"{record}: missing ({sid}/{split})")
                    continue
                if sha256_file(record) != shard["sha256"]:
                    problems.append(f"{record}: sha256 differs from the manifest")
                    continue
                try:
                    problems += [f"{bad}: sha256 differs from {record}" for bad in verify_shard(prefix)]
                except FileNotFoundError as e:
                    problems.append(f"{e.filename}: missing")
    return problems
