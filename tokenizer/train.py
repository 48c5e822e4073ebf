"""Training: a seeded sample of the corpus → a sentencepiece BPE model, byte-identical for the same inputs.

Choices (measured in ../shared/notes/tokenizer-export.md; each one matters for exact HF parity or French):
- BPE with byte fallback: no unknown token, any byte sequence encodes.
- Digits split one by one (arithmetic in the maths phase sees every digit).
- Identity normalisation, no dummy prefix, whitespace kept as is (runs of spaces are pieces: code
  indentation): what you encode is exactly what decodes. French accents, œ/æ and both apostrophes are
  ordinary characters; `character_coverage=1.0` keeps every character seen (0.9999 dropped digits).
- Special ids <unk>=0 <s>=1 </s>=2 <pad>=3, then the chat markers as user-defined pieces 4 and 5.
- Documents are cut into lines ("\\n" is never learned: it stays the <0x0A> byte, which the chat template
  relies on); very long lines are cut so that sentencepiece does not silently skip them.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import sentencepiece as spm

from common.errors import UserError
from common.io import write_atomic
from tokenizer.chat import CHAT_TOKENS, SEGMENT_BREAK
from tokenizer.core import MODEL_FILE, Tokenizer, default_threads

log = logging.getLogger(__name__)

META_FILE = "tokenizer.meta.json"
META_FORMAT = "communs.tokenizer/1"
# sentencepiece skips sentences longer than max_sentence_length bytes: cut lines to at most this many
# characters (<= 4 bytes each in UTF-8), under the limit we pass.
MAX_LINE_CHARS = 1 << 14
MAX_SENTENCE_BYTES = 4 * MAX_LINE_CHARS

TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_by_whitespace=True,
    character_coverage=1.0,
    max_sentence_length=MAX_SENTENCE_BYTES,
    input_sentence_size=0,  # we sample ourselves (seeded, by source weight); sentencepiece takes it all
    shuffle_input_sentence=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=3,
    user_defined_symbols=list(CHAT_TOKENS),
    max_sentencepiece_length=16,
    minloglevel=2,
)


def _priority(seed: int, source: str, data: bytes) -> int:
    """A document's uniform random rank, a pure function of (seed, source, content)."""
    h = hashlib.blake2b(data, digest_size=8, key=f"{seed}\0{source}".encode()[:64])
    return int.from_bytes(h.digest(), "big")


def sample_texts(
    sources: Mapping[str, Iterable[str]], weights: Mapping[str, float], total_bytes: int, seed: int = 0
) -> list[str]:
    """A seeded sample of about `total_bytes` of UTF-8 text, split between sources by `weights`.

    Each source gets `total_bytes * weight / sum(weights)` bytes, drawn uniformly among its documents
    (streamed once; memory holds about the sample): every document gets a rank that hashes (seed, source,
    content), and the lowest-ranked documents are kept until the source's share is reached. The sample
    depends on the documents and the seed only, not on their order. A source smaller than its share is
    taken whole (and logged). Sources come out in name order, documents in rank order.
    """
    if set(sources) != set(weights):
        missing = sorted(set(sources) - set(weights)) or sorted(set(weights) - set(sources))
        raise UserError(f"sample weights and sources differ: {', '.join(missing)} in one but not the other")
    bad = {k: w for k, w in weights.items() if not (isinstance(w, (int, float)) and w >= 0)}
    if bad:
        raise UserError(f"sample weights must be numbers >= 0, got {bad}")
    total_weight = sum(weights.values())
    if total_weight <= 0 or total_bytes <= 0:
        raise UserError(f"empty training sample: total_bytes={total_bytes}, weights sum to {total_weight}")
    out: list[str] = []
    for name in sorted(sources):
        target = total_bytes * weights[name] / total_weight
        if target <= 0:
            continue
        # Max-heap on rank (negated): drop the highest-ranked document while the rest still fills the share.
        heap: list[tuple[int, int, str]] = []
        held = seen = 0
        for text in sources[name]:
            data = text.encode("utf-8")
            seen += len(data)
            heapq.heappush(heap, (-_priority(seed, name, data), len(data), text))
            held += len(data)
            while heap and held - heap[0][1] >= target:
                held -= heapq.heappop(heap)[1]
        if seen < target:
            log.info(
                "sample: source %s has %d bytes, less than its share %d: taken whole", name, seen, target
            )
        out.extend(text for _, _, text in sorted(heap, key=lambda t: -t[0]))
    return out


def training_lines(texts: Iterable[str]) -> Iterator[str]:
    """The sentences sentencepiece learns from: non-empty lines, cut to MAX_LINE_CHARS."""
    for text in texts:
        for line in text.replace(SEGMENT_BREAK, "\n").split("\n"):
            for start in range(0, len(line), MAX_LINE_CHARS):
                yield line[start : start + MAX_LINE_CHARS]


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int,
    *,
    seed: int = 0,
    sample_bytes: int | None = None,
    num_threads: int = 0,
) -> Path:
    """Train a BPE tokenizer on `texts` and write `out_dir/tokenizer.model` (+ tokenizer.meta.json) atomically.

    `sample_bytes` draws a seeded sample of that size first (`sample_texts`, one source); otherwise all the
    texts are used (call `sample_texts` yourself for per-source weights). Same texts, vocab_size and seed →
    byte-identical model file, whatever `num_threads` (0 = all cores).
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
        raise UserError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    out_dir = Path(out_dir)
    if sample_bytes is not None:
        texts = sample_texts({"all": texts}, {"all": 1.0}, sample_bytes, seed)
    lines = [line for line in training_lines(texts) if line]
    if not lines:
        raise UserError("empty training sample: the texts hold no non-empty line")
    n_bytes = sum(len(line.encode("utf-8")) for line in lines)
    sample_hash = hashlib.sha256()
    for line in lines:
        sample_hash.update(line.encode("utf-8") + b"\n")

    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    t0 = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            vocab_size=vocab_size,
            num_threads=num_threads or default_threads(),
            **TRAINER_OPTIONS,
        )
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size too high" in msg or "Vocabulary size is smaller" in msg:
            limit = msg.rsplit(" ", 1)[-1].rstrip(".") if "too high" in msg else None
            hint = f"at most {limit} pieces can be learned from it" if limit else msg.split("] ", 1)[-1]
            raise UserError(
                f"vocab_size {vocab_size} does not fit the training sample ({len(lines)} lines, {n_bytes} bytes): "
                f"{hint}; change vocab_size or give more text"
            ) from None
        raise
    seconds = time.perf_counter() - t0
    proto = _canonical(buf.getvalue())
    tok = Tokenizer(proto)  # checks the special ids

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    write_atomic(path, proto)
    meta = {
        "format": META_FORMAT,
        "model": MODEL_FILE,
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "special_ids": {tok.id_to_piece(i): i for i in range(6)},
        "seed": seed,
        "sample": {"lines": len(lines), "bytes": n_bytes, "sha256": sample_hash.hexdigest()},
        "trainer": {k: v for k, v in TRAINER_OPTIONS.items() if k != "minloglevel"}
        | {"vocab_size": vocab_size},
        "sentencepiece": spm.__version__,
        "train_seconds": round(seconds, 3),
    }
    write_atomic(out_dir / META_FILE, (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode())
    log.info(
        "tokenizer: %d pieces from %d lines (%d bytes) in %.1fs -> %s",
        tok.vocab_size,
        len(lines),
        n_bytes,
        seconds,
        path,
    )
    return path


def _canonical(proto: bytes) -> bytes:
    """The model with machine-dependent trainer fields cleared, so that any machine writes the same bytes.

    The pieces and scores do not depend on the thread count (checked in the tests); only the recorded
    `num_threads` does.
    """
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    model.trainer_spec.ClearField("num_threads")
    return model.SerializeToString(deterministic=True)
