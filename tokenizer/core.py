"""The `Tokenizer`: a sentencepiece BPE model with our special tokens, chat template and parallel encoding.

Special ids are fixed by training (`tokenizer.train`): <unk>=0, <s>=1 (BOS), </s>=2 (EOS), <pad>=3,
<|im_start|>=4, <|im_end|>=5. `encode` adds no BOS/EOS: the corpus writes documents as [bos] + ids + [eos].

Encoding is sentencepiece's, with two rules on top, both mirrored by the transformers export (tokenizer/hf.py):
- U+FDD0 (a Unicode noncharacter, `chat.SEGMENT_BREAK`) is dropped and the text on each side of it is encoded
  separately: the chat template escapes marker text typed by a user with it (see `tokenizer.chat`);
- a text (or a segment between markers / U+FDD0) that spells exactly one piece is that piece: the export's
  `ignore_merges`. It only changes anything for a text that is exactly "<s>", "</s>", "<unk>", "<pad>" or
  "<0xNN>"; chat content can never form such a segment.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

from common.errors import UserError
from common.io import read_text
from tokenizer.chat import CHAT_TOKENS, IM_END, IM_START, SEGMENT_BREAK, check_messages, escape_content
from tokenizer.files import MODEL_FILE
from tokenizer.hf import export_hf

# Texts longer than this (characters) are encoded line by line (see encode_batch).
LONG_TEXT = 4096
SPECIAL_PIECES = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, IM_START: 4, IM_END: 5}


def default_threads() -> int:
    """All the cores this process may run on (the Slurm/cgroup affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Tokenizer:
    """A trained tokenizer; `Tokenizer.load(path)` reads `tokenizer.model` (or a folder holding one)."""

    def __init__(self, model_proto: bytes, path: Path | None = None):
        self.path = path
        self.model_proto = model_proto
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        where = str(path) if path else "tokenizer"
        for piece, want in SPECIAL_PIECES.items():
            got = self.sp.piece_to_id(piece)
            if got != want:
                raise UserError(
                    f"{where}: special token {piece} has id {got}, expected {want} (not a communs tokenizer)"
                )
        if any("\n" in self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())):
            # "\n" must never merge with its neighbours (it stays the <0x0A> byte): long texts are encoded
            # line by line, and a chat role header encodes the same alone as in front of its message.
            raise UserError(f"{where}: a piece contains a newline; train with `communs tokenizer train`")
        self.vocab_size: int = self.sp.get_piece_size()
        self.unk_id: int = self.sp.unk_id()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.im_start_id: int = SPECIAL_PIECES[IM_START]
        self.im_end_id: int = SPECIAL_PIECES[IM_END]
        self._piece_ids = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}
        self._max_piece_chars = max(map(len, self._piece_ids))
        self._marker_re = re.compile("(" + "|".join(map(re.escape, CHAT_TOKENS)) + ")")
        self._marker_prefix = os.path.commonprefix(list(CHAT_TOKENS))
        self._newline_ids = self.sp.encode("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        try:
            proto = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path}: tokenizer model not found") from None
        try:
            return cls(proto, path)
        except RuntimeError as e:  # sentencepiece's parse error
            raise UserError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.path or '<memory>'}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
        )

    # --- plain text -------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS)."""
        return self.encode_batch([text], num_threads=1)[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """`encode` over a batch, on `num_threads` threads (0 = all the cores available).

        Long texts are cut at newlines and their lines encoded as separate items: "\n" is never part of a
        piece (checked at load), so nothing merges across it, and sentencepiece's BPE is much faster on
        lines than on a whole book (it also spreads a few long documents over all the threads).
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of texts; use encode for one text")
        texts = texts if isinstance(texts, (list, tuple)) else list(texts)
        out: list[list[int]] = [[] for _ in texts]
        flat: list[str] = []  # what goes to sentencepiece in one threaded call
        spans: list[tuple[int, int, int]] = []  # (text index, first item in flat, number of lines or 0)
        for i, text in enumerate(texts):
            if SEGMENT_BREAK in text or self._marker_prefix in text:
                out[i] = self._encode_segments(text)
            elif len(text) <= self._max_piece_chars and (piece := self._whole_piece(text)) is not None:
                out[i] = [piece]  # the whole-piece rule, see _encode_segments
            elif len(text) > LONG_TEXT and "\n" in text:
                lines = text.split("\n")
                spans.append((i, len(flat), len(lines)))
                flat += lines
            else:
                spans.append((i, len(flat), 0))
                flat.append(text)
        encoded = self.sp.encode(flat, num_threads=num_threads or default_threads()) if flat else []
        for i, first, n_lines in spans:
            out[i] = encoded[first] if n_lines == 0 else self._join_lines(encoded[first : first + n_lines])
        return out

    def _whole_piece(self, text: str) -> int | None:
        return self._piece_ids.get(text.replace(" ", "▁"))

    def _join_lines(self, lines: list[list[int]]) -> list[int]:
        ids = list(lines[0])
        for line in itertools.islice(lines, 1, None):
            ids += self._newline_ids
            ids += line
        return ids

    def _encode_segments(self, text: str) -> list[int]:
        """The slow path, for texts with U+FDD0 or marker text.

        Splits where the HF export's pre-tokenizer does (drop U+FDD0, isolate markers), then applies its
        `ignore_merges` rule: a segment spelling a whole piece is that piece. For learned pieces this is what
        BPE gives anyway; it matters for pieces BPE never builds (<s>, <0x41>, the markers), typed alone.
        """
        ids: list[int] = []
        for part in text.split(SEGMENT_BREAK):
            for seg in self._marker_re.split(part):
                if not seg:
                    continue
                piece_id = self._whole_piece(seg) if len(seg) <= self._max_piece_chars else None
                if piece_id is not None:
                    ids.append(piece_id)
                elif len(seg) > LONG_TEXT and "\n" in seg:
                    ids += self._join_lines(self.sp.encode(seg.split("\n")))
                else:
                    ids += self.sp.encode(seg)
        return ids

    def encode_iter(
        self,
        texts: Iterable[str],
        *,
        batch_size: int = 1024,
        num_threads: int = 0,
        progress: bool | str = False,
        total: int | None = None,
    ) -> Iterator[list[int]]:
        """Stream `encode` over an iterable of any length, in order, a batch at a time on all cores.

        `progress` shows a tqdm bar (a string names it); `total` is the number of texts, when known.
        """
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=progress if isinstance(progress, str) else "encode", unit="doc")
        it = iter(texts)
        n_tokens = 0
        try:
            while batch := list(itertools.islice(it, batch_size)):
                ids = self.encode_batch(batch, num_threads)
                if bar is not None:
                    n_tokens += sum(map(len, ids))
                    bar.set_postfix(tokens=n_tokens, refresh=False)
                    bar.update(len(batch))
                yield from ids
        finally:
            if bar is not None:
                bar.close()

    def encode_files(
        self,
        paths: Iterable[str | os.PathLike],
        *,
        num_threads: int = 0,
        progress: bool = False,
    ) -> Iterator[tuple[Path, list[int]]]:
        """Encode text files, one document each (strict UTF-8: an error names the file and the byte offset)."""
        paths = [Path(p) for p in paths]
        texts = (read_text(p) for p in paths)
        # Files can be large: batch a few at a time (sentencepiece still spreads each one over the threads).
        ids = self.encode_iter(
            texts,
            batch_size=max(2, num_threads or default_threads()),
            num_threads=num_threads,
            progress="encode files" if progress else False,
            total=len(paths),
        )
        yield from zip(paths, ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; BOS/EOS/pad are dropped, chat markers come back as their text."""
        return self.sp.decode(list(map(int, ids)))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    # --- chat -------------------------------------------------------------------------------------------

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Ids of a conversation in the chat template (with BOS) and its loss mask.

        The mask is 1 on each assistant message's content and its <|im_end|>, 0 elsewhere (BOS, markers,
        role headers, the newline after <|im_end|>, system and user turns). `add_generation_prompt` appends
        "<|im_start|>assistant\\n" for generation.
        """
        check_messages(messages)
        ids, mask = [self.bos_id], [0]
        for m in messages:
            header = self.encode(m["role"] + "\n")
            # Encoded together, as the HF template's rendered text is; "\n" never merges, so the header's ids
            # come first unchanged (checked: a foreign model could break it).
            turn = self.encode(m["role"] + "\n" + escape_content(m["content"]))
            if turn[: len(header)] != header:
                raise UserError(
                    f"{self.path}: role header {m['role']!r} does not encode apart from its message"
                )
            learn = int(m["role"] == "assistant")
            ids += [self.im_start_id, *turn, self.im_end_id, *self._newline_ids]
            mask += (
                [0] * (1 + len(header))
                + [learn] * (len(turn) - len(header) + 1)
                + [0] * len(self._newline_ids)
            )
        if add_generation_prompt:
            header = self.encode("assistant\n")
            ids += [self.im_start_id, *header]
            mask += [0] * (1 + len(header))
        return ids, mask

    # --- export -----------------------------------------------------------------------------------------

    def export_hf(self, out_dir: str | os.PathLike, model_max_length: int | None = None) -> Path:
        """Write a folder that `transformers.AutoTokenizer.from_pretrained` loads with no custom code.

        Same ids as ours on any text and in the chat template (see tokenizer/hf.py); files are moved in
        one by one, so `out_dir` may already hold a model's weights.
        """
        return export_hf(self, Path(out_dir), model_max_length)


def check_vocab(tokenizer: Tokenizer | str | os.PathLike, model_vocab_size: int) -> None:
    """Raise a UserError unless every token id of `tokenizer` fits in a model of `model_vocab_size` rows.

    `model_vocab_size` is the model's embedding size (often the tokenizer's vocab padded up to a multiple
    of 64 or 128 for speed): a larger model vocab is fine, a smaller one would index out of range.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    if tok.vocab_size > model_vocab_size:
        raise UserError(
            f"{tok.path or 'tokenizer'}: vocab_size {tok.vocab_size} does not fit the model's vocab_size "
            f"{model_vocab_size} (the model's vocab must be >= the tokenizer's)"
        )
