"""corpus: curation pipeline throughput on real French text, and the packed loader.

1. Pipeline: the French public-domain corpus (../shared/data/fr-public-domain: 19th-century novels
   and short stories) through the default stages (normalise → quality → langid → toxicity → PII →
   dedup → opt-out → licence), long documents cut into 20,000-character chunks. Reported: MB per
   CPU-second (= MB/s per core, robust to a busy machine) and MB/s of wall time, with 1 and with 2
   worker processes in alternated rounds, the wall speed-up, and each stage's MB/s alone.
2. Loader: `PackedReader.batch`, with the compiled gather (`c`: one pass in corpus/_gather.c) and with
   its numpy path (`numpy`: a per-window table built at open, one concatenate for the tokens, position
   rows cut from a strided ramp; see corpus/loader.py), vs `PerSampleGather` (what a
   Dataset.__getitem__ + collate does: for each window, a Python loop over the documents it
   overlaps, then np.stack; its docstring says exactly what it does), batch 8 × seq 1024 and
   32 × 2048, on 4 shards of long documents (the novel chunks above, ~4,900 tokens) and of short
   ones (GSM8K problems, ~320 tokens), encoded with a tokenizer trained on the chunks. Outputs
   (values and dtypes) checked equal first; µs per batch printed for each.
3. Loader as a share of a training step: `PackedReader.batch` for one step's batch vs one
   forward+backward of model.llama's `tiny` model (vocab 8192, batch 8 × seq 256, fp32, CPU).
4. Structured records (`--only structured`, < 60 s): a parquet source (~30 MB of the French corpus cut
   into ~2,000-character records, 12 row groups) curated with 2 workers, its records decoded in the
   workers from row-range units (corpus/readers.py) vs the reader it replaced (HF `datasets` streaming
   in the main process, batches of 256 records pickled to the workers, reimplemented here): wall time
   and the main process's share of the CPU, side by side in alternated rounds. The stages that cost
   most per document (quality, langid, toxicity, PII, dedup) are off, so that reading shows.
5. Dedup index (`--only dedup`, ~20 s): 200k synthetic documents (num_perm 128, exact and near
   copies) through `DedupIndex` in RAM and spilled to memory-mapped files past a 16 MiB budget,
   a piece at a time in alternated order: decisions checked equal, RAM held and bytes in files per
   document, and the ratio of check() times.

Each ratio is per round (contestants alternated, order rotated), median and min-max over rounds.
Run: `python benchmarks/bench_corpus.py [--mb 6] [--rounds 3] [--only loader|structured|dedup]` (a
few minutes on 2 cores; `--only loader` curates the chunks once, untimed, and runs parts 2 and 3
only; `--only structured` part 4 only; `--only dedup` part 5 only).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from corpus.loader import KERNELS, PackedReader, _gather  # noqa: E402
from corpus.pipeline import curate  # noqa: E402
from corpus.shards import write_shard  # noqa: E402
from corpus.sources import load_sources  # noqa: E402
from corpus.stages import PER_DOC_STAGES, StageContext  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fr-public-domain"


def corpus_subset(folder: Path, mb: float) -> int:
    """Copy whole files of the French corpus (sorted, alternating collections) up to `mb` MB."""
    files = sorted(DATA.glob("*/txt/*.txt"))
    if not files:
        sys.exit(f"no text under {DATA}")
    (folder / "txt").mkdir(parents=True)
    total = 0
    for f in sorted(files, key=lambda p: (p.name[-10:], p.name)):
        data = f.read_bytes()
        (folder / "txt" / f.name).write_bytes(data)
        total += len(data)
        if total >= mb * 1e6:
            break
    (folder / "sources.yaml").write_text(
        textwrap.dedent(
            """\
            release: {licence: Apache-2.0}
            sources:
              - {id: fr, format: text, paths: [txt/*.txt], licence: public-domain, language: fr,
                 domain: literature, url: https://github.com/cligs/textbox}
            """
        )
    )
    return total


def ratio_table(title: str, rows: list[tuple[str, list[float]]]) -> None:
    print(f"\n{title}")
    print(f"{'':44s} {'median':>8s} {'min':>8s} {'max':>8s}")
    for name, values in rows:
        print(f"{name:44s} {statistics.median(values):8.2f} {min(values):8.2f} {max(values):8.2f}")


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _cpu_pressure() -> str:
    try:
        return Path("/proc/pressure/cpu").read_text().split("\n")[0]
    except OSError:
        return "unknown"


def _pipeline_run(folder: str, workers: int, result_path: str) -> None:
    """One curation (`curate_to`, as `communs data prepare` runs it) in a fresh process: its wall
    and CPU time (main + workers) and peak memory, written to `result_path` as JSON."""
    import multiprocessing
    import resource
    import threading

    import psutil

    from corpus.pipeline import curate_to, open_pool

    sf = load_sources(Path(folder) / "sources.yaml")
    peak = {"tree": 0, "sampler_cpu": 0.0}
    stop = threading.Event()

    def sample(procs: list) -> None:  # PSS of this process + its workers (shared pages split once)
        while not stop.is_set():
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                except psutil.Error:
                    pass
            peak["tree"] = max(peak["tree"], total)
            stop.wait(0.05)
        peak["sampler_cpu"] = time.thread_time()  # its own CPU time, taken off the main process's

    def main_cpu() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime

    with tempfile.TemporaryDirectory() as out:
        t0, c0, m0 = time.perf_counter(), _cpu_seconds(), main_cpu()
        with open_pool(sf, workers) as pool:
            startup = main_cpu() - m0  # the warm-up before the fork (langid model, datasketch): once per run
            # Started after the fork (no thread but this one is copied into the workers), on the
            # pool's processes, found once (scanning /proc at each sample would cost a core's tenth).
            procs = [psutil.Process(), *(psutil.Process(p.pid) for p in multiprocessing.active_children())]
            sampler = threading.Thread(target=sample, args=(procs,), daemon=True)
            sampler.start()
            result = curate_to(sf, Path(out), pool)
        wall, cpu, main = time.perf_counter() - t0, _cpu_seconds() - c0, main_cpu() - m0
    stop.set()
    sampler.join()
    cpu, main = cpu - peak["sampler_cpu"], main - peak["sampler_cpu"]
    Path(result_path).write_text(
        json.dumps(
            {
                "wall": wall,
                "cpu": cpu,
                "main_cpu": main,
                "startup_cpu": startup,
                "kept": sum(c["kept"] for c in result.counts.values()),
                "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "tree_mb": peak["tree"] / 2**20,
            }
        )
    )


def _in_fresh_process(target, *args) -> dict:
    """Run `target(*args, result_path)` in a new (spawned) process; return the JSON it wrote there."""
    import multiprocessing

    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        proc = multiprocessing.get_context("spawn").Process(target=target, args=(*args, str(result_path)))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            sys.exit(f"{target.__name__} failed (exit code {proc.exitcode})")
        return json.loads(result_path.read_text())


def _pipeline_in_fresh_process(folder: Path, workers: int) -> dict:
    return _in_fresh_process(_pipeline_run, str(folder), workers)


def bench_pipeline(folder: Path, n_bytes: int, rounds: int) -> list:
    """Streamed curation with 1 and 2 workers (each run in a fresh process, rounds alternated), then
    peak memory at 1× and 4× the corpus: the main process holds small per-document metadata only,
    and each worker a window of batches, so the peaks should stay flat."""
    sf = load_sources(folder / "sources.yaml")
    wall: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    memory: dict[tuple[str, int], list[dict]] = {}
    for r in range(rounds):
        for workers in [1, 2] if r % 2 == 0 else [2, 1]:
            run = _pipeline_in_fresh_process(folder, workers)
            wall[workers].append(run["wall"])
            cpu[workers].append(run["cpu"])
            memory.setdefault(("1x", workers), []).append(run)
    mb = n_bytes / 1e6
    print(f"\nPipeline (streamed, curate_to): {mb:.1f} MB of French text, {run['kept']} chunks kept")
    print(f"CPU pressure during the run (/proc/pressure/cpu): {_cpu_pressure()}")
    rows = [
        ("MB per CPU-second (per core), 1 worker", [mb / t for t in cpu[1]]),
        ("MB per CPU-second (per core), 2 workers", [mb / t for t in cpu[2]]),
        ("MB/s wall, 1 worker", [mb / t for t in wall[1]]),
        ("MB/s wall, 2 workers", [mb / t for t in wall[2]]),
        ("wall speed-up 2 workers vs 1", [a / b for a, b in zip(wall[1], wall[2])]),
        # What the main process does (reading, dedup decisions, writing) does not run in parallel: with
        # 2 idle cores the speed-up is at most cpu / (main + workers / 2). The start-up (the warm-up
        # before the fork, ~1 CPU-second whatever the corpus) is left out of these two rows.
        ("start-up CPU-seconds (once per run)", [r["startup_cpu"] for r in memory[("1x", 2)]]),
        (
            "main-process share of the CPU, 2 workers",
            [(r["main_cpu"] - r["startup_cpu"]) / (r["cpu"] - r["startup_cpu"]) for r in memory[("1x", 2)]],
        ),
        (
            "speed-up bound on 2 idle cores (Amdahl)",
            [
                (r["cpu"] - r["startup_cpu"])
                / (r["main_cpu"] - r["startup_cpu"] + (r["cpu"] - r["main_cpu"]) / 2)
                for r in memory[("1x", 2)]
            ],
        ),
    ]
    ratio_table("Pipeline throughput (rounds alternated)", rows)

    big = folder.parent / f"{folder.name}-4x"
    big_bytes = corpus_subset(big, 4 * mb)
    for workers in (2, 1):
        memory[("4x", workers)] = [_pipeline_in_fresh_process(big, workers)]
    print(f"\nPeak memory, MB (median over runs): 1x = {mb:.1f} MB of text, 4x = {big_bytes / 1e6:.1f} MB")
    print("(RSS of the main process and of the largest worker; PSS summed over all, sampled every 50 ms)")
    print(f"{'':34s} {'main RSS':>8s} {'worker':>8s} {'all PSS':>8s} {'4x / 1x':>8s}")
    for workers in (1, 2):
        for scale in ("1x", "4x"):
            runs = memory[(scale, workers)]
            main_mb, worker_mb, tree_mb = (
                statistics.median(r[k] for r in runs) for k in ("main_mb", "worker_mb", "tree_mb")
            )
            growth = tree_mb / statistics.median(r["tree_mb"] for r in memory[("1x", workers)])
            label = f"{workers} worker{'s' if workers > 1 else ''}, corpus {scale}"
            worker_mb = worker_mb if workers > 1 else 0
            print(f"{label:34s} {main_mb:8.0f} {worker_mb:8.0f} {tree_mb:8.0f} {growth:8.2f}")

    one, two = memory[("4x", 1)][0], memory[("4x", 2)][0]
    print(
        f"4x corpus (one run each): MB per CPU-second {big_bytes / 1e6 / one['cpu']:.2f} (1 worker), "
        f"{big_bytes / 1e6 / two['cpu']:.2f} (2 workers); wall speed-up 2 vs 1 {one['wall'] / two['wall']:.2f}"
    )

    result = curate(sf, workers=2)  # the kept chunks, for the stage and loader measurements below
    # Each stage alone, on the same (normalised) chunks, one process.
    docs = [d for d in result.docs["fr"]]
    src = sf.source("fr")
    ctx = StageContext(languages=src.language)
    size = sum(len(d.text.encode()) for d in docs) / 1e6
    print(f"\n{'stage alone (1 process, CPU time)':44s} {'MB/s':>8s}")
    for name in ("normalise", "quality", "langid", "toxicity", "pii", "optout"):
        c0 = time.process_time()
        for d in docs:
            PER_DOC_STAGES[name](d, src.stages[name], ctx)
        print(f"{name:44s} {size / (time.process_time() - c0):8.2f}")
    from corpus.dedup import signature

    c0 = time.process_time()
    for d in docs:
        signature(d.text, 128, 5)
    print(f"{'dedup (MinHash signatures)':44s} {size / (time.process_time() - c0):8.2f}")
    return docs


def _old_structured_units(source, base):
    """The reader structured sources had before their units were decoded in the workers: every record
    decoded by HF `datasets` streaming in the main process and sent in batches of 256."""
    import datasets

    from corpus.readers import ReadUnit, _rel, read_units

    if source.format != "parquet":
        yield from read_units(source, base)
        return
    for path in source.files:
        stream = datasets.load_dataset("parquet", data_files=[str(path)], split="train", streaming=True)
        unit = ReadUnit(source.id, "records", _rel(path))
        for i, record in enumerate(stream):
            unit.items.append((i + 1, record))
            if len(unit.items) >= 256:
                yield unit
                unit = ReadUnit(source.id, "records", _rel(path))
        if unit.items:
            yield unit


def _structured_run(folder: str, reader: str, result_path: str) -> None:
    """`_pipeline_run` with 2 workers, the old reader patched in for `reader == "old"`."""
    import corpus.pipeline

    if reader == "old":
        corpus.pipeline.read_units = _old_structured_units
    _pipeline_run(folder, 2, result_path)


def bench_structured(folder: Path, mb: float, rounds: int) -> None:
    """Part 4: a parquet source curated with 2 workers, records decoded in the workers (new) or in
    the main process (old), each run in a fresh process, rounds alternated."""

    import pyarrow as pa
    import pyarrow.parquet as pq

    records, size = [], 0
    while size < mb * 1e6:  # the corpus once, then again if `mb` asks for more
        for f in sorted(DATA.glob("*/txt/*.txt")):
            record = []
            for paragraph in f.read_text(encoding="utf-8").split("\n"):
                record.append(paragraph)
                if sum(map(len, record)) >= 2000:
                    records.append("\n".join(record))
                    size += len(records[-1].encode())
                    record = []
            if size >= mb * 1e6:
                break
    folder.mkdir(parents=True)
    table = pa.table({"id": [f"r{k}" for k in range(len(records))], "text": records})
    pq.write_table(table, folder / "part.parquet", row_group_size=-(-len(records) // 12))
    (folder / "sources.yaml").write_text(
        textwrap.dedent(
            """\
            release: {licence: Apache-2.0}
            sources:
              - {id: fr, format: parquet, paths: [part.parquet], id_field: id, licence: public-domain, language: fr,
                 domain: literature, url: https://github.com/cligs/textbox,
                 stages: {quality: false, langid: false, toxicity: false, pii: false, dedup: false}}
            """
        )
    )
    runs: dict[str, list[dict]] = {"new": [], "old": []}
    t0 = time.perf_counter()
    for r in range(rounds):
        for reader in ("new", "old") if r % 2 == 0 else ("old", "new"):
            runs[reader].append(_in_fresh_process(_structured_run, str(folder), reader))
    assert runs["new"][0]["kept"] == runs["old"][0]["kept"] == len(records)

    def share(run: dict) -> float:  # start-up (warm-up before the fork) left out, as in part 1
        return (run["main_cpu"] - run["startup_cpu"]) / (run["cpu"] - run["startup_cpu"])

    print(
        f"\nStructured records: {size / 1e6:.1f} MB of French text in {len(records):,} parquet records, "
        f"12 row groups, 2 workers, {rounds} alternated rounds ({time.perf_counter() - t0:.0f} s); "
        f"CPU pressure {_cpu_pressure()}"
    )
    print(f"{'':44s} {'new':>8s} {'old':>8s} {'old/new':>8s}  (medians; ratio median, min-max)")
    for name, value in (
        ("wall seconds", lambda run: run["wall"]),
        ("main-process CPU seconds (after start-up)", lambda run: run["main_cpu"] - run["startup_cpu"]),
        ("main-process share of the CPU", share),
        ("CPU seconds, all processes", lambda run: run["cpu"]),
        ("start-up CPU seconds (imports, warm-up)", lambda run: run["startup_cpu"]),
        # The main process's work is serial: with many idle cores the wall time is at least its CPU time.
        ("wall speed-up bound, many cores (CPU / main)", lambda run: 1 / share(run)),
    ):
        new, old = [value(x) for x in runs["new"]], [value(x) for x in runs["old"]]
        ratios = [o / n for o, n in zip(old, new)]
        print(
            f"{name:44s} {statistics.median(new):8.2f} {statistics.median(old):8.2f} "
            f"{statistics.median(ratios):8.2f}  ({min(ratios):.2f}-{max(ratios):.2f})"
        )


class PerSampleGather:
    """The straightforward per-sample loader, as a Dataset.__getitem__ + collate would be written.

    At construction: each document's global start and its (shard, index) as Python lists (as cheap as
    it gets for bisect). `__call__(i)` builds window i alone: bisect for the document holding its first
    token, then for each document it overlaps (one loop iteration each) `Shard.doc(j)` and
    `Shard.doc_mask(j)` (memory-map slices), the part inside the window widened to int64, its positions
    by `np.arange`, its mask part for a chat source; then one concatenate per output and the
    loss mask (target not a document start, and its mask bit set). Same values and dtypes as
    `PackedReader.batch` rows; the benchmark collates a batch with one `np.stack` per output.
    """

    def __init__(self, reader: PackedReader):
        self.shards, self.seq_len, self.has_mask = reader.shards, reader.seq_len, reader.has_mask
        self.flat_starts = reader.doc_starts.tolist()
        self.flat_docs = [(k, j) for k, s in enumerate(reader.shards) for j in range(s.n_docs)]

    def __call__(self, i: int):
        start, end = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        tokens, positions, masks = [], [], []
        d = bisect.bisect_right(self.flat_starts, start) - 1
        pos = start
        while pos < end:
            k, j = self.flat_docs[d]
            doc_begin = self.flat_starts[d]
            shard = self.shards[k]
            doc = shard.doc(j)
            lo, hi = pos - doc_begin, min(len(doc), end - doc_begin)
            tokens.append(np.asarray(doc[lo:hi], dtype=np.int64))
            positions.append(np.arange(lo, hi))
            if self.has_mask:  # chat sources only: text shards pay one attribute test per document
                masks.append(
                    shard.doc_mask(j)[lo:hi] if shard.mask is not None else np.ones(hi - lo, np.uint8)
                )
            pos += hi - lo
            d += 1
        tokens, positions = np.concatenate(tokens), np.concatenate(positions)
        loss_mask = positions[1:] != 0
        if self.has_mask:
            loss_mask &= np.concatenate(masks)[1:].astype(bool)
        return tokens, positions[:-1], loss_mask


def bench_loader(
    name: str, arrays: list[np.ndarray], tmp: Path, rounds: int, seq_len: int = 1024, batch: int = 8
):
    prefixes = []
    for k in range(4):  # several shards, as a real source has
        prefix = tmp / f"{name.replace(' ', '_')}-{k:05d}"
        if not Path(f"{prefix}.json").exists():
            write_shard(prefix, arrays[k::4])
        prefixes.append(prefix)
    reader = PackedReader(prefixes, seq_len)
    readers = {
        kernel: PackedReader(prefixes, seq_len, kernel=kernel)
        for kernel in KERNELS
        if kernel != "c" or _gather
    }
    gather = PerSampleGather(reader)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(reader), batch) for _ in range(200)]
    for idx in batches[:20]:
        for r in readers.values():
            got = r.batch(idx)
            for row, i in enumerate(idx):
                for g, want in zip(got, gather(int(i))):
                    assert np.array_equal(g[row], want) and g.dtype == want.dtype

    def batched(r):
        def run():
            for idx in batches:
                r.batch(idx)

        return run

    def per_sample():
        for idx in batches:
            parts = [gather(int(i)) for i in idx]
            [np.stack(p) for p in zip(*parts)]

    contestants = [(f"batch ({k})", batched(r)) for k, r in readers.items()] + [("per_sample", per_sample)]
    times: dict[str, list[float]] = {name: [] for name, _ in contestants}
    for r in range(max(rounds, 9)):
        shift = r % len(contestants)  # rotate the order every round
        for cname, fn in contestants[shift:] + contestants[:shift]:
            t0 = time.perf_counter()
            fn()
            times[cname].append(time.perf_counter() - t0)
    n_tok = len(batches) * batch * seq_len
    us = {k: 1e6 * statistics.median(v) / len(batches) for k, v in times.items()}
    print(
        f"\nLoader, {name}: {reader.n_tokens:,} tokens, {len(prefixes)} shards, {reader.n_docs} docs "
        f"(mean {reader.n_tokens / reader.n_docs:.0f} tokens), batch {batch} x seq {seq_len}: "
        + ", ".join(
            f"{k} {us[k]:.1f} µs/batch ({n_tok / statistics.median(v) / 1e6:.0f} M tokens/s)"
            for k, v in times.items()
        )
        + f"; CPU pressure {_cpu_pressure()}"
    )
    ratio_table(
        f"Loader speed-up, {name} (their time / ours)",
        [
            (
                f"per-sample gather (loop over docs) / batch ({k})",
                [a / b for a, b in zip(times["per_sample"], times[f"batch ({k})"])],
            )
            for k in readers
        ],
    )
    return reader


def bench_step_share(reader_1024: PackedReader, rounds: int) -> None:
    import dataclasses

    import torch

    from model.llama import SIZES, Transformer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    batch, seq_len = 8, 256
    cfg = dataclasses.replace(SIZES["tiny"], vocab_size=8192, max_seq_len=seq_len)
    model = Transformer(cfg)
    reader = PackedReader([s.prefix for s in reader_1024.shards], seq_len)
    rng = np.random.default_rng(1)

    def load():
        tokens, positions, loss_mask = reader.batch(rng.integers(0, len(reader), batch))
        return tokens, positions, loss_mask

    def step(tokens, positions, loss_mask):
        x = torch.from_numpy(tokens[:, :-1])
        y = torch.from_numpy(np.where(loss_mask, tokens[:, 1:], -100))
        out = model(x, torch.from_numpy(positions), y)
        out.loss.backward()

    step(*load())  # warm-up
    shares = []
    for r in range(max(rounds, 5)):
        t_load = t_step = 0.0
        for k in range(5):
            if (r + k) % 2 == 0:
                t0 = time.perf_counter()
                data = load()
                t_load += time.perf_counter() - t0
                t0 = time.perf_counter()
                step(*data)
                t_step += time.perf_counter() - t0
            else:
                data = load()
                t0 = time.perf_counter()
                step(*data)
                t_step += time.perf_counter() - t0
                t0 = time.perf_counter()
                load()
                t_load += time.perf_counter() - t0
        shares.append(100 * t_load / t_step)
    ratio_table(
        f"Loader time as % of one training step (tiny model, V 8192, batch {batch} × seq {seq_len}, fwd+bwd)",
        [("PackedReader.batch / step, %", shares)],
    )


def _dedup_corpus(n: int, num_perm: int, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """n synthetic documents for the dedup index: random signatures, 10% near copies of an earlier
    document (5% of the values changed), 10% exact copies (same digest); ids like real ones."""
    import hashlib

    rng = np.random.default_rng(seed)
    sigs = rng.integers(0, 2**32, size=(n, num_perm), dtype=np.uint32)
    kind = rng.random(n)
    earlier = (rng.random(n) * np.arange(n)).astype(np.int64)
    near = np.flatnonzero((kind < 0.1) & (np.arange(n) > 0))
    sigs[near] = sigs[earlier[near]]
    changed = rng.random((len(near), num_perm)) < 0.05
    sigs[near] = np.where(changed, rng.integers(0, 2**32, size=changed.shape, dtype=np.uint32), sigs[near])
    digests = [hashlib.sha256(s.tobytes()).hexdigest() for s in sigs]
    for k in np.flatnonzero((kind > 0.9) & (np.arange(n) > 0)).tolist():
        digests[k] = digests[int(earlier[k])]
    ids = [f"src:file-{k // 1000:05d}.jsonl:{k % 1000 + 1}" for k in range(n)]
    return ids, digests, sigs


def bench_dedup_index(n: int = 200_000, budget_mib: int = 16, piece: int = 10_000) -> None:
    """The dedup index (corpus/dedup.py) in RAM vs spilled to memory-mapped files past a budget, fed
    the same synthetic documents (`_dedup_corpus`, num_perm 128, threshold 0.8) a piece at a time,
    alternately (order rotated): the ratio of their check() times per piece (both indexes at the
    same size), the decisions checked equal; then the RAM each holds (`nbytes()`: its numpy rows
    and key runs, all of its per-document data) and the bytes in its files, per document."""
    from corpus.dedup import DedupIndex

    num_perm = 128
    ids, digests, sigs = _dedup_corpus(n, num_perm)
    with tempfile.TemporaryDirectory() as tmp:
        indexes = {
            "in RAM": DedupIndex(0.8, num_perm),
            "spilled": DedupIndex(0.8, num_perm, memory_budget=budget_mib << 20, spill_dir=tmp),
        }
        verdicts: dict[str, list] = {name: [] for name in indexes}
        seconds: dict[str, list[float]] = {name: [] for name in indexes}
        peak = 0
        for r, start in enumerate(range(0, n, piece)):
            for name in list(indexes) if r % 2 == 0 else list(indexes)[::-1]:
                check, out = indexes[name].check, verdicts[name]
                t0 = time.perf_counter()
                for k in range(start, min(start + piece, n)):
                    out.append(check(ids[k], digests[k], sigs[k]))
                seconds[name].append(time.perf_counter() - t0)
            peak = max(peak, indexes["spilled"].nbytes())
        if verdicts["in RAM"] != verdicts["spilled"]:
            sys.exit("dedup index: the spilled index's decisions differ from the in-RAM one's")
        removed = sum(v is not None for v in verdicts["in RAM"])
        print(
            f"\nDedup index: {n:,} synthetic documents ({removed:,} removed as exact or near duplicates), "
            f"num_perm {num_perm}; spilled past a budget of {budget_mib} MiB "
            f"({indexes['spilled'].n_spills} spills), check() timed per {piece:,} documents"
        )
        ram, spilled = indexes["in RAM"], indexes["spilled"]
        per_doc = {name: 1e6 * statistics.median(t) / piece for name, t in seconds.items()}
        print(f"{'':44s} {'in RAM':>8s} {'spilled':>8s}")
        for label, in_ram, in_files in [
            ("RAM held at the end, bytes per document", ram.nbytes() / n, spilled.nbytes() / n),
            ("RAM held, peak over the pieces, MiB", ram.nbytes() / 2**20, peak / 2**20),
            ("in files, bytes per document", 0.0, spilled.disk_bytes() / n),
            ("check(), µs per document (median piece)", per_doc["in RAM"], per_doc["spilled"]),
        ]:
            print(f"{label:44s} {in_ram:8.1f} {in_files:8.1f}")
        ratio_table(
            "Dedup index check() time, spilled / in RAM (per piece, alternated)",
            [("spilled / in RAM", [s / m for s, m in zip(seconds["spilled"], seconds["in RAM"])])],
        )
        spilled.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=6.0, help="MB of French text for the pipeline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--only",
        choices=["all", "loader", "structured", "dedup"],
        default="all",
        help="loader: parts 2 and 3 only; structured: part 4 only; dedup: part 5 only",
    )
    parser.add_argument("--structured-mb", type=float, default=30.0, help="MB of text for part 4")
    args = parser.parse_args()
    if args.only in ("all", "dedup"):
        bench_dedup_index()
        if args.only == "dedup":
            return
    if args.only in ("all", "structured"):
        with tempfile.TemporaryDirectory() as tmp:
            bench_structured(Path(tmp) / "structured", args.structured_mb, args.rounds)
        if args.only == "structured":
            return
    from tokenizer import Tokenizer, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_bytes = corpus_subset(tmp / "fr", args.mb)
        if args.only == "loader":  # the same kept chunks, curated once, untimed
            docs = curate(load_sources(tmp / "fr" / "sources.yaml"), workers=2).docs["fr"]
        else:
            docs = bench_pipeline(tmp / "fr", n_bytes, args.rounds)
        (tmp / "loader").mkdir()
        texts = [d.text for d in docs]
        tok = Tokenizer.load(train_tokenizer(texts, tmp / "tok", 8192, seed=0))
        novels = [np.asarray([1, *ids, 2], dtype=np.uint32) for ids in tok.encode_batch(texts, num_threads=2)]
        gsm = [json.loads(line) for line in (ROOT / "data" / "demo" / "gsm8k" / "train-excerpt.jsonl").open()]
        gsm_texts = [f"Question: {r['question']}\nWorked answer:\n{r['answer']}" for r in gsm]
        short = [
            np.asarray([1, *ids, 2], dtype=np.uint32) for ids in tok.encode_batch(gsm_texts, num_threads=2)
        ]
        readers = {}
        for batch, seq_len in ((8, 1024), (32, 2048)):
            readers[seq_len] = bench_loader(
                "novel chunks", novels, tmp / "loader", args.rounds, seq_len, batch
            )
            bench_loader("GSM8K problems", short, tmp / "loader", args.rounds, seq_len, batch)
        reader = readers[1024]
        bench_step_share(reader, args.rounds)


if __name__ == "__main__":
    main()
