"""`communs data prepare`: sources file → curated documents + provenance → tokenizer → shards → manifest.

Each step records a fingerprint of what it was made from; a re-run (after a crash, or with nothing
changed) skips the steps whose fingerprint matches and, within the shards of a source, the shards
already finished. Everything streams: curation writes its files as documents come out of the
pipeline (into a staging folder), the tokenizer's sample and the shards read them back line by line,
and the encoding runs in the same worker pool as curation. Everything that can refuse the input runs
before the data directory is touched (the staging folder aside, removed on error), so a failed
re-run leaves a good directory as it was. Then the previous manifest is removed (kept
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
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.errors import UserError
from common.io import canonical_json, iter_jsonl, sha256_file, write_atomic
from corpus.licences import LICENCES
from corpus.manifest import load_manifest, write_manifest
from corpus.pipeline import WorkerPool, curate_to, default_workers, open_pool, worker_state
from corpus.seen import build_index
from corpus.shards import write_shard
from corpus.sources import Source, SourcesFile, load_sources
from corpus.stages import STAGE_VERSIONS, content_text, wordlist_path
from tokenizer import Tokenizer, sample_texts, train_tokenizer

SPLITS = ("train", "val")
_ENCODE_UNIT_BYTES = 1 << 18  # curated rows per encoding task (read back as raw lines)
_CURATION_STAGING = ".curation.staging"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("datasets", "datasketch", "py3langid", "sentencepiece"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


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


def _curate_step(
    out: Path, sf: SourcesFile, fingerprint: str, pool: Callable[..., WorkerPool], progress: bool
) -> tuple[dict, Path, bool]:
    """The curation state ({fingerprint, counts, split_counts}), the folder holding its files
    (`out` when they are current, else the staging folder they were just written to, installed by
    `_install_curated`), and whether they are new. Nothing in `out` but the staging folder changes
    here: a UserError leaves the directory as it was."""
    state_path = out / "curated" / "state.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        files_ok = (out / "provenance.jsonl").is_file() and all(
            (out / "curated" / f"{s.id}.jsonl").is_file() for s in sf.sources
        )
        if state.get("fingerprint") == fingerprint and "split_counts" in state and files_ok:
            return state, out, False
    staging = out / _CURATION_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    result = curate_to(sf, staging, pool(curating=True), progress)
    state = {"fingerprint": fingerprint, "counts": result.counts, "split_counts": result.split_counts}
    return state, staging, True


def _install_curated(out: Path, sf: SourcesFile, staging: Path, state: dict) -> None:
    state_path = out / "curated" / "state.json"
    # The state goes first and comes back last: a crash in between leaves no state, so a re-run redoes it.
    state_path.unlink(missing_ok=True)
    (out / "curated").mkdir(parents=True, exist_ok=True)
    for s in sf.sources:
        os.replace(staging / "curated" / f"{s.id}.jsonl", out / "curated" / f"{s.id}.jsonl")
    os.replace(staging / "provenance.jsonl", out / "provenance.jsonl")
    shutil.rmtree(staging)
    write_atomic(state_path, json.dumps(state, sort_keys=True).encode())


def _curated_rows(curated_dir: Path, source_id: str, split: str):
    """The kept rows of a source's split, streamed from its curated file."""
    for _, row in iter_jsonl(curated_dir / "curated" / f"{source_id}.jsonl"):
        if row["split"] == split:
            yield row


def _content(row: dict) -> str:
    return content_text(row.get("text"), row.get("messages"))


# ----------------------------------------------------------------------------------- tokenizer


_TOKENIZER_STAGING = ".tokenizer.staging"


def _tokenizer_step(out: Path, sf: SourcesFile, curated_dir: Path, fingerprint: str, vocab_size: int,
                    existing: Path | None, workers: int) -> tuple[Path | None, str | None, dict]:  # fmt: skip
    """Decide (and train, into a staging folder) the tokenizer; `_install_tokenizer` puts it in place.

    Returns (what to install: the --tokenizer file, the staging folder, or None when the one in
    place is current; the training fingerprint, None for --tokenizer; info for the manifest).
    Nothing in out/tokenizer changes here: a UserError (e.g. a sample too small for the vocabulary)
    leaves the directory as it was.
    """
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

    # Validation documents stay out of the tokenizer's sample too. Each source is read lazily when
    # sample_texts reaches it; it holds about the sample in memory.
    sources = {s.id: map(_content, _curated_rows(curated_dir, s.id, "train")) for s in sf.sources}
    sample = sample_texts(
        sources, {s.id: 1.0 for s in sf.sources}, sf.sample_bytes_per_source * len(sf.sources), sf.seed
    )
    staging = out / _TOKENIZER_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    train_tokenizer(sample, staging, vocab_size, seed=sf.seed, num_threads=workers)
    return staging, tok_fp, {"trained": True}


def _install_tokenizer(out: Path, new: Path | None, tok_fp: str | None):
    tok_dir = out / "tokenizer"
    model_path = tok_dir / "tokenizer.model"
    state_path = tok_dir / "state.json"
    if new is None:
        return Tokenizer.load(model_path)
    state_path.unlink(missing_ok=True)  # no state while the model changes: a crash means retrain
    tok_dir.mkdir(parents=True, exist_ok=True)
    if tok_fp is None:  # --tokenizer: a copy of the given model
        if not model_path.is_file() or sha256_file(model_path) != sha256_file(new):
            write_atomic(model_path, new.read_bytes())
        return Tokenizer.load(model_path)
    for f in sorted(new.iterdir()):
        os.replace(f, tok_dir / f.name)
    new.rmdir()
    write_atomic(state_path, json.dumps({"fingerprint": tok_fp}).encode())
    return Tokenizer.load(model_path)


# -------------------------------------------------------------------------------------- shards


def _encode_rows(task: tuple[str, dict[str, int], list[tuple[int, bytes]]]) -> list[tuple[str, int, object]]:
    """Worker: curated rows (raw lines with the byte offset just past each) → (split, offset, document
    as the model sees it: [bos] + tokens + [eos], a chat one as (tokens, loss mask)). Rows of a split
    that end at or before `skip[split]` are in finished shards already and are left out."""
    tok_path, skip, lines = task
    cache = worker_state().setdefault("tokenizers", {})
    if tok_path not in cache:
        cache[tok_path] = Tokenizer.load(tok_path)
    tok = cache[tok_path]
    rows = []
    for end, raw in lines:
        row = json.loads(raw)
        if end > skip[row["split"]]:
            rows.append((row["split"], end, row))
    if rows and "messages" in rows[0][2]:
        out = []
        for split, end, row in rows:
            ids, mask = tok.encode_chat(row["messages"])
            # The final </s> closes the document; it is not a turn the model is taught to end on.
            doc = (np.asarray([*ids, tok.eos_id], dtype=np.uint32), np.asarray([*mask, 0], dtype=np.uint8))
            out.append((split, end, doc))
        return out
    encoded = tok.encode_batch([row["text"] for _, _, row in rows], num_threads=1)
    return [
        (split, end, np.asarray([tok.bos_id, *ids, tok.eos_id], dtype=np.uint32))
        for (split, end, _), ids in zip(rows, encoded)
    ]


class _ShardWriter:
    """One source's split: its plan (fingerprint, finished shards), and the shard being filled.

    Each finished shard's plan entry records `end`, the byte offset in the curated file just past its
    last document: a resumed run reads the curated file from the earliest such offset of the splits
    still to do, and leaves out what is already in finished shards."""

    def __init__(self, out: Path, s: Source, split: str, tok, fingerprint: str, max_tokens: int):
        self.folder = out / "shards" / s.id / split
        self.plan_path = self.folder / "plan.json"
        self.max_tokens = max_tokens
        plan_fp = hashlib.sha256(
            canonical_json([fingerprint, tok.sha256, s.id, split, max_tokens])
        ).hexdigest()
        plan = json.loads(self.plan_path.read_text()) if self.plan_path.is_file() else {}
        if plan.get("fingerprint") != plan_fp:
            shutil.rmtree(self.folder, ignore_errors=True)
            plan = {"fingerprint": plan_fp, "done": [], "complete": False}
        # Keep the finished shards whose record is intact; redo from the first one that is not.
        done = []
        for entry in plan["done"]:
            if "end" not in entry or not Path(f"{self.folder / entry['name']}.json").is_file():
                break
            done.append(entry)
        if len(done) != len(plan["done"]):
            plan["complete"] = False
        plan["done"] = done
        self.plan = plan
        self.complete = bool(plan.get("complete"))
        self.resume_at = done[-1]["end"] if done else 0
        self.first = done[-1]["first_doc"] + done[-1]["n_docs"] if done else 0
        self.pending: list = []
        self.pending_tokens = 0
        self.pending_end = 0
        if not self.complete:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.plan_path, json.dumps(self.plan, indent=1).encode())

    def add(self, doc, end: int) -> None:
        n = len(doc[0] if isinstance(doc, tuple) else doc)
        if self.pending and self.pending_tokens + n > self.max_tokens:
            self._flush()
        self.pending.append(doc)
        self.pending_tokens += n
        self.pending_end = end

    def _flush(self) -> None:
        name = f"{len(self.plan['done']):05d}"
        write_shard(self.folder / name, self.pending)
        entry = {"name": name, "first_doc": self.first, "n_docs": len(self.pending), "end": self.pending_end}
        self.plan["done"].append(entry)
        write_atomic(self.plan_path, json.dumps(self.plan, indent=1).encode())
        self.first += len(self.pending)
        self.pending, self.pending_tokens = [], 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        self.plan["complete"] = self.complete = True
        write_atomic(self.plan_path, json.dumps(self.plan, indent=1).encode())

    def records(self, out: Path) -> list[dict]:
        shards = []
        for entry in self.plan["done"]:
            record_path = Path(f"{self.folder / entry['name']}.json")
            record = json.loads(record_path.read_text())
            shards.append({
                "path": _rel(self.folder / entry["name"], out), "n_docs": record["n_docs"],
                "n_tokens": record["n_tokens"], "has_mask": record["has_mask"], "sha256": sha256_file(record_path),
            })  # fmt: skip
        return shards


def _shard_step(out: Path, sources: list[Source], tok, fingerprint: str, max_tokens: int,
                pool: Callable[[], WorkerPool], progress: bool) -> dict[str, dict[str, list[dict]]]:  # fmt: skip
    """Every source's splits, from one pass over each curated file, encoded in the worker pool as one
    ordered stream over all sources (the next source's rows are in flight while one finishes).
    Returns {source id: {split: shard records}}."""
    writers = {
        s.id: {split: _ShardWriter(out, s, split, tok, fingerprint, max_tokens) for split in SPLITS}
        for s in sources
    }
    todo = [s.id for s in sources if not all(w.complete for w in writers[s.id].values())]
    if todo:
        files = {sid: out / "curated" / f"{sid}.jsonl" for sid in todo}
        starts = {sid: min(w.resume_at for w in writers[sid].values() if not w.complete) for sid in todo}
        bar = tqdm(total=sum(files[sid].stat().st_size - starts[sid] for sid in todo), desc="encode",
                   unit="B", unit_scale=True, disable=not progress, leave=False)  # fmt: skip

        def tasks():
            for sid in todo:
                skip = {
                    split: sys.maxsize if w.complete else w.resume_at for split, w in writers[sid].items()
                }
                with open(files[sid], "rb") as f:
                    f.seek(starts[sid])
                    end = starts[sid]
                    while lines := f.readlines(_ENCODE_UNIT_BYTES):
                        begin, items = end, []
                        for raw in lines:
                            end += len(raw)
                            items.append((end, raw))
                        yield (sid, end - begin), (str(tok.path), skip, items)

        def finish(sid: str) -> None:
            for w in writers[sid].values():
                if not w.complete:
                    w.finish()

        finished = 0  # sources of `todo` finished so far, in order
        for (sid, n_bytes), encoded in pool().map_ordered(_encode_rows, tasks()):
            while todo[finished] != sid:  # the first rows of a later source: the ones before are whole
                finish(todo[finished])
                finished += 1
            for split, doc_end, doc in encoded:
                writers[sid][split].add(doc, doc_end)
            bar.update(n_bytes)
        for sid in todo[finished:]:
            finish(sid)
        bar.close()
    return {sid: {split: w.records(out) for split, w in ws.items()} for sid, ws in writers.items()}


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
        Tokenizer.load(existing)  # not a sentencepiece model → UserError naming the file
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    pools: list[WorkerPool] = []

    def pool(curating: bool = False) -> WorkerPool:
        # One pool for curation and encoding, made when first needed (a re-run with nothing to redo
        # starts none) and, when curation runs, before anything is read (see WorkerPool).
        if not pools:
            pools.append(open_pool(sf, workers, curating))
        return pools[0]

    try:
        # Every step that can refuse the input (curation, the emptiness check, tokenizer training)
        # runs before the directory is touched, so a bad re-run leaves a good directory exactly as
        # it was. Only then is the previous manifest archived and are the new files put in place.
        inputs = {s.id: _inputs(sf, s) for s in sf.sources}
        fingerprint = _curation_fingerprint(sf, inputs)
        state, curated_dir, fresh = _curate_step(out, sf, fingerprint, pool, progress)
        _check_not_empty(sources_path, sf, state)
        lap("curate")
        new_tok, tok_fp, tok_info = _tokenizer_step(
            out, sf, curated_dir, fingerprint, vocab_size, existing, workers
        )
        _archive_previous(out)
        if fresh:
            _install_curated(out, sf, curated_dir, state)
        tok = _install_tokenizer(out, new_tok, tok_fp)
        lap("tokenizer")
        source_entries = {}
        shards_of = _shard_step(out, sf.sources, tok, fingerprint, sf.shard_max_tokens, pool, progress)
        for s in sf.sources:
            split_entries = {}
            for split in SPLITS:
                shards = shards_of[s.id][split]
                split_entries[split] = {
                    "n_docs": sum(x["n_docs"] for x in shards),
                    "n_tokens": sum(x["n_tokens"] for x in shards),
                    "shards": shards,
                }
            source_entries[s.id] = _source_entry(sf, s, inputs[s.id], state["counts"][s.id], split_entries)
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
        _remove_staging(out)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    except BaseException:
        # A crash or an interrupt keeps what is finished (shards), for a resumed prepare.
        _remove_staging(out)
        raise
    finally:
        for p in pools:
            p.close()


def _remove_staging(out: Path) -> None:
    """Temporary files and staging folders (an unfinished curation is redone whole)."""
    _remove_temporaries(out)
    shutil.rmtree(out / _TOKENIZER_STAGING, ignore_errors=True)
    shutil.rmtree(out / _CURATION_STAGING, ignore_errors=True)


def _check_not_empty(sources_path, sf: SourcesFile, state: dict) -> None:
    """A source that keeps no training document is an error, named with its counts, before any tokenizer."""
    for s in sf.sources:
        if state["split_counts"][s.id]["train"] == 0:
            c = state["counts"][s.id]
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
