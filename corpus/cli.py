"""`communs data …`: prepare, encode, optout add, diff, exposure, seen, verify (docs/corpus.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="corpus: sources → curated documents → shards + manifest")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = sub.add_parser(
        "prepare", help="run the pipeline, train the tokenizer, write shards and manifest.json"
    )
    p.add_argument("sources", help="the sources YAML file")
    p.add_argument("--out", required=True, help="data directory to write (resumed if it holds a crashed run)")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary (default: the sources file's)")
    p.add_argument("--tokenizer", help="use this tokenizer.model instead of training one")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_prepare)

    p = sub.add_parser(
        "encode", help="encode text/jsonl files into one token shard, [bos]+ids+[eos] per document"
    )
    p.add_argument(
        "inputs", nargs="+", help="files or folders (.txt, .md: one document each; .jsonl: one per line)"
    )
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.model or its folder")
    p.add_argument(
        "--out", required=True, type=Path, help="shard prefix to write (PREFIX.tokens/.index/.json)"
    )
    p.add_argument("--field", default="text", help="the text field of .jsonl records (default: text)")
    p.add_argument("--threads", type=int, default=0, help="0 = all cores")
    p.set_defaults(func=_encode)

    p = sub.add_parser("optout", help="manage the opt-out list")
    osub = p.add_subparsers(dest="optout_command", metavar="OPTOUT_COMMAND", required=True)
    a = osub.add_parser("add", help="append an entry to an opt-out list (then re-run prepare)")
    a.add_argument("file", help="the opt-out list (JSON Lines; created if absent)")
    what = a.add_mutually_exclusive_group(required=True)
    what.add_argument("--doc-id", help="a document id (all its chunks too)")
    what.add_argument("--author", help="every document by this author (case-insensitive)")
    what.add_argument("--sha256", help="sha256 of a document's text (final, or as read)")
    what.add_argument("--url", help="URL pattern (shell-style: https://example.org/blog/*)")
    what.add_argument("--domain", help="host-name pattern (example.org, *.example.org)")
    what.add_argument("--text-file", help="a file holding the document as published: its sha256 is listed")
    a.add_argument("--reason", default="", help="why (kept in the list)")
    a.add_argument("--date", help="YYYY-MM-DD (default: today)")
    a.set_defaults(func=_optout_add)

    p = sub.add_parser("diff", help="documents removed / added / changed between two manifests")
    p.add_argument("old", help="manifest.json or data directory")
    p.add_argument("new", help="manifest.json or data directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_diff)

    p = sub.add_parser("exposure", help="runs and checkpoints whose manifest held opted-out documents")
    p.add_argument("--optout", required=True, help="the opt-out list")
    p.add_argument("--runs", nargs="+", required=True, help="run directories or folders of runs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_exposure)

    p = sub.add_parser("seen", help="was this in a manifest? QUERY: a text, a document id or a sha256")
    p.add_argument("query")
    p.add_argument("--manifest", required=True, help="manifest.json or data directory")
    p.add_argument("--kind", default="auto", choices=["auto", "text", "id", "sha256"])
    p.set_defaults(func=_seen)

    p = sub.add_parser("verify", help="recompute every hash a data directory's manifest names")
    p.add_argument("data_dir")
    p.set_defaults(func=_verify)


def _encode(args: argparse.Namespace) -> int:
    import numpy as np

    from corpus.shards import write_shard
    from tokenizer import Tokenizer
    from tokenizer.files import expand_inputs, iter_documents

    tok = Tokenizer.load(args.tokenizer)
    paths = expand_inputs(args.inputs)
    docs = (doc for path in paths for doc in iter_documents(path, args.field))
    ids = tok.encode_iter(docs, num_threads=args.threads, progress="encode")
    record = write_shard(args.out, (np.asarray([tok.bos_id, *d, tok.eos_id], dtype=np.uint32) for d in ids))
    print(f"{args.out}: {record['n_docs']} documents, {record['n_tokens']} tokens")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import time

    from corpus.prepare import prepare

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers: must be at least 1, got {args.workers}")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    manifest = prepare(
        args.sources, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer, workers=args.workers,
        progress=not args.no_progress and sys.stderr.isatty(), timings=timings,
    )  # fmt: skip
    for sid, s in manifest["sources"].items():
        removed = sum(s["counts"]["removed"].values())
        tr, va = s["splits"]["train"], s["splits"]["val"]
        print(
            f"{sid:14s} kept {s['counts']['kept']:6d}  removed {removed:5d}  "
            f"train {tr['n_docs']:6d} docs {tr['n_tokens']:10d} tok  val {va['n_docs']:5d} docs {va['n_tokens']:9d} tok"
        )
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    print(f"{Path(args.out) / 'manifest.json'}: root_hash {manifest['root_hash']}")
    print(f"prepared in {time.perf_counter() - t0:.1f} s ({steps})")
    return 0


def _optout_add(args: argparse.Namespace) -> int:
    from corpus.optout import add_entry

    if args.text_file:
        import hashlib

        path = Path(args.text_file)
        if not path.is_file():
            raise UserError(f"--text-file {path}: no such file")
        from corpus.readers import read_text_file

        # The hash of the text as the pipeline reads it (line breaks normalised, as the `text` format
        # does) matches the document (every chunk of it) however it was curated.
        try:
            text = read_text_file(path)
        except UnicodeDecodeError as e:
            raise UserError(f"--text-file {path}: invalid UTF-8 at byte {e.start}") from None
        kind, value = "sha256", hashlib.sha256(text.encode("utf-8")).hexdigest()
    else:
        kind, value = next((k, v) for k, v in (
            ("doc_id", args.doc_id), ("author", args.author), ("sha256", args.sha256), ("url", args.url),
            ("domain", args.domain),
        ) if v is not None)  # fmt: skip
    entry = add_entry(args.file, kind, value, args.reason, args.date)
    print(
        f"{args.file}: opted out {entry['kind']} {entry['value']!r}; re-run `communs data prepare` to apply"
    )
    return 0


def _diff(args: argparse.Namespace) -> int:
    from corpus.audit import diff_manifests

    d = diff_manifests(args.old, args.new)
    if args.json:
        print(json.dumps(d, indent=1, ensure_ascii=False))
        return 0
    for r in d["removed"]:
        print(f"removed\t{r['id']}\t{r['source']}\t{r['rule']}")
    for r in d["added"]:
        print(f"added\t{r['id']}\t{r['source']}")
    for r in d["changed"]:
        print(f"changed\t{r['id']}\t{r['source']}\t{r['old_sha256'][:12]} -> {r['new_sha256'][:12]}")
    print(
        f"{len(d['removed'])} removed, {len(d['added'])} added, {len(d['changed'])} changed", file=sys.stderr
    )
    return 0


def _exposure(args: argparse.Namespace) -> int:
    from corpus.audit import exposure

    report = exposure(args.optout, args.runs)
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
        return 0
    if not report:
        print("no run trained on an opted-out document")
    for e in report:
        if "error" in e:
            print(f"{e['run']}: {e['error']}")
            continue
        ckpts = ", ".join(e["checkpoints"]) or "none"
        print(f"{e['run']}: manifest {str(e['manifest_root_hash'])[:12]}: {len(e['documents'])} opted-out "
              f"document(s); checkpoints: {ckpts}")  # fmt: skip
        for d in e["documents"]:
            print(f"  {d['id']}\t{d['source']}\t{d['rule']}")
    return 0


def _seen(args: argparse.Namespace) -> int:
    from corpus.seen import seen

    how, hits = seen(args.query, args.manifest, args.kind)
    if not hits:
        print(f"not seen (looked up as {how})")
        return 1
    for r in hits:
        detail = f"kept, {r.get('split', '?')}" if r["fate"] == "kept" else f"removed by {r['rule']}"
        print(f"seen ({how}): {r['id']}\t{r['source']}\t{detail}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from corpus.manifest import verify_data_dir

    problems = verify_data_dir(args.data_dir)
    for p in problems:
        print(p)
    if problems:
        raise UserError(f"{args.data_dir}: {len(problems)} file(s) do not match the manifest")
    print(f"{args.data_dir}: every file matches the manifest")
    return 0
