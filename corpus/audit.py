"""Questions an auditor asks of data manifests: what changed between two builds, and which runs
trained on documents that have since been opted out."""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.errors import UserError
from corpus.manifest import load_manifest
from corpus.optout import optout_set, read_entries


def _manifest_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / "manifest.json" if path.is_dir() else path


def provenance(manifest_path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """A manifest and its provenance records (the file's hash checked against the manifest)."""
    from common.io import sha256_file

    manifest_path = _manifest_file(manifest_path)
    manifest = load_manifest(manifest_path)
    prov = manifest_path.parent / manifest["provenance"]["path"]
    if not prov.is_file():
        raise UserError(f"{prov}: missing (named by {manifest_path})")
    if sha256_file(prov) != manifest["provenance"]["sha256"]:
        raise UserError(f"{prov}: sha256 differs from {manifest_path}")
    with open(prov, encoding="utf-8") as f:
        return manifest, [json.loads(line) for line in f]


def diff_manifests(old: str | os.PathLike, new: str | os.PathLike) -> dict[str, list[dict]]:
    """Documents kept in `old` but not in `new` (with the rule that removed them), kept in `new` only,
    and kept in both with a different text."""
    _, old_records = provenance(old)
    _, new_records = provenance(new)
    old_kept = {r["id"]: r for r in old_records if r["fate"] == "kept"}
    new_by_id = {r["id"]: r for r in new_records}
    new_kept = {i for i, r in new_by_id.items() if r["fate"] == "kept"}
    removed, changed = [], []
    for doc_id, r in old_kept.items():
        after = new_by_id.get(doc_id)
        if doc_id not in new_kept:
            removed.append(
                {"id": doc_id, "source": r["source"], "rule": after["rule"] if after else "absent"}
            )
        elif after["sha256"] != r["sha256"]:
            changed.append(
                {
                    "id": doc_id,
                    "source": r["source"],
                    "old_sha256": r["sha256"],
                    "new_sha256": after["sha256"],
                }
            )
    added = [
        {"id": i, "source": new_by_id[i]["source"]} for i in new_by_id if i in new_kept and i not in old_kept
    ]
    return {"removed": removed, "added": added, "changed": changed}


def _find_manifest(path: Path, wanted_hash: str | None) -> Path | None:
    """The manifest a run used: the file it names if the hash matches, else the archived copy."""
    if path.is_file():
        try:
            if wanted_hash is None or load_manifest(path)["root_hash"] == wanted_hash:
                return path
        except UserError:
            pass
    if wanted_hash:
        archived = path.parent / "history" / wanted_hash / "manifest.json"
        if archived.is_file():
            return archived
    return None


def exposure(optout_file: str | os.PathLike, runs: list[str | os.PathLike]) -> list[dict]:
    """Runs (and their checkpoints) whose data manifest kept documents that the opt-out list names.

    A run is a folder with run.json holding `manifest` (path) and `manifest_root_hash`; `runs` may
    name runs or folders of runs.
    """
    match = optout_set(read_entries(optout_file)).match
    run_dirs: list[Path] = []
    for r in runs:
        r = Path(r)
        if not r.is_dir():
            raise UserError(f"{r}: no such runs folder")
        run_dirs += [r] if (r / "run.json").is_file() else sorted(p.parent for p in r.glob("*/run.json"))
    report = []
    cache: dict[Path, list[dict]] = {}
    for run in run_dirs:
        info = json.loads((run / "run.json").read_text())
        root = info.get("manifest_root_hash")
        manifest_path = info.get("manifest") or info.get("manifest_path")
        entry = {
            "run": str(run),
            "manifest": manifest_path,
            "manifest_root_hash": root,
            "documents": [],
            "checkpoints": [],
        }
        found = _find_manifest(Path(manifest_path), root) if manifest_path else None
        if found is None:
            entry["error"] = "manifest not found (neither at its path nor in its history folder)"
            report.append(entry)
            continue
        if found not in cache:
            cache[found] = provenance(found)[1]
        for rec in cache[found]:
            if rec["fate"] != "kept":
                continue
            rule = match(
                rec["id"],
                rec["parent"],
                (rec["sha256"], rec.get("raw_sha256") or ""),
                rec.get("author"),
                rec.get("url"),
            )
            if rule:
                entry["documents"].append({"id": rec["id"], "source": rec["source"], "rule": rule})
        if not entry["documents"]:
            continue
        for client in sorted((run / "checkpoints").glob("*/client.json")):
            if client.parent.name.startswith("."):
                continue
            ckpt_hash = json.loads(client.read_text()).get("manifest_root_hash")
            if ckpt_hash in (None, root):
                entry["checkpoints"].append(client.parent.name)
        report.append(entry)
    return report
