"""Tokenizer: our encoding vs the exported transformers tokenizer and raw `tokenizers`; training vs HF's trainer.

Real French text (../shared/data/fr-public-domain: 19th-century novels and short stories), 2 threads for
everyone (RAYON_NUM_THREADS=2 for `tokenizers`). One 32k-vocab tokenizer is trained on ~20 MB of it, exported
with `export_hf`, and reloaded with AutoTokenizer. Then, side by side:

- encoding ~4 MB, as whole documents (one file each: what the corpus package feeds us) and as lines:
  `Tokenizer.encode_batch(texts, num_threads=2)` vs the reloaded AutoTokenizer called on the batch
  (`tok(texts, add_special_tokens=False)`) vs its raw backend `tokenizers.Tokenizer.encode_batch_fast`.
  The ids are asserted equal before timing;
- training time for the 32k vocab on the ~20 MB: `train_tokenizer` (sentencepiece BPE) vs `tokenizers`'
  BpeTrainer with the closest settings (byte fallback, digits split, "▁" for spaces, max piece length 16).

Contestants alternate within each round and the order rotates every round; each figure is a per-round
paired ratio (theirs time / ours time: > 1 means we are faster), median and min-max over rounds.

Run: `python benchmarks/bench_tokenizer.py [--rounds 5] [--train-rounds 2]` (a few minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")  # before `tokenizers` is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizer import Tokenizer, read_text, train_tokenizer  # noqa: E402
from tokenizer.chat import CHAT_TOKENS  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fr-public-domain"
THREADS = 2


def load_documents(limit_bytes: int, skip_bytes: int = 0) -> list[str]:
    """Whole files in a fixed order, after skipping `skip_bytes` (so encoding text is not training text)."""
    files = sorted(DATA.glob("*/txt/*.txt"))
    if not files:
        sys.exit(f"no text under {DATA}")
    docs, seen, taken = [], 0, 0
    for f in files:
        text = read_text(f)
        seen += len(text.encode())
        if seen <= skip_bytes:
            continue
        docs.append(text)
        taken += len(text.encode())
        if taken >= limit_bytes:
            break
    return docs


def rounds(contestants: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Seconds per contestant per round; the order rotates every round."""
    names = list(contestants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(n):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            contestants[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_row(
    label: str, times: dict[str, list[float]], theirs: str, ours: str, unit_count: float, unit: str
):
    ratios = [t / o for t, o in zip(times[theirs], times[ours])]
    rate = lambda name: unit_count / statistics.median(times[name])  # noqa: E731
    return (
        f"| {label:<48} | {statistics.median(ratios):5.2f}x | {min(ratios):5.2f}-{max(ratios):5.2f} "
        f"| {rate(ours):8.3g} {unit} | {rate(theirs):8.3g} {unit} |"
    )


def hf_trainer_run(lines: list[str], vocab_size: int) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    t = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Metaspace(prepend_scheme="never")]
    )
    specials = ["<unk>", "<s>", "</s>", "<pad>", *CHAT_TOKENS] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False, max_token_length=16
    )
    t.train_from_iterator(lines, trainer)
    assert t.get_vocab_size() >= vocab_size * 0.95


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--train-rounds", type=int, default=2)
    ap.add_argument("--train-mb", type=float, default=20)
    ap.add_argument("--encode-mb", type=float, default=4)
    ap.add_argument("--vocab-size", type=int, default=32000)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    train_docs = load_documents(int(args.train_mb * 1e6))
    train_bytes = sum(len(d.encode()) for d in train_docs)
    enc_docs = load_documents(int(args.encode_mb * 1e6), skip_bytes=train_bytes)
    if not enc_docs:  # not enough text to keep them apart: encode the first files
        enc_docs = load_documents(int(args.encode_mb * 1e6))
    enc_lines = [line for d in enc_docs for line in d.split("\n")]
    enc_bytes = sum(len(d.encode()) for d in enc_docs)

    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    t0 = time.perf_counter()
    tok = Tokenizer.load(train_tokenizer(train_docs, tmp / "tok", args.vocab_size, num_threads=THREADS))
    print(f"trained {tok.vocab_size} pieces on {train_bytes / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")
    hf = AutoTokenizer.from_pretrained(tok.export_hf(tmp / "hf"))
    backend = hf.backend_tokenizer

    rows = []
    for label, texts in [("documents", enc_docs), ("lines", enc_lines)]:
        ours_ids = tok.encode_batch(texts, num_threads=THREADS)
        assert hf(texts, add_special_tokens=False)["input_ids"] == ours_ids, f"{label}: HF ids differ"
        assert [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)] == ours_ids
        n_tokens = sum(map(len, ours_ids))
        print(
            f"encode {label}: {len(texts)} texts, {enc_bytes / 1e6:.1f} MB, {n_tokens} tokens, same ids in all three"
        )
        times = rounds(
            {
                "ours": lambda texts=texts: tok.encode_batch(texts, num_threads=THREADS),
                "hf": lambda texts=texts: hf(texts, add_special_tokens=False)["input_ids"],
                "raw": lambda texts=texts: [
                    e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)
                ],
            },
            args.rounds,
        )
        rows.append(
            ratio_row(f"encode {label}: vs AutoTokenizer batched", times, "hf", "ours", n_tokens, "tok/s")
        )
        rows.append(
            ratio_row(f"encode {label}: vs raw encode_batch_fast", times, "raw", "ours", n_tokens, "tok/s")
        )

    train_lines = [line for d in train_docs for line in d.split("\n") if line]
    times = rounds(
        {
            "ours": lambda: train_tokenizer(train_docs, tmp / "tok2", args.vocab_size, num_threads=THREADS),
            "hf": lambda: hf_trainer_run(train_lines, args.vocab_size),
        },
        args.train_rounds,
    )
    rows.append(
        ratio_row(
            f"train {args.vocab_size} on {train_bytes / 1e6:.0f} MB: vs tokenizers BpeTrainer",
            times,
            "hf",
            "ours",
            train_bytes / 1e6,
            "MB/s",
        )
    )

    print(
        f"\n{args.rounds} encode rounds, {args.train_rounds} training rounds, {THREADS} threads; ratio = theirs time / ours"
    )
    print(f"| {'what':<48} | ratio  | min-max     | ours           | theirs         |")
    print(f"|{'-' * 50}|--------|-------------|----------------|----------------|")
    print("\n".join(rows))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
