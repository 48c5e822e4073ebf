"""`communs data prepare`: sources file → curated documents + provenance → tokenizer → shards → manifest.

Each step records a fingerprint of what it was made from; a re-run (after a crash, or with nothing
changed) skips the steps whose fingerprint matches and, within the shards of a source, the shards
already finished. Everything that can refuse the input runs before the data directory is touched,
so a failed re-run leaves a good directory as it was. Then the previous manifest is removed (kept
under history/<root hash>/ for exposure reports), every file is written under a temporary name and
renamed, and the manifest comes last: a data directory without manifest.json is unfinished and
nothing reads it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from communs import UserError
from corpus.licences import LICENCES
from corpus.manifest import canonical_json, load_manifest, write_manifest
from corpus.pipeline import Curated, curate, default_workers
from corpus.seen import build_index
from corpus.shards import sha256_file, write_shard
from corpus.sources import Source, SourcesFile, load_sources
from corpus.stages import STAGE_VERSIONS, Doc, wordlist_path

SPLITS = ("train", "val")
_ENCODE_BATCH_CHARS = 1 << 22  # texts handed to the tokenizer's threaded encoder at once


def is_val(doc_id: str, seed: int, fraction: float) -> bool:
    """Held-out or not, from a hash of the (parent) document id (stable when other documents change)."""
    return _split_rank(doc_id, seed) < fraction


def _split_rank(doc_id: str, seed: int) -> float:
    h = hashlib.sha256(f"split:{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_splits(ids: list[str], seed: int, fraction: float, parents: list[str] | None = None) -> list[str]:
    """'train' or 'val' per id, decided per parent document (`parents[i]`, default the id itself).

    All chunks of one document go to the same split, so no validation text was seen in training.
    A source with ≥ 2 parent documents always gets one in each split (when fraction > 0); a source
    with a single parent document (one file cut into chunks) is all train.
    """
    parents = list(ids) if parents is None else parents
    unique = sorted(set(parents))
    if len(unique) < 2 or fraction <= 0:
        return ["train"] * len(ids)
    ranks = {p: _split_rank(p, seed) for p in unique}
    split_of = {p: "val" if r < fraction else "train" for p, r in ranks.items()}
    if "val" not in split_of.values():
        split_of[min(unique, key=ranks.__getitem__)] = "val"
    if "train" not in split_of.values():
        split_of[max(unique, key=ranks.__getitem__)] = "train"
    return [split_of[p] for p in parents]


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("datasets", "datasketch", "py3langid", "sentencepiece"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jsonl(records) -> bytes:
    return b"".join(
        json.dumps(r, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n" for r in records
    )


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def _inputs(sf: SourcesFile, s: Source) -> list[dict]:
    return [
        {"path": _rel(p, sf.path.parent), "sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in s.files
    ]


# ------------------------------------------------------------------------------------ curation


def _curation_fingerprint(sf: SourcesFile, inputs: dict[str, list[dict]]) -> str:
    wordlists = sorted({str(wordlist_path(s.stages["toxicity"], sf.path.parent)) for s in sf.sources})
    return hashlib.sha256(
        canonical_json(
            {
                "sources": sf.raw,
                "inputs": inputs,
                "optout": sha256_file(sf.optout) if sf.optout and sf.optout.is_file() else None,
                "wordlists": [sha256_file(w) for w in wordlists if Path(w).is_file()],
                "stages": STAGE_VERSIONS,
                "libraries": _versions(),
            }
        )
    ).hexdigest()


def _load_curated(out: Path, sf: SourcesFile, state: dict) -> Curated:
    docs: dict[str, list[Doc]] = {}
    for s in sf.sources:
        docs[s.id] = []
        with open(out / "curated" / f"{s.id}.jsonl", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                docs[s.id].append(
                    Doc(
                        id=r["id"],
                        source=s.id,
                        parent=r["id"],
                        raw_sha256="",
                        text=r.get("text"),
                        messages=r.get("messages"),
                    )
                )
    return Curated(docs=docs, provenance=[], counts=state["counts"])


def _curate_step(
    out: Path, sf: SourcesFile, fingerprint: str, workers: int, progress: bool
) -> tuple[Curated, dict[str, list[str]], bool]:
    """The curated documents and their splits, and whether they are new (to be written by
    `_write_curated`). Nothing in `out` changes here: a UserError leaves the directory as it was."""
    state_path = out / "curated" / "state.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        files_ok = (out / "provenance.jsonl").is_file() and all(
            (out / "curated" / f"{s.id}.jsonl").is_file() for s in sf.sources
        )
        if state.get("fingerprint") == fingerprint and files_ok:
            curated = _load_curated(out, sf, state)
            return curated, state["splits"], False
    curated = curate(sf, workers=workers, progress=progress)
    splits: dict[str, list[str]] = {}
    for s in sf.sources:
        docs = curated.docs[s.id]
        splits[s.id] = assign_splits([d.id for d in docs], sf.seed, sf.val_fraction, [d.parent for d in docs])
    split_of = {d.id: sp for s in sf.sources for d, sp in zip(curated.docs[s.id], splits[s.id])}
    for record in curated.provenance:
        if record["fate"] == "kept":
            record["split"] = split_of[record["id"]]
    return curated, splits, True


def _write_curated(out: Path, sf: SourcesFile, curated: Curated, splits: dict, fingerprint: str) -> None:
    state_path = out / "curated" / "state.json"
    # The state goes first and comes back last: a crash in between leaves no state, so a re-run redoes it.
    state_path.unlink(missing_ok=True)
    for s in sf.sources:
        rows = []
        for d, sp in zip(curated.docs[s.id], splits[s.id]):
            row = {"id": d.id, "split": sp}
            row["messages" if d.messages is not None else "text"] = (
                d.messages if d.messages is not None else d.text
            )
            rows.append(row)
        _write_atomic(out / "curated" / f"{s.id}.jsonl", _jsonl(rows))
    _write_atomic(out / "provenance.jsonl", _jsonl(curated.provenance))
    state = {"fingerprint": fingerprint, "counts": curated.counts, "splits": splits}
    _write_atomic(state_path, json.dumps(state, sort_keys=True).encode())


# ----------------------------------------------------------------------------------- tokenizer


_TOKENIZER_STAGING = ".tokenizer.staging"


def _tokenizer_step(out: Path, sf: SourcesFile, curated: Curated, splits, fingerprint: str, vocab_size: int,
                    existing: Path | None, workers: int) -> tuple[Path | None, str | None, dict]:  # fmt: skip
    """Decide (and train, into a staging folder) the tokenizer; `_install_tokenizer` puts it in place.

    Returns (what to install: the --tokenizer file, the staging folder, or None when the one in
    place is current; the training fingerprint, None for --tokenizer; info for the manifest).
    Nothing in out/tokenizer changes here: a UserError (e.g. a sample too small for the vocabulary)
    leaves the directory as it was.
    """
    from tokenizer import sample_texts, train_tokenizer

    if existing is not None:
        return existing, None, {"trained": False}
    tok_dir = out / "tokenizer"
    tok_fp = hashlib.sha256(
        canonical_json([fingerprint, vocab_size, sf.seed, sf.sample_bytes_per_source])
    ).hexdigest()
    state_path = tok_dir / "state.json"
    if (
        (tok_dir / "tokenizer.model").is_file()
        and state_path.is_file()
        and json.loads(state_path.read_text()).get("fingerprint") == tok_fp
    ):
        return None, tok_fp, {"trained": True}

    def train_texts(s: Source):
        # Validation documents stay out of the tokenizer's sample too.
        for d, sp in zip(curated.docs[s.id], splits[s.id]):
            if sp == "train":
                yield d.content()

    sources = {s.id: train_texts(s) for s in sf.sources}
    sample = sample_texts(
        sources, {s.id: 1.0 for s in sf.sources}, sf.sample_bytes_per_source * len(sf.sources), sf.seed
    )
    staging = out / _TOKENIZER_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    train_tokenizer(sample, staging, vocab_size, seed=sf.seed, num_threads=workers)
    return staging, tok_fp, {"trained": True}


def _install_tokenizer(out: Path, new: Path | None, tok_fp: str | None):
    from tokenizer import Tokenizer

    tok_dir = out / "tokenizer"
    model_path = tok_dir / "tokenizer.model"
    state_path = tok_dir / "state.json"
    if new is None:
        return Tokenizer.load(model_path)
    state_path.unlink(missing_ok=True)  # no state while the model changes: a crash means retrain
    tok_dir.mkdir(parents=True, exist_ok=True)
    if tok_fp is None:  # --tokenizer: a copy of the given model
        if not model_path.is_file() or sha256_file(model_path) != sha256_file(new):
            _write_atomic(model_path, new.read_bytes())
        return Tokenizer.load(model_path)
    for f in sorted(new.iterdir()):
        os.replace(f, tok_dir / f.name)
    new.rmdir()
    _write_atomic(state_path, json.dumps({"fingerprint": tok_fp}).encode())
    return Tokenizer.load(model_path)


# -------------------------------------------------------------------------------------- shards


def _encode(tok, docs: list[Doc], workers: int) -> list[np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Documents as the model sees them: [bos] + tokens + [eos]; chat ones with their loss mask."""
    if not docs:
        return []
    if docs[0].messages is not None:
        out = []
        for d in docs:
            ids, mask = tok.encode_chat(d.messages)
            # The final </s> closes the document; it is not a turn the model is taught to end on.
            out.append(
                (np.asarray([*ids, tok.eos_id], dtype=np.uint32), np.asarray([*mask, 0], dtype=np.uint8))
            )
        return out
    encoded = tok.encode_batch([d.text for d in docs], num_threads=workers)
    return [np.asarray([tok.bos_id, *ids, tok.eos_id], dtype=np.uint32) for ids in encoded]


def _shard_step(out: Path, s: Source, split: str, docs: list[Doc], tok, fingerprint: str, max_tokens: int,
                workers: int, progress: bool) -> list[dict]:  # fmt: skip
    folder = out / "shards" / s.id / split
    plan_path = folder / "plan.json"
    plan_fp = hashlib.sha256(canonical_json([fingerprint, tok.sha256, s.id, split, max_tokens])).hexdigest()
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    if plan.get("fingerprint") != plan_fp:
        shutil.rmtree(folder, ignore_errors=True)
        plan = {"fingerprint": plan_fp, "done": [], "complete": False}
    # Keep the finished shards whose record is intact; redo from the first one that is not.
    done = []
    for entry in plan["done"]:
        if not Path(f"{folder / entry['name']}.json").is_file():
            break
        done.append(entry)
    if len(done) != len(plan["done"]):
        plan["complete"] = False
    plan["done"] = done
    if not plan.get("complete"):
        next_doc = done[-1]["first_doc"] + done[-1]["n_docs"] if done else 0
        bar = tqdm(total=len(docs), initial=next_doc, desc=f"encode {s.id}/{split}", unit="doc",
                   disable=not progress, leave=False)  # fmt: skip
        pending: list = []
        pending_tokens = 0
        first = next_doc

        def flush() -> None:
            nonlocal pending, pending_tokens, first
            name = f"{len(plan['done']):05d}"
            write_shard(folder / name, pending)
            plan["done"].append({"name": name, "first_doc": first, "n_docs": len(pending)})
            _write_atomic(plan_path, json.dumps(plan, indent=1).encode())
            first += len(pending)
            pending, pending_tokens = [], 0

        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(plan_path, json.dumps(plan, indent=1).encode())
        i = next_doc
        while i < len(docs):
            batch, chars = [], 0
            while i < len(docs) and chars < _ENCODE_BATCH_CHARS:
                batch.append(docs[i])
                chars += len(docs[i].content())
                i += 1
            for item in _encode(tok, batch, workers):
                n = len(item[0] if isinstance(item, tuple) else item)
                if pending and pending_tokens + n > max_tokens:
                    flush()
                pending.append(item)
                pending_tokens += n
            bar.update(len(batch))
        if pending:
            flush()
        bar.close()
        plan["complete"] = True
        _write_atomic(plan_path, json.dumps(plan, indent=1).encode())
    shards = []
    for entry in plan["done"]:
        record_path = Path(f"{folder / entry['name']}.json")
        record = json.loads(record_path.read_text())
        shards.append({
            "path": _rel(folder / entry["name"], out), "n_docs": record["n_docs"], "n_tokens": record["n_tokens"],
            "has_mask": record["has_mask"], "sha256": sha256_file(record_path),
        })  # fmt: skip
    return shards


# ------------------------------------------------------------------------------------- prepare


def _archive_previous(out: Path) -> None:
    """Move a previous manifest (and its provenance) to history/<root hash>/ before anything changes."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return
    try:
        old = load_manifest(manifest_path)
    except UserError:
        manifest_path.unlink()
        return
    keep = out / "history" / old["root_hash"]
    if not (keep / "manifest.json").is_file():
        keep.mkdir(parents=True, exist_ok=True)
        prov = out / old["provenance"]["path"]
        if prov.is_file():
            shutil.copyfile(prov, keep / ".provenance.jsonl.tmp")
            os.replace(keep / ".provenance.jsonl.tmp", keep / "provenance.jsonl")
        # The archived copy is the original manifest byte for byte; provenance sits beside it.
        shutil.copyfile(manifest_path, keep / ".manifest.json.tmp")
        os.replace(keep / ".manifest.json.tmp", keep / "manifest.json")
    manifest_path.unlink()


def _remove_temporaries(out: Path) -> None:
    for tmp in glob.glob(str(out / "**" / ".*.tmp"), recursive=True):
        Path(tmp).unlink(missing_ok=True)


def prepare(
    sources_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> dict:
    """Build a data directory from a sources file; return the manifest (also in out_dir/manifest.json).

    `timings`, when given, receives the wall time of each step (curate, tokenizer, shards, manifest).
    """
    timings = {} if timings is None else timings
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = timings.get(step, 0.0) + now - clock
        clock = now

    sf = load_sources(sources_path)
    out = Path(out_dir)
    workers = workers or default_workers()
    vocab_size = vocab_size or sf.vocab_size
    existing = Path(tokenizer) if tokenizer else None
    if existing is not None:
        if not existing.is_file():
            raise UserError(f"--tokenizer {existing}: no such file")
        from tokenizer import Tokenizer

        Tokenizer.load(existing)  # not a sentencepiece model → UserError naming the file
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        # Every step that can refuse the input (curation, the emptiness check, tokenizer training)
        # runs before the directory is touched, so a bad re-run leaves a good directory exactly as
        # it was. Only then is the previous manifest archived and are the new files put in place.
        inputs = {s.id: _inputs(sf, s) for s in sf.sources}
        fingerprint = _curation_fingerprint(sf, inputs)
        curated, splits, fresh = _curate_step(out, sf, fingerprint, workers, progress)
        _check_not_empty(sources_path, sf, curated, splits)
        lap("curate")
        new_tok, tok_fp, tok_info = _tokenizer_step(
            out, sf, curated, splits, fingerprint, vocab_size, existing, workers
        )
        _archive_previous(out)
        if fresh:
            _write_curated(out, sf, curated, splits, fingerprint)
        tok = _install_tokenizer(out, new_tok, tok_fp)
        lap("tokenizer")
        source_entries = {}
        for s in sf.sources:
            split_entries = {}
            for split in SPLITS:
                docs = [d for d, sp in zip(curated.docs[s.id], splits[s.id]) if sp == split]
                shards = _shard_step(
                    out, s, split, docs, tok, fingerprint, sf.shard_max_tokens, workers, progress
                )
                split_entries[split] = {
                    "n_docs": sum(x["n_docs"] for x in shards),
                    "n_tokens": sum(x["n_tokens"] for x in shards),
                    "shards": shards,
                }
            source_entries[s.id] = _source_entry(sf, s, inputs[s.id], curated.counts[s.id], split_entries)
        # Sources no longer in the sources file leave no shards behind.
        for stale in sorted(set(os.listdir(out / "shards")) - {s.id for s in sf.sources}):
            shutil.rmtree(out / "shards" / stale)
        for stale in glob.glob(str(out / "curated" / "*.jsonl")):
            if Path(stale).stem not in source_entries:
                Path(stale).unlink()
        lap("shards")
        n_keys = build_index(out / "provenance.jsonl", out / "seen.index")
        manifest = write_manifest(
            _manifest(out, sf, tok, tok_info, source_entries, n_keys), out / "manifest.json"
        )
        lap("manifest")
        return manifest
    except UserError:
        # Bad input: leave nothing behind (a folder this call created goes entirely).
        _remove_temporaries(out)
        shutil.rmtree(out / _TOKENIZER_STAGING, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    except BaseException:
        # A crash or an interrupt keeps what is finished, for a resumed prepare.
        _remove_temporaries(out)
        shutil.rmtree(out / _TOKENIZER_STAGING, ignore_errors=True)
        raise


def _check_not_empty(sources_path, sf: SourcesFile, curated, splits: dict) -> None:
    """A source that keeps no training document is an error, named with its counts, before any tokenizer."""
    for s in sf.sources:
        if "train" not in splits[s.id]:
            c = curated.counts[s.id]
            removed = ", ".join(f"{n} {rule}" for rule, n in sorted(c["removed"].items())) or "none"
            raise UserError(
                f"{sources_path}: sources[{s.id}]: no document left to train on "
                f"({c['read']} read, {c['kept']} kept, removed: {removed})"
            )


def _source_entry(sf: SourcesFile, s: Source, inputs: list[dict], counts: dict, splits: dict) -> dict:
    entry = {
        "licence": s.licence,
        "language": s.language,
        "domain": s.domain,
        "kind": s.kind,
        "url": s.url,
        "notice": s.notice,
        "conditions": s.conditions.to_json(),
        "inputs": inputs,
        "reader": {
            "format": s.format,
            "hf_dataset": s.hf_dataset,
            "generator": s.generator,
            "params": s.params,
            "chunk_chars": s.chunk_chars,
            "errors": s.errors,
        },  # fmt: skip
        "stages": s.stages,
        "counts": counts,
        "splits": splits,
    }
    return entry


def _manifest(out: Path, sf: SourcesFile, tok, tok_info: dict, sources: dict, n_keys: int) -> dict:
    provenance = out / "provenance.jsonl"
    n_records = n_kept = 0
    removed: dict[str, int] = {}
    with open(provenance, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            n_records += 1
            if r["fate"] == "kept":
                n_kept += 1
            else:
                removed[r["rule"]] = removed.get(r["rule"], 0) + 1
    entries = []
    if sf.optout and sf.optout.is_file():
        from corpus.optout import read_entries

        entries = read_entries(sf.optout)
    attribution = [
        {"source": sid, "licence": src["licence"], "url": src["url"], "notice": src["notice"]}
        for sid, src in sources.items()
        if src["conditions"]["attribution"]
    ]
    return {
        "sources_file": {"name": sf.path.name, "sha256": sha256_file(sf.path)},
        "seed": sf.seed,
        "split": {"val_fraction": sf.val_fraction, "by": "sha256('split:<seed>:<parent doc id>')"},
        "pipeline": {
            "order": sf.order,
            "errors": sf.errors,
            "chunk_chars": sf.chunk_chars,
            "stages": {
                name: {"version": STAGE_VERSIONS[name], "params": sf.stages[name]} for name in sf.order
            },
            "libraries": _versions(),
        },
        "release": {
            "licence": sf.release_licence,
            "licence_terms": LICENCES[sf.release_licence].__dict__,
            "attribution": attribution,
        },
        "optout": {
            "path": sf.optout.name if sf.optout else None,
            "sha256": sha256_file(sf.optout) if sf.optout and sf.optout.is_file() else None,
            "n_entries": len(entries),
        },
        "tokenizer": {
            "path": _rel(Path(tok.path), out),
            "sha256": sha256_file(tok.path),
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "trained_here": tok_info["trained"],
            "sample_bytes_per_source": sf.sample_bytes_per_source,
        },
        "sources": sources,
        "totals": {
            "records": n_records,
            "kept": n_kept,
            "removed": dict(sorted(removed.items())),
            "tokens": sum(sp["n_tokens"] for s in sources.values() for sp in s["splits"].values()),
        },
        "provenance": {"path": "provenance.jsonl", "sha256": sha256_file(provenance), "n_records": n_records},
        "seen_index": {"path": "seen.index", "sha256": sha256_file(out / "seen.index"), "n_keys": n_keys},
        "curated": {
            sid: {"path": f"curated/{sid}.jsonl", "sha256": sha256_file(out / "curated" / f"{sid}.jsonl")}
            for sid in sources
        },
    }
