"""Fixtures: the whole embedded demo corpus, one tokenizer trained on it, and its reloaded HF export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenizer import Tokenizer, train_tokenizer

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"
VOCAB = 3000


def demo_documents() -> dict[str, list[str]]:
    """Every document of data/demo by source: novels and short stories (one per file), Shakespeare, gsm8k."""
    docs = {
        "roman19": [p.read_text(encoding="utf-8") for p in sorted((DEMO / "roman19" / "txt").glob("*.txt"))],
        "nouvelles19": [
            p.read_text(encoding="utf-8") for p in sorted((DEMO / "nouvelles19" / "txt").glob("*.txt"))
        ],
        "shakespeare": [(DEMO / "shakespeare" / "tinyshakespeare-excerpt.txt").read_text(encoding="utf-8")],
    }
    with open(DEMO / "gsm8k" / "train-excerpt.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    docs["gsm8k"] = [f"{r['question']}\n{r['answer']}" for r in records]
    return docs


@pytest.fixture(scope="session")
def corpus() -> dict[str, list[str]]:
    return demo_documents()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([d for docs in corpus.values() for d in docs], out, VOCAB, seed=0)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="session")
def hf_tok(tmp_path_factory, tok):
    """The exported folder, reloaded the way a user would (AutoTokenizer, no custom code)."""
    from transformers import AutoTokenizer

    out = tok.export_hf(tmp_path_factory.mktemp("hf"))
    return AutoTokenizer.from_pretrained(out)
