"""The curation pipeline, streamed: read → per-document stages → dedup → per-document stages → files.

The main process pulls the sources' `ReadUnit`s lazily (corpus/readers.py), all sources as one
stream, and keeps a bounded window of them in flight in the worker pool (`WorkerPool.map_ordered`):
the next source's units are in the pool while the last results of the one before come back. A
worker parses a unit (JSON lines, text files, records), runs the stages before dedup on its
documents and computes their sha256 and MinHash signature. Back in the main process, in corpus
order: the duplicate-id check, the `errors: fatal` policy, and the dedup decision (`DedupIndex`,
incremental). The survivors go back to the pool, pipelined, for the stages after dedup and the
serialisation of their provenance record and curated row; the main process appends those to the
output files in corpus order as results come back.

What stays in memory grows with the corpus only by small per-document metadata: the ids seen (the
duplicate-id check), the parent ids of the current source's kept documents (the split), and the
dedup index (digests, signatures and LSH keys as numpy rows). The result, and every provenance
record, is the same for any number of workers.
"""

from __future__ import annotations

import collections
import gc
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tqdm import tqdm

from common.errors import UserError
from common.io import iter_jsonl
from corpus.dedup import DedupIndex, IdSet, signature
from corpus.optout import optout_set, read_entries
from corpus.readers import Problem, ReadUnit, parse_unit, read_units
from corpus.sources import SourcesFile
from corpus.splits import ParentSplits, tentative_split
from corpus.stages import (
    PER_DOC_STAGES,
    Doc,
    OptOutSet,
    StageContext,
    detect_language,
    document_licence,
    load_wordlist,
    wordlist_path,
)


@dataclass
class Curated:
    """What `curate` gives back in memory (small corpora, tests): kept documents and every record."""

    docs: dict[str, list[Doc]]  # source id -> kept documents, in corpus order (id, text or messages)
    provenance: list[dict]  # one per document or unreadable record, in corpus order (with `split`)
    counts: dict[str, dict] = field(default_factory=dict)  # source id -> {read, kept, removed, pii, chars}
    optout_entries: list[dict] = field(default_factory=list)


@dataclass
class CurationResult:
    """What `curate_to` wrote: counts per source and the number of kept documents per split."""

    counts: dict[str, dict]  # source id -> {read, kept, removed: {rule: n}, pii: {kind: n}, chars}
    split_counts: dict[str, dict[str, int]]  # source id -> {"train": n, "val": n}
    optout_entries: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- worker processes

_worker: dict = {}


def _init_worker(state: dict) -> None:
    _worker.clear()
    _worker.update(state)


def worker_state() -> dict:
    """The state a task finds in its process (set by the pool's initializer)."""
    return _worker


class WorkerPool:
    """Ordered map over worker processes, with a bounded window of tasks in flight.

    Not `Pool.imap`: its task-feeder thread drains the task generator as fast as it can, so the whole
    corpus would be read ahead into the pool's queue. Here a task is submitted (`apply_async`) only
    when one of the `window` in flight has been handed back. With workers=1 the tasks run in this
    process, one at a time, as they are pulled.
    """

    def __init__(self, workers: int, state: dict):
        self.workers = workers
        self.state = state
        self.window = 2 * workers
        self.pool = None
        if workers > 1:
            # fork: fast, and works whatever the main module is. The pool is made before anything
            # is read, so that no thread started by HF datasets is forked.
            ctx = multiprocessing.get_context("fork")
            # Objects made so far (modules, the langid model…) are left out of the workers' garbage
            # collections, which would otherwise touch each one and copy its memory page.
            gc.freeze()
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=(state,))
            gc.unfreeze()
        else:
            _init_worker(state)

    def map_ordered(
        self, fn: Callable, tasks: Iterable[tuple[object, object]]
    ) -> Iterator[tuple[object, object]]:
        """For each (context, argument) pulled from `tasks`: (context, fn(argument)), in order.

        The context stays in this process; at most `window` tasks are pulled ahead of the results
        handed out."""
        if self.pool is None:
            for context, arg in tasks:
                yield context, fn(arg)
            return
        pending: collections.deque = collections.deque()
        it = iter(tasks)
        for context, arg in it:
            pending.append((context, self.pool.apply_async(fn, (arg,))))
            if len(pending) >= self.window:
                break
        while pending:
            context, result = pending.popleft()
            value = result.get()
            # Refill before handing the result out, so the workers stay busy while it is consumed.
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[0], self.pool.apply_async(fn, (nxt[1],))))
            yield context, value

    def close(self) -> None:
        if self.pool:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_pool(sf: SourcesFile, workers: int, curating: bool = True) -> WorkerPool:
    """The worker pool for a sources file: stage parameters and contexts set in each worker, and
    (`curating`) what the stages load on first use loaded before the fork.

    Raises UserError for pipeline settings that cannot run (before any process starts)."""
    base = sf.path.parent
    entries = read_entries(sf.optout) if sf.optout else []
    optouts = optout_set(entries) if entries else OptOutSet()
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
    dedup_at = sf.order.index("dedup")
    dedup = sf.stages["dedup"]
    if curating:
        _warm_up(sf, contexts)

    def dedup_on(s, key: str) -> bool:
        return dedup["enabled"] and s.stages["dedup"]["enabled"] and s.stages["dedup"][key]

    state = {
        "sources": {s.id: s for s in sf.sources},
        "params": {s.id: s.stages for s in sf.sources},
        "contexts": contexts,
        "before": [n for n in sf.order[:dedup_at] if n in PER_DOC_STAGES],
        "after": [n for n in sf.order[dedup_at + 1 :] if n in PER_DOC_STAGES],
        "exact": {s.id: dedup_on(s, "exact") for s in sf.sources},
        "near": {s.id: dedup_on(s, "near") for s in sf.sources},
        "num_perm": dedup["num_perm"],
        "shingle": dedup["shingle"],
        "seed": sf.seed,
        "val_fraction": sf.val_fraction,
        "optout_entries": entries,
    }
    return WorkerPool(workers, state)


def _warm_up(sf: SourcesFile, contexts: dict[str, StageContext]) -> None:
    """Load what the stages load on first use (langid's model ~0.6 s, datasketch and its permutations
    ~0.4 s, word lists) here, once, so that the forked workers inherit it instead of each paying it."""
    for s in sf.sources:
        if s.stages["langid"]["enabled"]:
            detect_language("")
        if s.stages["toxicity"]["enabled"]:
            load_wordlist(str(contexts[s.id].wordlist))
    if sf.stages["dedup"]["enabled"]:
        signature("", sf.stages["dedup"]["num_perm"], sf.stages["dedup"]["shingle"])


def _run_stages(doc: Doc, names: list[str]) -> str | None:
    params, ctx = _worker["params"][doc.source], _worker["contexts"][doc.source]
    for name in names:
        p = params[name]
        if p.get("enabled", True):
            rule = PER_DOC_STAGES[name](doc, p, ctx)
            if rule:
                return rule
    return None


def _jsonl_line(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n"


def _doc_record(doc: Doc, rule: str | None, duplicate_of: str | None, split: str | None) -> dict:
    src = _worker["sources"][doc.source]
    record = {
        "id": doc.id, "source": doc.source, "parent": doc.parent,
        "licence": document_licence(doc) or src.licence,  # a document's own licence, when it has one
        "fate": "removed" if rule else "kept", "rule": rule, "sha256": doc.sha256(),
        "raw_sha256": doc.raw_sha256,
    }  # fmt: skip
    if duplicate_of is not None:
        record["duplicate_of"] = duplicate_of
    if doc.pii:
        record["pii"] = dict(sorted(doc.pii.items()))
    for key in ("author", "url", "title"):
        if doc.meta.get(key):
            record[key] = doc.meta[key]
    if split is not None:
        record["split"] = split
    return record


def _problem_record(p: Problem, source: str, licence: str) -> dict:
    return {
        "id": p.id, "source": source, "parent": p.id, "licence": licence, "fate": "removed", "rule": p.rule,
        "where": p.where, "message": p.message, "sha256": None,
    }  # fmt: skip


# What a task hands back per input record, in order:
#   ("problem", Problem)
#   ("removed", doc id, rule, provenance line, pii counts)     removed before dedup: final
#   ("alive", Doc, sha256 or None, signature or None)          for the dedup decision
#   ("done", doc id, parent, rule, split or None, provenance line, curated row or None, pii counts, chars)


def _before_dedup(unit: ReadUnit) -> list[tuple]:
    """Worker: parse a unit, run the stages before dedup, hash and sign the survivors."""
    out: list[tuple] = []
    for item in parse_unit(unit, _worker["sources"][unit.source]):
        if isinstance(item, Problem):
            out.append(("problem", item))
            continue
        rule = _run_stages(item, _worker["before"])
        if rule:
            out.append(("removed", item.id, rule, _jsonl_line(_doc_record(item, rule, None, None)), item.pii))
            continue
        sha = item.sha256() if _worker["exact"][item.source] else None
        sig = (
            signature(item.content(), _worker["num_perm"], _worker["shingle"])
            if _worker["near"][item.source]
            else None
        )
        out.append(("alive", item, sha, sig))
    return out


def _after_dedup(items: list[tuple[Doc, tuple[str, str] | None]]) -> list[tuple]:
    """Worker: the stages after dedup, then each document's provenance line and curated row."""
    out: list[tuple] = []
    for doc, verdict in items:
        rule, duplicate_of = verdict if verdict else (_run_stages(doc, _worker["after"]), None)
        split = None if rule else tentative_split(doc.parent, _worker["seed"], _worker["val_fraction"])
        line = _jsonl_line(_doc_record(doc, rule, duplicate_of, split))
        row = None
        if not rule:
            content = {"messages": doc.messages} if doc.messages is not None else {"text": doc.text}
            row = _jsonl_line({"id": doc.id, "split": split, **content})
        out.append(
            (
                "done",
                doc.id,
                doc.parent,
                rule,
                split,
                line,
                row,
                doc.pii,
                len(doc.content()) if not rule else 0,
            )
        )
    return out


# ------------------------------------------------------------------------------------ the writer


class _SourceWriter:
    """Appends one source's records to the provenance file and its kept rows to its curated file.

    Kept documents get the split their parent would get alone (`tentative_split`); when the source
    is finished and all its parents are known, the few whose split the source-level rules change (a
    source with no val or no train parent, or with a single parent) are corrected by rewriting this
    source's part of the files — rare, and only that part.
    """

    def __init__(self, provenance: IO[bytes], curated_path: Path, source, seed: int, fraction: float):
        self.provenance, self.curated_path = provenance, curated_path
        self.source, self.seed, self.fraction = source, seed, fraction
        self.start = provenance.tell()
        self.curated = open(curated_path, "wb")
        self.parents = ParentSplits(seed, fraction)  # constant memory, whatever the number of parents
        self.counts = {"read": 0, "kept": 0, "removed": {}, "pii": {}, "chars": 0}
        self.split_counts = {"train": 0, "val": 0}

    def problem(self, p: Problem) -> None:
        self._count(p.rule, {})
        self.provenance.write(_jsonl_line(_problem_record(p, self.source.id, self.source.licence)))

    def removed(self, rule: str, line: bytes, pii: dict) -> None:
        self._count(rule, pii)
        self.provenance.write(line)

    def done(
        self,
        parent: str,
        rule: str | None,
        split: str | None,
        line: bytes,
        row: bytes | None,
        pii: dict,
        chars: int,
    ) -> None:
        self._count(rule, pii)
        self.provenance.write(line)
        if rule is None:
            self.counts["chars"] += chars
            self.curated.write(row)
            self.parents.add(parent)
            self.split_counts[split] += 1

    def _count(self, rule: str | None, pii: dict) -> None:
        c = self.counts
        c["read"] += 1
        for kind, n in pii.items():
            c["pii"][kind] = c["pii"].get(kind, 0) + n
        if rule:
            c["removed"][rule] = c["removed"].get(rule, 0) + 1
        else:
            c["kept"] += 1

    def finish(self) -> tuple[dict, dict[str, int]]:
        self.curated.close()
        fixes = self.parents.corrections()
        if fixes:
            self._rewrite(fixes)
        c = self.counts
        c["removed"] = dict(sorted(c["removed"].items()))
        c["pii"] = dict(sorted(c["pii"].items()))
        return c, self.split_counts

    def _rewrite(self, fixes: dict[str, str]) -> None:
        """Give the documents of the `fixes` parents their final split, in both files."""
        self.provenance.flush()
        old_curated = self.curated_path.with_name(f".{self.curated_path.name}.fix.tmp")
        os.replace(self.curated_path, old_curated)
        with tempfile.TemporaryFile(dir=self.curated_path.parent) as tail:
            self.provenance.seek(self.start)
            shutil.copyfileobj(self.provenance, tail)
            self.provenance.seek(self.start)
            self.provenance.truncate()
            tail.seek(0)
            with open(old_curated, "rb") as rows, open(self.curated_path, "wb") as curated:
                for line in tail:
                    record = json.loads(line)
                    if record["fate"] != "kept":
                        self.provenance.write(line)
                        continue
                    row_line = rows.readline()
                    if record["parent"] in fixes:
                        final = fixes[record["parent"]]
                        self.split_counts[record["split"]] -= 1
                        self.split_counts[final] += 1
                        record["split"] = final
                        line = _jsonl_line(record)
                        row = json.loads(row_line)
                        row["split"] = final
                        row_line = _jsonl_line(row)
                    self.provenance.write(line)
                    curated.write(row_line)
        old_curated.unlink()


# ------------------------------------------------------------------------------------- pipeline


def curate_to(sf: SourcesFile, folder: Path, pool: WorkerPool, progress: bool = False) -> CurationResult:
    """Run the pipeline of a sources file, streaming into `folder`: `provenance.jsonl` (every record,
    with the split of kept documents) and `curated/<source>.jsonl` (kept rows `{id, split, text |
    messages}`), in corpus order. Raises UserError on fatal bad input (the files are then partial:
    `folder` is a staging area the caller discards).

    All sources go through the pool as one stream: the next source's units are in flight while the
    last results of the one before come back, so no source boundary leaves the workers idle. A
    source's end work (split corrections, counts) is done when its last result has been written."""
    folder = Path(folder)
    (folder / "curated").mkdir(parents=True, exist_ok=True)
    state = pool.state
    dedup = None
    if any(state["exact"].values()) or any(state["near"].values()):
        dedup = DedupIndex(
            sf.stages["dedup"]["threshold"], sf.stages["dedup"]["num_perm"], spill_dir=folder / ".dedup"
        )
    units = _AllUnits(sf)
    seen_ids = IdSet(spill_dir=folder / ".dedup")  # bounded RAM, whatever the number of documents
    decided = _dedup_decisions(sf, pool.map_ordered(_before_dedup, units), dedup, seen_ids)
    with open(folder / "provenance.jsonl", "wb+") as provenance:
        writers = _Writers(sf, provenance, folder / "curated", progress)
        try:
            for (index, slots), results in pool.map_ordered(_after_dedup, decided):
                writer = writers.at(index)
                it = iter(results)
                for entry in slots:
                    entry = entry or next(it)
                    if entry[0] == "problem":
                        writer.problem(entry[1])
                    elif entry[0] == "removed":
                        writer.removed(entry[2], entry[3], entry[4])
                    else:
                        writer.done(*entry[2:])
                writers.bar.update(len(slots))
            if units.error is not None:
                # A source that failed to read fails where it stands in corpus order: after the
                # units before it, as when each source was read only once the one before had ended.
                raise units.error
            writers.at(len(sf.sources))
        finally:
            writers.close()
            shutil.rmtree(
                folder / ".dedup", ignore_errors=True
            )  # the index's and ids' files: never installed
    return CurationResult(writers.counts, writers.split_counts, state["optout_entries"])


class _AllUnits:
    """The units of every source, in corpus order, as (source index, unit), pulled lazily.

    A source's reader may refuse its input (a metadata table without the key column, a dataset
    that cannot be loaded…) while earlier units are still in flight: the error is kept in `error`
    and the stream ends there, so that the caller raises it only after those units' results (and
    whatever fatal problem they hold) have been seen — the same error for any number of workers."""

    def __init__(self, sf: SourcesFile):
        self.sf = sf
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[tuple[int, ReadUnit]]:
        for index, s in enumerate(self.sf.sources):
            try:
                for unit in read_units(s, self.sf.path.parent):
                    yield index, unit
            except Exception as e:  # re-raised by curate_to, in corpus order
                self.error = e
                return


class _Writers:
    """The current source's writer and progress bar; the sources before it finished, in order."""

    def __init__(self, sf: SourcesFile, provenance: IO[bytes], curated: Path, progress: bool):
        self.sf, self.provenance, self.curated, self.progress = sf, provenance, curated, progress
        self.index = -1
        self.writer: _SourceWriter | None = None
        self.bar: tqdm | None = None
        self.counts: dict[str, dict] = {}
        self.split_counts: dict[str, dict[str, int]] = {}

    def at(self, index: int) -> _SourceWriter | None:
        """The writer of source `index`, finishing those before it (sources without any unit
        included); `len(sources)` finishes the last one."""
        while self.index < index:
            if self.writer is not None:
                self.close()
                s = self.writer.source
                self.counts[s.id], self.split_counts[s.id] = self.writer.finish()
                self.writer = None
            self.index += 1
            if self.index < len(self.sf.sources):
                s = self.sf.sources[self.index]
                path = self.curated / f"{s.id}.jsonl"
                self.writer = _SourceWriter(self.provenance, path, s, self.sf.seed, self.sf.val_fraction)
                self.bar = tqdm(desc=f"curate {s.id}", unit="doc", disable=not self.progress, leave=False)
        return self.writer

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.curated.close()


def _dedup_decisions(
    sf: SourcesFile,
    before: Iterator[tuple[int, list[tuple]]],
    dedup: DedupIndex | None,
    seen_ids: IdSet,
) -> Iterator[tuple[tuple[int, list], list]]:
    """Main process, in corpus order: per unit, ((its source index, its records with a None where a
    document's result will go), the documents that go on to the stages after dedup with the dedup
    verdict)."""
    for index, entries in before:
        s = sf.sources[index]
        slots: list = []
        survivors: list = []
        for entry in entries:
            if entry[0] != "problem":
                doc_id = entry[1].id if entry[0] == "alive" else entry[1]
                if not seen_ids.add(doc_id):
                    problem = Problem(
                        doc_id, "read.duplicate_id", doc_id, f"document id {doc_id!r} appears twice"
                    )
                    entry = ("problem", problem)
            if entry[0] == "problem":
                if s.errors == "fatal":
                    p = entry[1]
                    raise UserError(f"{p.where}: {p.message} (sources[{s.id}].errors is 'fatal')")
                slots.append(entry)
            elif entry[0] == "removed":
                slots.append(entry)
            else:
                _, doc, sha, sig = entry
                survivors.append((doc, dedup.check(doc.id, sha, sig) if dedup else None))
                slots.append(None)
        yield (index, slots), survivors


def curate(sf: SourcesFile, workers: int = 1, progress: bool = False) -> Curated:
    """The whole pipeline of a sources file, its result read back into memory (for small corpora and
    tests; `corpus.prepare` streams with `curate_to`). Raises UserError on fatal bad input."""
    with open_pool(sf, workers) as pool, tempfile.TemporaryDirectory() as tmp:
        result = curate_to(sf, Path(tmp), pool, progress)
        provenance = [record for _, record in iter_jsonl(Path(tmp) / "provenance.jsonl")]
        # A kept document's parent, hashes and metadata are in its provenance record, in the same order.
        kept = collections.defaultdict(list)
        for record in provenance:
            if record["fate"] == "kept":
                kept[record["source"]].append(record)
        docs: dict[str, list[Doc]] = {}
        for s in sf.sources:
            rows = (row for _, row in iter_jsonl(Path(tmp) / "curated" / f"{s.id}.jsonl"))
            docs[s.id] = [
                Doc(id=row["id"], source=s.id, parent=r["parent"], raw_sha256=r["raw_sha256"],
                    text=row.get("text"), messages=row.get("messages"),
                    meta={k: r[k] for k in ("author", "url", "title") if k in r}, pii=r.get("pii", {}))
                for row, r in zip(rows, kept[s.id], strict=True)
            ]  # fmt: skip
    return Curated(docs, provenance, result.counts, result.optout_entries)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
