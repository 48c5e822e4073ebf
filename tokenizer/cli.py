"""`communs tokenizer train | encode | export`.

communs tokenizer train data/demo/roman19 data/demo/nouvelles19 --out runs/tok --vocab-size 8000
communs tokenizer encode --tokenizer runs/tok --text "L’œuvre coûte 1 234 €."
(files are encoded into a token shard by `communs data encode`: shards are the corpus's format)
communs tokenizer export --tokenizer runs/tok --out runs/tok-hf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train, use and export the BPE tokenizer")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    p = sub.add_parser("train", help="train a sentencepiece BPE tokenizer on text/jsonl files or folders")
    p.add_argument(
        "inputs", nargs="+", help="files (.txt, .md: one document each; .jsonl: one per line) or folders"
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write tokenizer.model into")
    p.add_argument("--vocab-size", required=True, type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sample-bytes",
        type=int,
        default=None,
        help="train on a seeded sample of this many bytes, split between the inputs by --weight",
    )
    p.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="INPUT=W",
        help="sampling weight of one input (default: its size in bytes, i.e. proportional)",
    )
    p.add_argument("--field", default="text", help="the text field of .jsonl records (default: text)")
    p.add_argument("--threads", type=int, default=0, help="0 = all cores")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "encode", help="encode a text: print its ids and pieces (files: `communs data encode`)"
    )
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.model or its folder")
    p.add_argument("--text", required=True, help="the text to encode")
    p.set_defaults(func=_encode)

    p = sub.add_parser("export", help="write a transformers tokenizer folder (AutoTokenizer.from_pretrained)")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.model or its folder")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--no-check", action="store_true", help="skip reloading the folder and comparing ids")
    p.set_defaults(func=_export)


def _sources(inputs: list[str], field: str) -> dict[str, object]:
    from tokenizer.files import expand_inputs, iter_documents

    def documents(paths):
        for path in paths:
            yield from iter_documents(path, field)

    return {name: documents(expand_inputs([name])) for name in inputs}


def _train(args: argparse.Namespace) -> int:
    from tokenizer.files import expand_inputs
    from tokenizer.train import sample_texts, train_tokenizer

    sources = _sources(args.inputs, args.field)
    if args.sample_bytes is None:
        if args.weight:
            raise UserError("--weight needs --sample-bytes (without it, all the text is used)")
        texts = (doc for docs in sources.values() for doc in docs)
    else:
        weights = {name: float(sum(p.stat().st_size for p in expand_inputs([name]))) for name in args.inputs}
        for item in args.weight:
            name, sep, value = item.rpartition("=")
            if not sep or name not in weights:
                raise UserError(
                    f"--weight {item!r}: expected INPUT=W with INPUT one of {', '.join(args.inputs)}"
                )
            try:
                weights[name] = float(value)
            except ValueError:
                raise UserError(f"--weight {item!r}: {value!r} is not a number") from None
        texts = sample_texts(sources, weights, args.sample_bytes, args.seed)
    path = train_tokenizer(texts, args.out, args.vocab_size, seed=args.seed, num_threads=args.threads)
    meta = json.loads((path.parent / "tokenizer.meta.json").read_text())
    print(
        f"{path}: {meta['vocab_size']} pieces from {meta['sample']['lines']} lines "
        f"({meta['sample']['bytes']} bytes) in {meta['train_seconds']:.1f}s, sha256 {meta['sha256'][:16]}"
    )
    return 0


def _encode(args: argparse.Namespace) -> int:
    from tokenizer.core import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(args.text)
    print(json.dumps({"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]}, ensure_ascii=False))
    return 0


def _export(args: argparse.Namespace) -> int:
    from tokenizer.core import Tokenizer
    from tokenizer.hf import check_export

    tok = Tokenizer.load(args.tokenizer)
    out = tok.export_hf(args.out)
    if not args.no_check:
        check_export(tok, out)
    print(f"{out}: transformers tokenizer ({tok.vocab_size} tokens, chat template set)")
    return 0
