"""Sentencepiece BPE tokenizer: training on a seeded sample, parallel encoding, chat template, HF export.

    from tokenizer import Tokenizer, train_tokenizer
    path = train_tokenizer(texts, out_dir, vocab_size=32000, seed=0)
    tok = Tokenizer.load(path)
    tok.encode("Bonjour"); tok.encode_chat(messages); tok.export_hf(out_dir)

See docs/tokenizer.md.
"""

from common.io import read_text
from tokenizer.chat import IM_END, IM_START, SEGMENT_BREAK, jinja_template, render_chat
from tokenizer.core import MODEL_FILE, Tokenizer, check_vocab
from tokenizer.train import sample_texts, train_tokenizer

__all__ = [
    "IM_END",
    "IM_START",
    "MODEL_FILE",
    "SEGMENT_BREAK",
    "Tokenizer",
    "check_vocab",
    "jinja_template",
    "read_text",
    "render_chat",
    "sample_texts",
    "train_tokenizer",
]
