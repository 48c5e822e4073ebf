"""The curation pipeline: read → per-document stages → dedup → per-document stages, in parallel.

The stage order comes from the sources file (`pipeline.order`). Per-document stages run in worker
processes over batches of documents taken in corpus order; the dedup stage runs over the whole
corpus in one process (signatures computed by the workers). The result, and every provenance
record, is the same for any number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from communs import UserError
from corpus.dedup import find_duplicates, signature
from corpus.optout import optout_set, read_entries
from corpus.readers import Problem, read_source
from corpus.sources import SourcesFile
from corpus.stages import PER_DOC_STAGES, Doc, OptOutSet, StageContext, document_licence, wordlist_path

_BATCH_CHARS = 1 << 18  # ~256 kB of text per task: large enough to amortise the pickling


@dataclass
class Curated:
    """What the pipeline produced: kept documents per source, and a record of every input."""

    docs: dict[str, list[Doc]]  # source id -> kept documents, in corpus order
    provenance: list[dict]  # one per document or unreadable record, in corpus order
    counts: dict[str, dict] = field(default_factory=dict)  # source id -> {read, kept, removed, pii}
    optout_entries: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- worker processes

_worker: dict = {}


def _init_worker(params: dict[str, dict], contexts: dict[str, StageContext]) -> None:
    _worker["params"] = params
    _worker["contexts"] = contexts


def _stage_batch(args: tuple[list[str], list[tuple[int, Doc]]]) -> list[tuple[int, Doc, str | None]]:
    stage_names, batch = args
    out = []
    for i, doc in batch:
        params, ctx = _worker["params"][doc.source], _worker["contexts"][doc.source]
        rule = None
        for name in stage_names:
            p = params[name]
            if p.get("enabled", True):
                rule = PER_DOC_STAGES[name](doc, p, ctx)
                if rule:
                    break
        out.append((i, doc, rule))
    return out


def _signature_batch(args: tuple[int, int, list[tuple[int, str]]]) -> list[tuple[int, np.ndarray]]:
    num_perm, size, batch = args
    return [(i, signature(text, num_perm, size)) for i, text in batch]


def _batches(items: list[tuple[int, object]], size_of) -> Iterator[list]:
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += size_of(item[1])
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _Runner:
    """Maps a function over batches in order, in worker processes or (workers=1) in this one."""

    def __init__(self, workers: int, params: dict, contexts: dict):
        self.pool = None
        if workers > 1:
            # fork: fast, and works whatever the main module is. The pool is made before anything
            # is read, so that no thread started by HF datasets is forked.
            ctx = multiprocessing.get_context("fork")
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=(params, contexts))
        else:
            _init_worker(params, contexts)

    def imap(self, fn, tasks):
        return self.pool.imap(fn, tasks) if self.pool else map(fn, tasks)

    def close(self) -> None:
        if self.pool:
            self.pool.terminate()
            self.pool.join()


# ------------------------------------------------------------------------------------- pipeline


def _problem_record(p: Problem, source: str, licence: str) -> dict:
    return {
        "id": p.id, "source": source, "parent": p.id, "licence": licence, "fate": "removed", "rule": p.rule,
        "where": p.where, "message": p.message, "sha256": None,
    }  # fmt: skip


def curate(sf: SourcesFile, workers: int = 1, progress: bool = False) -> Curated:
    """Run the whole pipeline of a sources file; raise UserError on fatal bad input."""
    base = sf.path.parent
    entries = read_entries(sf.optout) if sf.optout else []
    optouts = optout_set(entries) if entries else OptOutSet()
    params = {s.id: s.stages for s in sf.sources}
    contexts = {
        s.id: StageContext(
            languages=s.language,
            wordlist=wordlist_path(s.stages["toxicity"], base),
            optout=optouts,
            conditions=s.conditions,
            release_licence=sf.release_licence,
        )
        for s in sf.sources
    }
    for s in sf.sources:
        for key in ("threshold", "num_perm", "shingle"):
            if s.stages["dedup"][key] != sf.stages["dedup"][key]:
                raise UserError(
                    f"{sf.path}: sources[{s.id}].stages.dedup.{key}: set it under pipeline.dedup (one index for all)"
                )
        if s.stages["toxicity"]["enabled"] and not contexts[s.id].wordlist.is_file():
            raise UserError(
                f"{sf.path}: sources[{s.id}].stages.toxicity.wordlist: no such file {contexts[s.id].wordlist}"
            )

    runner = _Runner(workers, params, contexts)
    try:
        return _run(sf, base, runner, entries, progress)
    finally:
        runner.close()


def _run(sf: SourcesFile, base, runner: _Runner, entries: list[dict], progress: bool) -> Curated:
    # Read everything (in this process: reading is cheap next to the stages), in corpus order.
    docs: list[Doc] = []
    slots: list[dict | None] = []  # a problem's record, or None where a document goes
    seen_ids: set[str] = set()
    for s in sf.sources:
        for item in tqdm(
            read_source(s, base), desc=f"read {s.id}", unit="doc", disable=not progress, leave=False
        ):
            if isinstance(item, Doc) and item.id in seen_ids:
                item = Problem(
                    item.id, "read.duplicate_id", item.id, f"document id {item.id!r} appears twice"
                )
            if isinstance(item, Problem):
                if s.errors == "fatal":
                    raise UserError(f"{item.where}: {item.message} (sources[{s.id}].errors is 'fatal')")
                slots.append(_problem_record(item, s.id, s.licence))
                continue
            seen_ids.add(item.id)
            docs.append(item)
            slots.append(None)
    rules: list[str | None] = [None] * len(docs)
    dup_of: dict[int, str] = {}

    dedup_at = sf.order.index("dedup")
    before = [n for n in sf.order[:dedup_at] if n in PER_DOC_STAGES]
    after = [n for n in sf.order[dedup_at + 1 :] if n in PER_DOC_STAGES]
    for stage_names in (before, "dedup", after):
        alive = [(i, d) for i, d in enumerate(docs) if rules[i] is None]
        if stage_names == "dedup":
            _dedup(sf, docs, alive, rules, dup_of, runner, progress)
            continue
        if not stage_names:
            continue
        bar = tqdm(
            total=len(alive), desc="+".join(stage_names), unit="doc", disable=not progress, leave=False
        )
        tasks = ((stage_names, b) for b in _batches(alive, lambda d: len(d.content())))
        for result in runner.imap(_stage_batch, tasks):
            for i, doc, rule in result:
                docs[i] = doc
                rules[i] = rule
            bar.update(len(result))
        bar.close()
    return _collect(sf, docs, slots, rules, dup_of, entries)


def _dedup(sf, docs, alive, rules, dup_of, runner, progress) -> None:
    p = sf.stages["dedup"]
    if not p["enabled"]:
        return
    near = [(i, d.content()) for i, d in alive if d.id and sf.source(d.source).stages["dedup"]["near"]
            and sf.source(d.source).stages["dedup"]["enabled"]]  # fmt: skip
    sigs: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(near), desc="dedup signatures", unit="doc", disable=not progress, leave=False)
    tasks = ((p["num_perm"], p["shingle"], b) for b in _batches(near, len))
    for result in runner.imap(_signature_batch, tasks):
        sigs.update(result)
        bar.update(len(result))
    bar.close()
    items = []
    for i, d in alive:
        sp = sf.source(d.source).stages["dedup"]
        sha = d.sha256() if sp["enabled"] and sp["exact"] else None
        items.append((d.id, sha, sigs.get(i)))
    for k, (rule, first) in find_duplicates(items, p["threshold"], p["num_perm"]).items():
        i = alive[k][0]
        rules[i] = rule
        dup_of[i] = first


def _collect(sf, docs, slots, rules, dup_of, entries) -> Curated:
    kept: dict[str, list[Doc]] = {s.id: [] for s in sf.sources}
    counts = {s.id: {"read": 0, "kept": 0, "removed": {}, "pii": {}, "chars": 0} for s in sf.sources}
    provenance = []
    it = iter(range(len(docs)))
    for slot in slots:
        if slot is not None:
            c = counts[slot["source"]]
            c["read"] += 1
            c["removed"][slot["rule"]] = c["removed"].get(slot["rule"], 0) + 1
            provenance.append(slot)
            continue
        i = next(it)
        doc, rule = docs[i], rules[i]
        src = sf.source(doc.source)
        c = counts[doc.source]
        c["read"] += 1
        for kind, n in doc.pii.items():
            c["pii"][kind] = c["pii"].get(kind, 0) + n
        record = {
            "id": doc.id, "source": doc.source, "parent": doc.parent,
            "licence": document_licence(doc) or src.licence,  # a document's own licence, when it has one
            "fate": "removed" if rule else "kept", "rule": rule, "sha256": doc.sha256(),
            "raw_sha256": doc.raw_sha256,
        }  # fmt: skip
        if i in dup_of:
            record["duplicate_of"] = dup_of[i]
        if doc.pii:
            record["pii"] = dict(sorted(doc.pii.items()))
        for key in ("author", "url", "title"):
            if doc.meta.get(key):
                record[key] = doc.meta[key]
        provenance.append(record)
        if rule:
            c["removed"][rule] = c["removed"].get(rule, 0) + 1
        else:
            c["kept"] += 1
            c["chars"] += len(doc.content())
            kept[doc.source].append(doc)
    for c in counts.values():
        c["removed"] = dict(sorted(c["removed"].items()))
        c["pii"] = dict(sorted(c["pii"].items()))
    return Curated(kept, provenance, counts, entries)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
